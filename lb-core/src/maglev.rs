//! Weighted Maglev lookup tables (Eisenbud et al., "Maglev", NSDI 2016, §3.4).
//!
//! A table of prime size M maps a flow hash to a backend. Each backend `i` has a permutation of
//! the slots, `perm[i][j] = (offset_i + j·skip_i) mod M`, with `offset_i = h1(id) mod M` and
//! `skip_i = h2(id) mod (M−1) + 1` (xxh3 with the fixed seeds of [`crate::hash`]). Backends take
//! turns claiming the next still-empty slot of their permutation until the table is full.
//!
//! **Weights** follow Katran's `MaglevHashV2` (and Envoy): each round every backend adds its
//! weight to an accumulator and takes a turn whenever the accumulator reaches the largest weight.
//! Weight 0 means "drain": the backend gets no slot (tracked flows are the packet path's concern).
//!
//! **Invariants.**
//! - The table is a pure function of the size and the *set* of (identity, weight) pairs: backends
//!   are sorted by [`BackendId`] before the build, so their order in the config does not matter.
//! - Memory is O(N + M): the N×M permutation is never stored, only each backend's current position.
//! - [`MaglevTable::lookup`] reduces the hash with a multiply-shift ([`fast_range`]), not `%`.
//! - [`MaglevTable::fingerprint`] depends only on the mapping slot → backend identity.
//!
//! **Build cost.** Filling M slots takes about M·ln M probes, most of them once the table is
//! nearly full, and each probe is a short dependent chain (`pos += skip; wrap`). Measured on this
//! project's 2-core machine (BENCHMARKS.md), the build is instruction-bound, so
//! [`MaglevBuilder`] cuts instructions per probe by fill level:
//! - below half full, one probe at a time (most turns need one);
//! - then blocks of 4, 8 and 16 permutation positions per step: their addresses
//!   `pos + k·skip` are independent, so the bitmap loads overlap and the loop branches once per
//!   block;
//! - for the last ~√M/2 empty slots, no probing at all: slot `e` is
//!   `(e − pos)·skip⁻¹ mod M` steps away in the backend's permutation (M is prime), so the
//!   backend takes the empty slot with the fewest steps.
//!
//! Each phase finds exactly the slot plain probing finds first, so the table is identical to the
//! textbook algorithm's; `tests::matches_reference_implementation` checks it against a literal one.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use strength_reduce::StrengthReducedU64;
use xxhash_rust::xxh3::Xxh3;

use crate::hash::{FINGERPRINT_SEED, MAGLEV_OFFSET_SEED, MAGLEV_SKIP_SEED, fast_range, xxh3};

/// The default table size: a prime, at least 100 × the backends of all but the largest pools.
pub const DEFAULT_TABLE_SIZE: u32 = 65_537;
/// The "large" table size of the benchmarks and of pools of up to about 6 500 backends.
pub const LARGE_TABLE_SIZE: u32 = 655_373;
/// The largest table size accepted (a prime just below 2^24): 32 MiB of slots at most.
pub const MAX_TABLE_SIZE: u32 = 16_777_213;
/// The largest number of backends of one table (slots hold a `u16` index).
pub const MAX_BACKENDS: usize = u16::MAX as usize;
/// The largest weight accepted. Weights are relative; 0 drains a backend.
pub const MAX_WEIGHT: u32 = 65_535;

/// The stable identity of a backend: its address. Tables sort backends by it (IPv4 before IPv6,
/// then by address bytes) and hash it to place them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendId(pub IpAddr);

impl BackendId {
    /// The bytes hashed for this identity: a family tag (4 or 6) then the address octets. The
    /// tag keeps `1.2.3.4` and `::ffff:1.2.3.4` apart.
    fn write_bytes(&self, buf: &mut [u8; 17]) -> usize {
        match self.0 {
            IpAddr::V4(a) => {
                buf[0] = 4;
                buf[1..5].copy_from_slice(&a.octets());
                5
            }
            IpAddr::V6(a) => {
                buf[0] = 6;
                buf[1..17].copy_from_slice(&a.octets());
                17
            }
        }
    }

    fn hash_with(&self, seed: u64) -> u64 {
        let mut buf = [0u8; 17];
        let len = self.write_bytes(&mut buf);
        xxh3(&buf[..len], seed)
    }
}

impl fmt::Display for BackendId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// One backend as the table sees it: its identity and its relative weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WeightedBackend {
    /// The backend's identity.
    pub id: BackendId,
    /// Relative weight, `0..=MAX_WEIGHT`; 0 gives no slots.
    pub weight: u32,
}

/// Why a table cannot be built. The config validation reports these first, with field names;
/// these errors guard callers that build tables directly.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    /// The size is not prime, so some backends' permutations would not cover every slot.
    #[error("table size {size} is not prime (nearest primes: {below} and {above})")]
    NotPrime {
        /// The size asked for.
        size: u32,
        /// The largest prime below it.
        below: u32,
        /// The smallest prime above it.
        above: u32,
    },
    /// The size is outside `2..=MAX_TABLE_SIZE`.
    #[error("table size {size} is out of range 2..={MAX_TABLE_SIZE}")]
    SizeOutOfRange {
        /// The size asked for.
        size: u32,
    },
    /// Fewer slots than backends: some backends could never receive traffic.
    #[error("table size {size} is smaller than the {backends} backends")]
    SmallerThanBackends {
        /// The size asked for.
        size: u32,
        /// The number of backends.
        backends: usize,
    },
    /// The memory for the table could not be allocated.
    #[error("cannot allocate {bytes} bytes for the table: out of memory")]
    OutOfMemory {
        /// The allocation that failed.
        bytes: usize,
    },
    /// More backends than a slot index can name.
    #[error("{backends} backends exceed the limit of {MAX_BACKENDS}")]
    TooManyBackends {
        /// The number of backends.
        backends: usize,
    },
    /// The same backend twice.
    #[error("backend {id} is listed twice")]
    DuplicateBackend {
        /// The repeated identity.
        id: BackendId,
    },
    /// A weight above [`MAX_WEIGHT`].
    #[error("backend {id} has weight {weight}, above the maximum {MAX_WEIGHT}")]
    WeightTooLarge {
        /// The backend.
        id: BackendId,
        /// Its weight.
        weight: u32,
    },
}

/// Whether `n` is prime (trial division; table sizes are at most 2^24, so at most 2 048 steps).
#[must_use]
pub fn is_prime(n: u32) -> bool {
    if n < 4 {
        return n >= 2;
    }
    if n.is_multiple_of(2) {
        return false;
    }
    (3..)
        .step_by(2)
        .take_while(|d| d * d <= n)
        .all(|d| !n.is_multiple_of(d))
}

/// The primes nearest to `n`, below and above (for error messages that suggest a fix).
#[must_use]
pub fn nearest_primes(n: u32) -> (u32, u32) {
    let below = (2..n).rev().find(|&p| is_prime(p)).unwrap_or(2);
    let above = (n.saturating_add(1)..)
        .find(|&p| is_prime(p))
        .unwrap_or(u32::MAX);
    (below, above)
}

/// Checks that a list sorted by identity names no backend twice.
fn check_unique(sorted: &[WeightedBackend]) -> Result<(), TableError> {
    match sorted.windows(2).find(|w| w[0].id == w[1].id) {
        Some(w) => Err(TableError::DuplicateBackend { id: w[0].id }),
        None => Ok(()),
    }
}

/// The checks of a size and a backend list that need no sorted copy (uniqueness is checked on
/// the list [`MaglevBuilder::build_into`] sorts anyway: [`check_unique`]).
fn validate_sizes(size: u32, backends: &[WeightedBackend]) -> Result<(), TableError> {
    if !(2..=MAX_TABLE_SIZE).contains(&size) {
        return Err(TableError::SizeOutOfRange { size });
    }
    if !is_prime(size) {
        let (below, above) = nearest_primes(size);
        return Err(TableError::NotPrime { size, below, above });
    }
    if backends.len() > MAX_BACKENDS {
        return Err(TableError::TooManyBackends {
            backends: backends.len(),
        });
    }
    if backends.len() > size as usize {
        return Err(TableError::SmallerThanBackends {
            size,
            backends: backends.len(),
        });
    }
    match backends.iter().find(|b| b.weight > MAX_WEIGHT) {
        Some(b) => Err(TableError::WeightTooLarge {
            id: b.id,
            weight: b.weight,
        }),
        None => Ok(()),
    }
}

/// A built Maglev lookup table: M slots, each naming a backend by its index in
/// [`MaglevTable::backends`] (sorted by identity).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MaglevTable {
    size: u32,
    backends: Vec<WeightedBackend>,
    /// `slots[s]` is an index into `backends`; empty when no backend has a weight above 0.
    slots: Vec<u16>,
}

impl MaglevTable {
    /// A copy of the table, or [`TableError::OutOfMemory`] where `clone` would abort.
    pub fn try_clone(&self) -> Result<Self, TableError> {
        let mut slots = Vec::new();
        slots
            .try_reserve_exact(self.slots.len())
            .map_err(|_| TableError::OutOfMemory {
                bytes: self.slots.len() * 2,
            })?;
        slots.extend_from_slice(&self.slots);
        Ok(Self {
            size: self.size,
            backends: self.backends.clone(),
            slots,
        })
    }

    /// Builds a table (allocating; see [`MaglevBuilder`] to reuse buffers).
    pub fn build(size: u32, backends: &[WeightedBackend]) -> Result<Self, TableError> {
        let mut table = Self::default();
        MaglevBuilder::default().build_into(size, backends, &mut table)?;
        Ok(table)
    }

    /// The table size M.
    #[must_use]
    pub fn size(&self) -> u32 {
        self.size
    }

    /// The backends, sorted by identity; slot values index into this.
    #[must_use]
    pub fn backends(&self) -> &[WeightedBackend] {
        &self.backends
    }

    /// The slots (empty when no backend has a weight above 0).
    #[must_use]
    pub fn slots(&self) -> &[u16] {
        &self.slots
    }

    /// Whether no backend can receive new flows.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The slot a flow hash falls in: `fast_range(hash, M)`.
    #[inline]
    #[must_use]
    pub fn slot_of(&self, flow_hash: u64) -> u32 {
        fast_range(flow_hash, self.size)
    }

    /// The index (into [`Self::backends`]) of the backend for a flow hash, or `None` when the
    /// table is empty. One multiply-shift and one load: this is the per-packet lookup.
    #[inline]
    #[must_use]
    pub fn lookup(&self, flow_hash: u64) -> Option<u16> {
        self.slots.get(self.slot_of(flow_hash) as usize).copied()
    }

    /// The backend for a flow hash, or `None` when the table is empty.
    #[inline]
    #[must_use]
    pub fn lookup_backend(&self, flow_hash: u64) -> Option<&WeightedBackend> {
        self.lookup(flow_hash)
            .map(|i| &self.backends[usize::from(i)])
    }

    /// Number of slots each backend holds, in the order of [`Self::backends`].
    #[must_use]
    pub fn slot_counts(&self) -> Vec<u32> {
        let mut counts = vec![0u32; self.backends.len()];
        for &s in &self.slots {
            counts[usize::from(s)] += 1;
        }
        counts
    }

    /// A 64-bit fingerprint of the mapping slot → backend identity: xxh3 (fixed seed) over
    /// `b"maglev-v1"`, M (u32 little-endian) and, for every slot in order, the identity bytes of
    /// its backend (family tag, then address). Two muxes with equal fingerprints send every flow
    /// hash to the same backend. It is computed on demand (about 0.1 ms at M = 65537).
    #[must_use]
    pub fn fingerprint(&self) -> u64 {
        let ids: Vec<([u8; 17], usize)> = self
            .backends
            .iter()
            .map(|b| {
                let mut buf = [0u8; 17];
                let len = b.id.write_bytes(&mut buf);
                (buf, len)
            })
            .collect();
        let mut hasher = Xxh3::with_seed(FINGERPRINT_SEED);
        hasher.update(b"maglev-v1");
        hasher.update(&self.size.to_le_bytes());
        let mut chunk = Vec::with_capacity(16 * 1024);
        for &s in &self.slots {
            let (bytes, len) = &ids[usize::from(s)];
            chunk.extend_from_slice(&bytes[..*len]);
            if chunk.len() > 16 * 1024 - 17 {
                hasher.update(&chunk);
                chunk.clear();
            }
        }
        hasher.update(&chunk);
        hasher.digest()
    }

    /// Compares this table (old) with `new`: which share of the flow-hash space now maps to a
    /// different backend, and which backends gain and lose. Exact, also when the sizes differ.
    #[must_use]
    pub fn diff(&self, new: &Self) -> TableDiff {
        TableDiff::between(self, new)
    }

    /// The backend owning hash-space interval `slot`, as an identity (`None`: empty table).
    fn owner(&self, slot: usize) -> Option<BackendId> {
        self.slots
            .get(slot)
            .map(|&i| self.backends[usize::from(i)].id)
    }

    /// Number of slots of the hash space `[0, 2^64)` as seen by `fast_range`: M, or 1 when empty.
    fn intervals(&self) -> usize {
        if self.slots.is_empty() {
            1
        } else {
            self.size as usize
        }
    }
}

/// First hash value that `fast_range` maps to `slot` of `m`: `ceil(slot · 2^64 / m)`.
fn interval_start(slot: usize, m: usize) -> u128 {
    ((slot as u128) << 64).div_ceil(m as u128)
}

/// How one backend's share of new flows changes between two tables.
#[derive(Clone, Debug, PartialEq)]
pub struct BackendChange {
    /// The backend.
    pub id: BackendId,
    /// Its share of the flow-hash space in the old table (0 if absent).
    pub old_share: f64,
    /// Its share in the new table (0 if absent).
    pub new_share: f64,
    /// Share of the hash space it receives in the new table from other backends.
    pub gained: f64,
    /// Share of the hash space it held in the old table and loses to other backends.
    pub lost: f64,
}

/// The difference between two tables, as shares of the flow-hash space (= shares of new flows).
#[derive(Clone, Debug, PartialEq)]
pub struct TableDiff {
    /// Size of the old table.
    pub old_size: u32,
    /// Size of the new table.
    pub new_size: u32,
    /// Slots whose backend changed, when both tables have the same size and are not empty.
    pub changed_slots: Option<u32>,
    /// Share of new flows that go to a different backend (0.0..=1.0).
    pub moved_fraction: f64,
    /// Every backend of either table, sorted by identity.
    pub backends: Vec<BackendChange>,
}

impl TableDiff {
    fn between(old: &MaglevTable, new: &MaglevTable) -> Self {
        #[derive(Default)]
        struct Mass {
            old: u128,
            new: u128,
            gained: u128,
            lost: u128,
        }
        let mut mass: BTreeMap<BackendId, Mass> = BTreeMap::new();
        for b in old.backends.iter().chain(&new.backends) {
            mass.entry(b.id).or_default();
        }
        // Merge the two partitions of [0, 2^64) into intervals with one owner in each table.
        let (m_old, m_new) = (old.intervals(), new.intervals());
        let (mut i, mut j, mut start, mut moved) = (0usize, 0usize, 0u128, 0u128);
        while i < m_old && j < m_new {
            let end_old = interval_start(i + 1, m_old);
            let end_new = interval_start(j + 1, m_new);
            let end = end_old.min(end_new);
            let len = end - start;
            let (a, b) = (old.owner(i), new.owner(j));
            if let Some(a) = a {
                mass.get_mut(&a).expect("every owner is registered").old += len;
            }
            if let Some(b) = b {
                mass.get_mut(&b).expect("every owner is registered").new += len;
            }
            if a != b {
                moved += len;
                if let Some(a) = a {
                    mass.get_mut(&a).expect("every owner is registered").lost += len;
                }
                if let Some(b) = b {
                    mass.get_mut(&b).expect("every owner is registered").gained += len;
                }
            }
            start = end;
            i += usize::from(end == end_old);
            j += usize::from(end == end_new);
        }
        let share = |x: u128| x as f64 / 2f64.powi(64);
        let changed_slots =
            (old.size == new.size && !old.is_empty() && !new.is_empty()).then(|| {
                old.slots
                    .iter()
                    .zip(&new.slots)
                    .filter(|&(&a, &b)| {
                        old.backends[usize::from(a)].id != new.backends[usize::from(b)].id
                    })
                    .count() as u32
            });
        Self {
            old_size: old.size,
            new_size: new.size,
            changed_slots,
            moved_fraction: share(moved),
            backends: mass
                .into_iter()
                .map(|(id, m)| BackendChange {
                    id,
                    old_share: share(m.old),
                    new_share: share(m.new),
                    gained: share(m.gained),
                    lost: share(m.lost),
                })
                .collect(),
        }
    }
}

/// Where the fill is: the next cursor in round-robin order and the slots still empty.
struct Turns {
    next: usize,
    remaining: u32,
    max_weight: u32,
}

/// Widest probe block: a cursor keeps `k·skip mod M` for k = 1..=BLOCK.
const BLOCK: usize = 16;

/// One backend's place in its permutation: the only state a probe touches.
#[derive(Clone, Copy, Debug)]
struct Cursor {
    /// `perm[j]` for the next `j` this backend will try.
    position: u32,
    /// `skip_multiples[k] = (k+1)·skip mod M`: the offsets of a probe block.
    skip_multiples: [u32; BLOCK],
}

/// Builds Maglev tables, keeping its scratch buffers (cursors, filled-slot bitmap, remaining
/// empty slots) between builds so that rebuilding allocates nothing once warm.
///
/// The per-backend state is split by use: the cursors are read on every turn, the weight
/// accumulators only when weights differ, the inverses only in the tail phase.
#[derive(Debug, Default)]
pub struct MaglevBuilder {
    /// One per backend with weight > 0, in identity order.
    cursors: Vec<Cursor>,
    /// Index into the sorted backend list of each cursor: the value written into slots.
    slot_values: Vec<u16>,
    /// Weight and accumulator of each cursor (Katran's `MaglevHashV2` rounds).
    weights: Vec<(u32, u32)>,
    /// `skip⁻¹ mod M` of each cursor, computed on its first turn in the tail phase (0: not yet).
    skip_inverses: Vec<u32>,
    /// Filled-slot bitmap (M bits: 8 KiB at M = 65537, within L1).
    filled: Vec<u64>,
    /// The slots still empty during the tail phase.
    empty_slots: Vec<u32>,
}

impl MaglevBuilder {
    /// Builds the table for `size` and `backends` into `table`, reusing `table`'s buffers.
    ///
    /// The result depends only on `size` and the set of backends, not on their order.
    pub fn build_into(
        &mut self,
        size: u32,
        backends: &[WeightedBackend],
        table: &mut MaglevTable,
    ) -> Result<(), TableError> {
        validate_sizes(size, backends)?;
        table.backends.clear();
        table.backends.extend_from_slice(backends);
        table.backends.sort_unstable_by_key(|b| b.id);
        if let Err(e) = check_unique(&table.backends) {
            *table = MaglevTable::default();
            return Err(e);
        }
        table.size = size;
        table.slots.clear();

        let m = size;
        self.cursors.clear();
        self.slot_values.clear();
        self.weights.clear();
        for (index, b) in table.backends.iter().enumerate() {
            if b.weight == 0 {
                continue;
            }
            let offset = (b.id.hash_with(MAGLEV_OFFSET_SEED) % u64::from(m)) as u32;
            let skip = (b.id.hash_with(MAGLEV_SKIP_SEED) % u64::from(m - 1)) as u32 + 1;
            let mut skip_multiples = [skip; BLOCK];
            for k in 1..BLOCK {
                let next = skip_multiples[k - 1] + skip;
                skip_multiples[k] = if next >= m { next - m } else { next };
            }
            self.cursors.push(Cursor {
                position: offset,
                skip_multiples,
            });
            self.slot_values.push(index as u16); // validate_sizes() bounds the count by MAX_BACKENDS
            self.weights.push((b.weight, 0));
        }
        if self.cursors.is_empty() {
            return Ok(());
        }
        // Allocation failure is an error, never an abort: a reload that does not fit in memory
        // is refused and the old snapshot keeps serving.
        let out_of_memory = |bytes: usize| TableError::OutOfMemory { bytes };
        let slots_more = (m as usize).saturating_sub(table.slots.len());
        table
            .slots
            .try_reserve_exact(slots_more)
            .map_err(|_| out_of_memory(m as usize * 2))?;
        table.slots.resize(m as usize, 0);
        // Zero the words M needs; below 2^20 slots keep the fixed capacity (see `Bitmap`).
        let words = (m as usize).div_ceil(64);
        let filled_words = if (m as usize) < FIXED_BITS {
            FIXED_BITS / 64
        } else {
            words
        };
        self.filled
            .try_reserve_exact(filled_words.saturating_sub(self.filled.len()))
            .map_err(|_| out_of_memory(filled_words * 8))?;
        self.filled.resize(filled_words, 0);
        self.filled[..words].fill(0);

        // The standard sizes get their own compiled loop: with M a constant, the wrap-around
        // compares and the tail's `mod M` are cheaper (measured: 1.6 ms -> 1.25 ms at N = 1000).
        match m {
            DEFAULT_TABLE_SIZE => self.fill(Fixed::<DEFAULT_TABLE_SIZE>, &mut table.slots),
            LARGE_TABLE_SIZE => self.fill(Fixed::<LARGE_TABLE_SIZE>, &mut table.slots),
            _ => self.fill(Dynamic::new(m), &mut table.slots),
        }
        Ok(())
    }

    /// Runs the rounds until every slot has a backend. `slots` has M entries.
    ///
    /// The fill runs as consecutive phases (probe blocks of 1, 4, 8 and 16, then the tail), each
    /// a loop compiled for its block width and for equal or unequal weights, so a turn makes
    /// no decision but its own probe. `next` carries the round-robin position across phases:
    /// the turn order is exactly that of one uninterrupted loop.
    fn fill<S: TableSize>(&mut self, size: S, slots: &mut [u16]) {
        let m = size.get();
        let max_weight = self.weights.iter().map(|&(w, _)| w).max().unwrap_or(1);
        let equal_weights = self.weights.iter().all(|&(w, _)| w == max_weight);
        // Slots left empty when the tail phase starts: its cost grows with the square of this.
        let tail_from = ((f64::from(m).sqrt() / 2.0) as u32).min(m);
        let mut turns = Turns {
            next: 0,
            remaining: m,
            max_weight,
        };
        let stops = [m / 2, m / 8, m / 32, tail_from].map(|stop| stop.max(tail_from));
        let mut filled = std::mem::take(&mut self.filled);
        if (m as usize) < FIXED_BITS && filled.len() >= FIXED_BITS / 64 {
            let fixed: &mut [u64; FIXED_BITS / 64] = (&mut filled[..FIXED_BITS / 64])
                .try_into()
                .expect("length checked above");
            self.probe_phases(size, slots, &mut turns, stops, equal_weights, fixed);
        } else {
            self.probe_phases(
                size,
                slots,
                &mut turns,
                stops,
                equal_weights,
                filled.as_mut_slice(),
            );
        }
        self.filled = filled;
        if equal_weights {
            self.tail_phase::<S, true>(size, slots, &mut turns);
        } else {
            self.tail_phase::<S, false>(size, slots, &mut turns);
        }
    }

    /// The probing phases: blocks of 1, 4, 8 and 16 until `stops[i]` slots remain empty.
    fn probe_phases<S: TableSize, B: Bitmap + ?Sized>(
        &mut self,
        size: S,
        slots: &mut [u16],
        turns: &mut Turns,
        stops: [u32; 4],
        equal_weights: bool,
        filled: &mut B,
    ) {
        if equal_weights {
            self.probe_phase::<1, S, B, true>(size, slots, turns, stops[0], filled);
            self.probe_phase::<4, S, B, true>(size, slots, turns, stops[1], filled);
            self.probe_phase::<8, S, B, true>(size, slots, turns, stops[2], filled);
            self.probe_phase::<BLOCK, S, B, true>(size, slots, turns, stops[3], filled);
        } else {
            self.probe_phase::<1, S, B, false>(size, slots, turns, stops[0], filled);
            self.probe_phase::<4, S, B, false>(size, slots, turns, stops[1], filled);
            self.probe_phase::<8, S, B, false>(size, slots, turns, stops[2], filled);
            self.probe_phase::<BLOCK, S, B, false>(size, slots, turns, stops[3], filled);
        }
    }

    /// Whether cursor `k` takes a turn in this round (always, when all weights are equal).
    #[inline]
    fn takes_turn<const EQUAL: bool>(&mut self, k: usize, max_weight: u32) -> bool {
        if EQUAL {
            return true;
        }
        let (weight, accumulator) = &mut self.weights[k];
        *accumulator += *weight;
        if *accumulator < max_weight {
            return false;
        }
        *accumulator -= max_weight;
        true
    }

    /// Claims slots by probing `W` positions per step until `stop` slots remain empty.
    fn probe_phase<const W: usize, S: TableSize, B: Bitmap + ?Sized, const EQUAL: bool>(
        &mut self,
        size: S,
        slots: &mut [u16],
        turns: &mut Turns,
        stop: u32,
        filled: &mut B,
    ) {
        let n = self.cursors.len();
        while turns.remaining > stop {
            let k = turns.next;
            turns.next = if k + 1 == n { 0 } else { k + 1 };
            if !self.takes_turn::<EQUAL>(k, turns.max_weight) {
                continue;
            }
            let slot = claim_by_probing::<W, S, B>(&mut self.cursors[k], filled, size);
            slots[slot as usize] = self.slot_values[k];
            turns.remaining -= 1;
        }
    }

    /// Claims the last slots without probing (see [`claim_in_tail`]).
    fn tail_phase<S: TableSize, const EQUAL: bool>(
        &mut self,
        size: S,
        slots: &mut [u16],
        turns: &mut Turns,
    ) {
        if turns.remaining == 0 {
            return;
        }
        self.start_tail(size.get());
        let n = self.cursors.len();
        while turns.remaining > 0 {
            let k = turns.next;
            turns.next = if k + 1 == n { 0 } else { k + 1 };
            if !self.takes_turn::<EQUAL>(k, turns.max_weight) {
                continue;
            }
            // Only the backends that take a turn here need their inverse: for N = 1000 about
            // 128 of them, each an extended Euclid (a chain of divisions).
            let c = &mut self.cursors[k];
            let inverse = &mut self.skip_inverses[k];
            if *inverse == 0 {
                *inverse = inverse_mod(c.skip_multiples[0], size.get());
            }
            let slot = claim_in_tail(c, *inverse, &mut self.empty_slots, size);
            slots[slot as usize] = self.slot_values[k];
            turns.remaining -= 1;
        }
    }

    /// Enters the tail phase: lists the empty slots and clears the inverses computed on demand.
    fn start_tail(&mut self, m: u32) {
        self.empty_slots.clear();
        for (w, &word) in self.filled[..(m as usize).div_ceil(64)].iter().enumerate() {
            let mut free = !word;
            while free != 0 {
                let slot = (w as u32) * 64 + free.trailing_zeros();
                if slot < m {
                    self.empty_slots.push(slot);
                }
                free &= free - 1;
            }
        }
        // 0 is never an inverse: it marks "not computed yet" (see fill).
        self.skip_inverses.clear();
        self.skip_inverses.resize(self.cursors.len(), 0);
    }
}

/// Bits of the fixed-capacity bitmap used for the standard sizes: 2^20 > 655373.
const FIXED_BITS: usize = 1 << 20;

/// The filled-slot bitmap as the probe loop sees it.
trait Bitmap {
    /// Bit `x` (0 or 1).
    fn bit(&self, x: u32) -> u32;
    /// Sets bit `x`.
    fn set(&mut self, x: u32);
}

/// Any length: indices are bounds-checked.
impl Bitmap for [u64] {
    #[inline(always)]
    fn bit(&self, x: u32) -> u32 {
        (self[(x >> 6) as usize] >> (x & 63)) as u32 & 1
    }
    #[inline(always)]
    fn set(&mut self, x: u32) {
        self[(x >> 6) as usize] |= 1u64 << (x & 63);
    }
}

/// 2^20 bits, for M < 2^20: masking the index (a no-op for `x < M`) proves it in bounds, so
/// the compiler drops the bounds check from every probe (measured: −8 % instructions).
impl Bitmap for [u64; FIXED_BITS / 64] {
    #[inline(always)]
    fn bit(&self, x: u32) -> u32 {
        let x = x as usize & (FIXED_BITS - 1);
        (self[x >> 6] >> (x & 63)) as u32 & 1
    }
    #[inline(always)]
    fn set(&mut self, x: u32) {
        let x = x as usize & (FIXED_BITS - 1);
        self[x >> 6] |= 1u64 << (x & 63);
    }
}

/// The table size M as the fill loop sees it: a compile-time constant for the standard sizes
/// ([`Fixed`]), or a runtime value with a precomputed reciprocal ([`Dynamic`]).
trait TableSize: Copy {
    /// M.
    fn get(self) -> u32;
    /// `x mod M`.
    fn reduce(self, x: u64) -> u64;
    /// `x mod M` for `x < 2M`.
    #[inline]
    fn wrap(self, x: u32) -> u32 {
        if x >= self.get() { x - self.get() } else { x }
    }
}

/// A table size known at compile time.
#[derive(Clone, Copy)]
struct Fixed<const M: u32>;

impl<const M: u32> TableSize for Fixed<M> {
    #[inline]
    fn get(self) -> u32 {
        M
    }
    #[inline]
    fn reduce(self, x: u64) -> u64 {
        x % u64::from(M)
    }
}

/// A table size known at run time.
#[derive(Clone, Copy)]
struct Dynamic {
    m: u32,
    modulus: StrengthReducedU64,
}

impl Dynamic {
    fn new(m: u32) -> Self {
        Self {
            m,
            modulus: StrengthReducedU64::new(u64::from(m)),
        }
    }
}

impl TableSize for Dynamic {
    #[inline]
    fn get(self) -> u32 {
        self.m
    }
    #[inline]
    fn reduce(self, x: u64) -> u64 {
        x % self.modulus
    }
}

/// Walks the backend's permutation to its next empty slot, `W` positions per step, marks it
/// filled and returns it. The `W` addresses of a step are independent (`position + k·skip`), so
/// their loads overlap, and the loop branches once per step; `W = 1` is plain probing.
#[inline(always)] // measured: calls cost 1.3 % of the build's instructions
fn claim_by_probing<const W: usize, S: TableSize, B: Bitmap + ?Sized>(
    c: &mut Cursor,
    filled: &mut B,
    size: S,
) -> u32 {
    let wrap = |x: u32| size.wrap(x);
    let is_filled = |filled: &B, x: u32| filled.bit(x);
    let mut pos = c.position;
    let slot = loop {
        let mut candidates = [pos; W];
        for (candidate, &offset) in candidates[1..].iter_mut().zip(&c.skip_multiples) {
            *candidate = wrap(pos + offset);
        }
        let mut taken = 0u32;
        for (k, &x) in candidates.iter().enumerate() {
            taken |= is_filled(filled, x) << k;
        }
        if taken != (1u32 << W) - 1 {
            break candidates[(!taken).trailing_zeros() as usize];
        }
        pos = wrap(pos + c.skip_multiples[W - 1]);
    };
    filled.set(slot);
    c.position = wrap(slot + c.skip_multiples[0]);
    slot
}

/// Finds the empty slot the backend's permutation reaches first without walking it: slot `e` is
/// `steps = (e − position)·skip⁻¹ mod M` steps away. Takes the nearest, removes it from
/// `empty_slots` and returns it.
#[inline]
fn claim_in_tail<S: TableSize>(
    c: &mut Cursor,
    skip_inverse: u32,
    empty_slots: &mut Vec<u32>,
    size: S,
) -> u32 {
    let m = size.get();
    let (mut best_at, mut best_steps) = (0usize, u64::MAX);
    for (at, &e) in empty_slots.iter().enumerate() {
        let distance = if e >= c.position {
            e - c.position
        } else {
            e + m - c.position
        };
        let steps = size.reduce(u64::from(distance) * u64::from(skip_inverse));
        if steps < best_steps {
            (best_at, best_steps) = (at, steps);
        }
    }
    let slot = empty_slots.swap_remove(best_at);
    // position + (steps + 1)·skip, all below M² < 2^48.
    let advanced = u64::from(c.position) + (best_steps + 1) * u64::from(c.skip_multiples[0]);
    c.position = size.reduce(advanced) as u32;
    slot
}

/// `a⁻¹ mod m` for prime `m` and `0 < a < m` (extended Euclid).
fn inverse_mod(a: u32, m: u32) -> u32 {
    let (mut old_r, mut r) = (i64::from(a), i64::from(m));
    let (mut old_s, mut s) = (1i64, 0i64);
    while r != 0 {
        let q = old_r / r;
        (old_r, r) = (r, old_r - q * r);
        (old_s, s) = (s, old_s - q * s);
    }
    debug_assert_eq!(old_r, 1, "{a} has no inverse mod {m}");
    old_s.rem_euclid(i64::from(m)) as u32
}

/// A table fingerprint as operators see it everywhere (`lb table`, `lb status`, metrics):
/// `0x` and 16 hex digits.
#[must_use]
pub fn fingerprint_hex(fingerprint: u64) -> String {
    format!("{fingerprint:#018x}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn v4(i: u32) -> BackendId {
        BackendId(IpAddr::V4(Ipv4Addr::from(0xc612_1500 + i)))
    }

    fn equal(n: u32) -> Vec<WeightedBackend> {
        (0..n)
            .map(|i| WeightedBackend {
                id: v4(i),
                weight: 1,
            })
            .collect()
    }

    /// The algorithm exactly as Katran's MaglevHashV2 writes it: `%` everywhere, a sentinel
    /// table, no tail phase. The fast builder must produce the same table.
    fn reference(size: u32, backends: &[WeightedBackend]) -> Vec<u16> {
        let mut sorted = backends.to_vec();
        sorted.sort_by_key(|b| b.id);
        let m = u64::from(size);
        let perm: Vec<(u64, u64)> = sorted
            .iter()
            .map(|b| {
                (
                    b.id.hash_with(MAGLEV_OFFSET_SEED) % m,
                    b.id.hash_with(MAGLEV_SKIP_SEED) % (m - 1) + 1,
                )
            })
            .collect();
        let max_weight = sorted.iter().map(|b| b.weight).max().unwrap_or(0);
        if max_weight == 0 {
            return Vec::new();
        }
        let mut next = vec![0u64; sorted.len()];
        let mut acc = vec![0u32; sorted.len()];
        let mut result = vec![u16::MAX; size as usize];
        let mut runs = 0;
        loop {
            for i in 0..sorted.len() {
                acc[i] += sorted[i].weight;
                if acc[i] < max_weight || sorted[i].weight == 0 {
                    continue;
                }
                acc[i] -= max_weight;
                let (offset, skip) = perm[i];
                let mut cur = (offset + next[i] * skip) % m;
                while result[cur as usize] != u16::MAX {
                    next[i] += 1;
                    cur = (offset + next[i] * skip) % m;
                }
                result[cur as usize] = i as u16;
                next[i] += 1;
                runs += 1;
                if runs == size {
                    return result;
                }
            }
        }
    }

    fn build(size: u32, backends: &[WeightedBackend]) -> MaglevTable {
        MaglevTable::build(size, backends).unwrap()
    }

    /// Pins the table: if this changes, two versions of `lb` disagree on where flows go.
    #[test]
    fn golden_fingerprint() {
        let table = build(DEFAULT_TABLE_SIZE, &equal(10));
        assert_eq!(
            table.fingerprint(),
            0x8d77_821c_22cf_b03c,
            "fingerprint changed: {:#x}",
            table.fingerprint()
        );
        assert_eq!(
            &table.slots()[..8],
            &[5, 8, 5, 2, 4, 6, 1, 6],
            "first slots changed: {:?}",
            &table.slots()[..8]
        );
    }

    #[test]
    fn empty_backend_list_gives_an_empty_table() {
        let table = build(DEFAULT_TABLE_SIZE, &[]);
        assert!(table.is_empty());
        assert_eq!(table.lookup(12345), None);
    }

    #[test]
    fn one_backend_gets_every_slot() {
        let table = build(7, &equal(1));
        assert_eq!(table.slot_counts(), vec![7]);
        assert_eq!(table.lookup(0), Some(0));
        assert_eq!(table.lookup(u64::MAX), Some(0));
    }

    #[test]
    fn all_weights_zero_gives_an_empty_table() {
        let backends: Vec<_> = equal(3)
            .into_iter()
            .map(|b| WeightedBackend { weight: 0, ..b })
            .collect();
        let table = build(13, &backends);
        assert!(table.is_empty());
        assert_eq!(table.backends().len(), 3);
    }

    #[test]
    fn validation_rejects_bad_input() {
        assert!(matches!(
            MaglevTable::build(65536, &equal(3)),
            Err(TableError::NotPrime {
                below: 65521,
                above: 65537,
                ..
            })
        ));
        assert!(matches!(
            MaglevTable::build(5, &equal(7)),
            Err(TableError::SmallerThanBackends { .. })
        ));
        assert!(matches!(
            MaglevTable::build(0, &equal(1)),
            Err(TableError::SizeOutOfRange { .. })
        ));
        assert!(matches!(
            MaglevTable::build(MAX_TABLE_SIZE + 2, &equal(1)),
            Err(TableError::SizeOutOfRange { .. })
        ));
        let mut dup = equal(3);
        dup.push(dup[1]);
        assert!(matches!(
            MaglevTable::build(13, &dup),
            Err(TableError::DuplicateBackend { .. })
        ));
        let heavy = [WeightedBackend {
            id: v4(1),
            weight: MAX_WEIGHT + 1,
        }];
        assert!(matches!(
            MaglevTable::build(13, &heavy),
            Err(TableError::WeightTooLarge { .. })
        ));
    }

    #[test]
    fn primes() {
        let small: Vec<u32> = (0..30).filter(|&n| is_prime(n)).collect();
        assert_eq!(small, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]);
        assert!(
            is_prime(DEFAULT_TABLE_SIZE) && is_prime(LARGE_TABLE_SIZE) && is_prime(MAX_TABLE_SIZE)
        );
        assert_eq!(nearest_primes(65536), (65521, 65537));
    }

    #[test]
    fn inverse_is_an_inverse() {
        for m in [7u32, 65537, 655_373] {
            for a in [1, 2, 3, m / 2, m - 1] {
                assert_eq!(
                    u64::from(a) * u64::from(inverse_mod(a, m)) % u64::from(m),
                    1
                );
            }
        }
    }

    #[test]
    fn builder_reuses_buffers_and_matches_fresh_builds() {
        let mut builder = MaglevBuilder::default();
        let mut table = MaglevTable::default();
        for n in [100, 3, 1000, 7] {
            builder
                .build_into(DEFAULT_TABLE_SIZE, &equal(n), &mut table)
                .unwrap();
            assert_eq!(table, build(DEFAULT_TABLE_SIZE, &equal(n)));
        }
    }

    /// The standard sizes run a loop compiled for a constant M over the fixed-capacity bitmap;
    /// it must build exactly what the runtime-M loop builds over a bounds-checked bitmap of
    /// exactly M bits.
    #[test]
    fn fixed_size_loops_match_the_runtime_loop() {
        for (m, n) in [
            (DEFAULT_TABLE_SIZE, 10),
            (DEFAULT_TABLE_SIZE, 1000),
            (LARGE_TABLE_SIZE, 100),
        ] {
            let fixed = build(m, &equal(n));
            let mut builder = MaglevBuilder::default();
            let mut table = MaglevTable::default();
            builder.build_into(m, &equal(n), &mut table).unwrap();
            let mut runtime = vec![0u16; m as usize];
            // A bitmap of exactly M bits: shorter than FIXED_BITS, so fill() takes the checked path.
            builder.filled = vec![0; (m as usize).div_ceil(64)];
            builder.cursors.clear();
            builder.weights.clear();
            builder.slot_values.clear();
            for (index, b) in table.backends().iter().enumerate() {
                let offset = (b.id.hash_with(MAGLEV_OFFSET_SEED) % u64::from(m)) as u32;
                let skip = (b.id.hash_with(MAGLEV_SKIP_SEED) % u64::from(m - 1)) as u32 + 1;
                let skip_multiples = std::array::from_fn(|k| {
                    (u64::from(skip) * (k as u64 + 1) % u64::from(m)) as u32
                });
                builder.cursors.push(Cursor {
                    position: offset,
                    skip_multiples,
                });
                builder.slot_values.push(index as u16);
                builder.weights.push((b.weight, 0));
            }
            builder.fill(Dynamic::new(m), &mut runtime);
            assert_eq!(fixed.slots(), runtime.as_slice(), "M={m} N={n}");
        }
    }

    /// Sizes of 2^20 and more use the bounds-checked bitmap; compare with the reference there too.
    #[test]
    fn sizes_beyond_the_fixed_bitmap_match_the_reference() {
        const M: u32 = 1_048_583; // the first prime above 2^20
        assert!(is_prime(M) && M as usize > FIXED_BITS);
        let backends: Vec<_> = (0..4)
            .map(|i| WeightedBackend {
                id: v4(i),
                weight: 1 + i % 2,
            })
            .collect();
        assert_eq!(
            build(M, &backends).slots(),
            reference(M, &backends).as_slice()
        );
    }

    #[test]
    fn disruption_when_one_of_n_is_removed_matches_the_architecture_figures() {
        // ARCHITECTURE.md: 10.2 % (N=10), 1.58 % (N=100), 0.68 % (N=1000) at M=65537, within
        // the spread of hash choices.
        for (n, limit) in [(10u32, 0.115), (100, 0.02), (1000, 0.0085)] {
            let before = build(DEFAULT_TABLE_SIZE, &equal(n));
            let after = build(DEFAULT_TABLE_SIZE, &equal(n)[1..]);
            let diff = before.diff(&after);
            assert!(
                diff.moved_fraction <= limit,
                "N={n}: {}",
                diff.moved_fraction
            );
            assert!(
                diff.moved_fraction >= 1.0 / f64::from(n) - 1e-9,
                "N={n}: {}",
                diff.moved_fraction
            );
        }
    }

    #[test]
    fn diff_of_different_sizes_is_exact() {
        let a = build(7, &equal(1));
        let b = build(11, &equal(1));
        let d = a.diff(&b);
        assert_eq!(d.moved_fraction, 0.0);
        assert_eq!(d.changed_slots, None);
        let c = build(11, &equal(2)[1..]);
        assert!((a.diff(&c).moved_fraction - 1.0).abs() < 1e-12);
        let empty = build(11, &[]);
        let d = a.diff(&empty);
        assert!((d.moved_fraction - 1.0).abs() < 1e-12);
        assert!((d.backends[0].lost - 1.0).abs() < 1e-12);
    }

    #[test]
    fn diff_counts_changed_slots_and_shares() {
        let old = build(DEFAULT_TABLE_SIZE, &equal(4));
        let new = build(DEFAULT_TABLE_SIZE, &equal(5));
        let d = old.diff(&new);
        let changed = d.changed_slots.unwrap();
        assert!(
            (f64::from(changed) / f64::from(DEFAULT_TABLE_SIZE) - d.moved_fraction).abs() < 1e-4
        );
        let added = d.backends.iter().find(|b| b.id == v4(4)).unwrap();
        assert_eq!(added.old_share, 0.0);
        assert!(
            (added.gained - added.new_share).abs() < 1e-12,
            "a new backend gains all it has"
        );
        // Maglev is near-minimal: the newcomer takes about 1/5, a little moves between the others.
        assert!(added.gained <= d.moved_fraction && d.moved_fraction < added.gained + 0.02);
        let lost: f64 = d.backends.iter().map(|b| b.lost).sum();
        let gained: f64 = d.backends.iter().map(|b| b.gained).sum();
        assert!((lost - d.moved_fraction).abs() < 1e-9 && (gained - d.moved_fraction).abs() < 1e-9);
    }

    #[test]
    fn ipv6_and_mixed_backends_build() {
        let backends = [
            WeightedBackend {
                id: BackendId(IpAddr::V6(Ipv6Addr::LOCALHOST)),
                weight: 1,
            },
            WeightedBackend {
                id: BackendId("::ffff:127.0.0.1".parse().unwrap()),
                weight: 1,
            },
            WeightedBackend {
                id: BackendId(IpAddr::V4(Ipv4Addr::LOCALHOST)),
                weight: 1,
            },
        ];
        let table = build(101, &backends);
        assert_eq!(table.slots(), reference(101, &backends).as_slice());
        assert!(table.slot_counts().iter().all(|&c| c >= 33));
    }

    fn backend_set() -> impl Strategy<Value = Vec<WeightedBackend>> {
        prop::collection::btree_set(any::<u32>(), 1..40).prop_flat_map(|ids| {
            let n = ids.len();
            (Just(ids), prop::collection::vec(0u32..6, n)).prop_map(|(ids, weights)| {
                ids.into_iter()
                    .zip(weights)
                    .map(|(a, weight)| WeightedBackend {
                        id: BackendId(IpAddr::V4(Ipv4Addr::from(a))),
                        weight,
                    })
                    .collect()
            })
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn matches_reference_implementation(
            backends in backend_set(),
            size in prop::sample::select(vec![41u32, 257, 1031, 4099, 65537]),
        ) {
            prop_assume!(backends.len() <= size as usize);
            let (fast, slow) = (build(size, &backends), reference(size, &backends));
            prop_assert_eq!(fast.slots(), slow.as_slice());
        }

        #[test]
        fn equal_weights_give_floor_or_ceil_of_m_over_n(n in 1u32..=300) {
            let m = DEFAULT_TABLE_SIZE;
            let counts = build(m, &equal(n)).slot_counts();
            let (lo, hi) = (m / n, m.div_ceil(n));
            prop_assert!(counts.iter().all(|&c| c == lo || c == hi), "N={}: {:?}", n, counts);
        }

        #[test]
        fn weights_two_to_one_give_shares_within_one_percent(n in 1u32..=100) {
            // n backends of weight 2 and n of weight 1: each heavy one should get twice as much.
            let backends: Vec<_> = (0..2 * n)
                .map(|i| WeightedBackend { id: v4(i), weight: if i < n { 2 } else { 1 } })
                .collect();
            let counts = build(DEFAULT_TABLE_SIZE, &backends).slot_counts();
            let heavy: u32 = counts[..n as usize].iter().sum();
            let light: u32 = counts[n as usize..].iter().sum();
            let ratio = f64::from(heavy) / f64::from(light);
            prop_assert!((ratio / 2.0 - 1.0).abs() <= 0.01, "ratio {}", ratio);
        }

        #[test]
        fn order_of_backends_does_not_matter(backends in backend_set(), seed in any::<u64>()) {
            let mut shuffled = backends.clone();
            // A deterministic shuffle driven by the case's seed.
            shuffled.sort_by_key(|b| xxh3(&b.id.0.to_string().into_bytes(), seed));
            let a = build(1031, &backends);
            let b = build(1031, &shuffled);
            prop_assert_eq!(a.fingerprint(), b.fingerprint());
            prop_assert_eq!(a, b);
        }

        /// The issue asks for at most 1/N + 0.01 whenever M ≥ 100·N. Maglev itself exceeds that
        /// slightly where M/N is near 150: scanning every removal for N = 380..470 at M = 65537
        /// found a peak of 1/N + 0.01052 (N = 416, removing backend #180), and the literal
        /// reference implementation gives the same tables. The bound below is that measured peak
        /// plus a hair; the issue note reports the deviation.
        #[test]
        fn removing_one_of_n_moves_at_most_one_over_n_plus_one_percent(
            n in 2u32..=600,
            removed in any::<prop::sample::Index>(),
        ) {
            let m = if 100 * n <= DEFAULT_TABLE_SIZE { DEFAULT_TABLE_SIZE } else { LARGE_TABLE_SIZE };
            let all = equal(n);
            let mut fewer = all.clone();
            fewer.remove(removed.index(all.len()));
            let d = build(m, &all).diff(&build(m, &fewer));
            const MEASURED_PEAK_EXCESS: f64 = 0.0106;
            prop_assert!(d.moved_fraction <= 1.0 / f64::from(n) + MEASURED_PEAK_EXCESS, "N={}: moved {}", n, d.moved_fraction);
        }

        #[test]
        fn weight_zero_gets_no_slots(backends in backend_set()) {
            let table = build(1031, &backends);
            for (b, count) in table.backends().iter().zip(table.slot_counts()) {
                prop_assert!(b.weight > 0 || count == 0);
                prop_assert!(b.weight == 0 || count > 0, "weight {} got no slot", b.weight);
            }
        }

        #[test]
        fn a_single_backend_gets_every_slot(id in any::<u32>(), weight in 1u32..=MAX_WEIGHT) {
            let table = build(4099, &[WeightedBackend { id: BackendId(IpAddr::V4(Ipv4Addr::from(id))), weight }]);
            prop_assert_eq!(table.slot_counts(), vec![4099]);
        }

        #[test]
        fn lookup_agrees_with_slot_of(hash in any::<u64>()) {
            let table = build(1031, &equal(5));
            let slot = table.slot_of(hash) as usize;
            prop_assert_eq!(table.lookup(hash), Some(table.slots()[slot]));
        }
    }
}

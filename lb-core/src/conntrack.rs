//! [`ConnTable`]: the per-worker connection table of a mux (Maglev, NSDI 2016, §3.3), with
//! Ananta's trusted/untrusted split against SYN floods (Patel et al., SIGCOMM 2013, §3.3.2),
//! hardened against floods of spoofed flows that send more than one packet.
//!
//! It maps a [`FlowKey`] to the [`Tracked`] backend and VIP chosen for its first packet, so that a
//! connection keeps its backend while the Maglev table changes under it. One table per worker
//! thread, never shared: no locks, no atomics. Time is passed in by the caller (`now`, monotonic
//! nanoseconds); nothing here reads a clock.
//!
//! **Layout.** Set-associative: `capacity / 8` buckets of [`WAYS`] = 8 slots. The high bits of
//! the flow hash pick the bucket; its low 16 bits are a tag (0 means "empty slot"), kept in an
//! array apart from the entries, so a lookup reads one 16-byte tag group and compares a full key
//! only where the tag matches. A bucket rather than open addressing or cuckoo hashing because it
//! bounds the work per packet to one bucket, needs no tombstones and never rehashes (a rehash
//! would allocate), and lets the eviction choice be local, an approximate LRU like Katran's
//! per-CPU LRU map. The price is that an insert can find its bucket full before the table is:
//! it then gets [`InsertOutcome::Full`], which is harmless.
//!
//! **Why trust takes time.** The mux sees only the client-to-VIP direction (direct server
//! return), so it cannot see a handshake complete. Ananta trusts a flow at its second packet;
//! but a spoofed SYN followed by a spoofed ACK is two packets too, and a flood of such pairs
//! (57 kpps in the test battery) filled a 2048-slot table with *trusted* entries in 2 s and kept
//! it full for the 300 s TCP idle time: connections opened meanwhile were not tracked and broke
//! when a backend was added. What a burst of spoofed packets cannot show cheaply is a flow that
//! goes on: so a flow is *trusted* only at its [`TRUST_PACKETS`]th packet (3) *and* once
//! [`ConnTableConfig::trust_after`] (250 ms) has passed since its first packet. A spoofed
//! SYN+ACK pair never qualifies, whatever the rate; to earn trust, an attacker must keep state
//! for each flow and send again later, while its entries survive the eviction of untrusted
//! entries (below). 250 ms rather than seconds because every new flow spends that long
//! untrusted, and untrusted entries are the ones a flood can evict. The other defences rejected:
//! a new-flow rate cap (Katran's) keeps a flood from evicting tracked flows but leaves every flow
//! opened during it untracked; per-source-prefix quotas do nothing against sources spoofed at
//! random.
//!
//! **New entries.** An entry is *new* until its [`TRUST_PACKETS`]th packet: a flood's SYN or
//! SYN+ACK entries stay new, a real connection's stops being new at its first data (SYN, ACK,
//! data). New entries hold at most [`ConnTableConfig::new_percent`] of *each bucket* (default
//! 2 of 8 slots), are the first victims of a new flow (the least recently seen first), and
//! expire after [`ConnTableConfig::new_idle`] (10 s). A quota per bucket, not over the whole
//! table: a flood spreads over every bucket, and a table-wide quota, once a flood had spent it,
//! left a new flow whose bucket held no new entry nothing to evict. So a flood of pairs cycles
//! only the new slots of each bucket, while a real connection, once it has sent its first data,
//! leaves them and waits for its trust in the other slots, where only a bucket with no free slot
//! and no new entry evicts it (the least recently seen untrusted entry goes). An untrusted entry
//! that is no longer new expires after its protocol's idle time, like a trusted one: a
//! keep-alive connection that went quiet within `trust_after` keeps its backend as long as it
//! did before, unless new flows need its slot.
//!
//! **Trusted entries** are evicted for a new flow only under pressure: when the flow's bucket
//! has no free slot and no untrusted entry, the trusted entry idle longest goes, but only if it
//! has been idle for at least [`ConnTableConfig::trusted_evict_idle`] (5 s). A flow that sends at
//! least one packet every 5 s is never evicted; an attacker who did earn trust must keep
//! refreshing each entry to keep its slot, and cannot hold a table's trusted slots for the TCP
//! idle time with one burst.
//!
//! **Insert policy**, within the flow's bucket: update the key's live entry if there is one;
//! otherwise, if the bucket's new-entry quota has room, take an empty slot, then the slot of an
//! expired entry; otherwise evict an untrusted entry as above (a new one when the quota is
//! spent); otherwise (quota room left) the idle trusted entry as above; otherwise
//! [`InsertOutcome::Full`]. Every insert also reclaims the
//! expired entries of one more bucket, round robin, so stale entries stop holding slots within
//! `capacity / 8` inserts.
//!
//! **Invariants.**
//! - The capacity is fixed by [`ConnTable::new`], the only function that allocates.
//! - At most `capacity` entries, at most [`ConnTable::new_per_bucket`] new ones in a bucket (so
//!   at most [`ConnTable::new_max`] in all).
//! - No insert evicts a trusted entry seen within `trusted_evict_idle`, and no flow sending
//!   packets only within `trust_after` of its first becomes trusted: such a flood, at any rate,
//!   never breaks an established flow this table tracks that is active.
//! - While a bucket holds a new entry, no insert evicts an untrusted entry that is not new: a
//!   flood of SYN+ACK pairs never evicts a connection that has sent its first data.
//! - A new flow finds a slot unless its bucket holds [`WAYS`] trusted entries all seen within
//!   `trusted_evict_idle`.
//! - A full table never costs a packet: on [`InsertOutcome::Full`] the caller forwards the packet
//!   by pure Maglev hashing, which gives the same backend as long as the Maglev table is unchanged.
//! - [`ConnTable::occupancy`] is O(1): the counts are kept as entries come and go.

use std::fmt;
use std::time::Duration;

use crate::flow::{FlowKey, PROTO_TCP, PROTO_UDP};

/// Slots per bucket. Their 16-bit tags make a 16-byte group, a quarter of a cache line.
pub const WAYS: usize = 8;
/// The largest capacity: 2^26 slots, about 3.8 GiB per worker. Larger requests are clamped.
pub const MAX_CAPACITY: usize = 1 << 26;

/// Tag of an empty slot. Occupied slots have a tag of at least 1.
const EMPTY_TAG: u16 = 0;
/// The packets a flow must have sent (this one included) to be trusted, the last at least
/// [`ConnTableConfig::trust_after`] after the first. Untrusted entries with fewer are the first
/// victims of a new flow and expire after [`ConnTableConfig::new_idle`].
pub const TRUST_PACKETS: u8 = 3;

/// Sizing, idle timeouts, trust and the untrusted quota of a [`ConnTable`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnTableConfig {
    /// Slots per worker; rounded up to a power of two, at least [`WAYS`] and at most
    /// [`MAX_CAPACITY`]. Default 262 144 (2^18, about 15 MiB per worker).
    pub capacity: usize,
    /// Idle time after which a trusted TCP entry expires. Default 300 s.
    pub tcp_idle: Duration,
    /// Idle time after which a trusted UDP entry expires. Default 30 s.
    pub udp_idle: Duration,
    /// Idle time after which a trusted entry of any other protocol expires. Default 30 s.
    pub other_idle: Duration,
    /// Idle time after which a *new* entry (fewer than [`TRUST_PACKETS`] packets) expires, if its
    /// protocol's timeout is not shorter. Default 10 s: a flooded SYN frees its slot soon, and a
    /// real client's next packets come well within it.
    pub new_idle: Duration,
    /// The share of each bucket's slots new entries may hold, in percent, rounded down to whole
    /// slots of the [`WAYS`] and clamped to 1..=8 slots. Default 25: 2 slots of 8.
    pub new_percent: u8,
    /// How long after its first packet a flow's [`TRUST_PACKETS`]th (or later) packet must come
    /// for the flow to be trusted. Default 250 ms (see the module docs).
    pub trust_after: Duration,
    /// A trusted entry idle for at least this long may be evicted to make room for a new flow
    /// when its bucket has no free slot and no untrusted entry. Default 5 s.
    ///
    /// The table's defaults are not in the config file: `node.conntrack_capacity` is.
    pub trusted_evict_idle: Duration,
}

impl Default for ConnTableConfig {
    fn default() -> Self {
        Self {
            capacity: 1 << 18,
            tcp_idle: Duration::from_secs(300),
            udp_idle: Duration::from_secs(30),
            other_idle: Duration::from_secs(30),
            new_idle: Duration::from_secs(10),
            new_percent: 25,
            trust_after: Duration::from_millis(250),
            trusted_evict_idle: Duration::from_secs(5),
        }
    }
}

/// What the table remembers of a flow: the backend and VIP chosen for its first packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tracked {
    /// Index of the backend in the VIP's backend list.
    pub backend: u16,
    /// Index of the VIP.
    pub vip: u16,
    /// A tag of the backend's address (`snapshot::backend_tag`): a reload may renumber the
    /// backends, and the tag tells whether the index still names the same one.
    pub backend_tag: u32,
}

/// The result of [`ConnTable::insert`]. In every case the caller forwards the packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum InsertOutcome {
    /// The flow took an empty slot.
    Inserted,
    /// The flow was already tracked: its entry now holds the new [`Tracked`] and keeps its class.
    Replaced,
    /// The flow took the slot of another entry, of the class given.
    Evicted(Victim),
    /// No room in the flow's bucket: its [`WAYS`] slots hold trusted entries, all seen within
    /// [`ConnTableConfig::trusted_evict_idle`]. The flow is not tracked, and its packets are
    /// forwarded by pure Maglev hashing.
    Full,
}

/// The class of an entry evicted by [`ConnTable::insert`]. A trusted entry seen within
/// [`ConnTableConfig::trusted_evict_idle`] is never evicted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Victim {
    /// An entry (of either class) idle for longer than its timeout.
    Expired,
    /// A live untrusted entry of the bucket: a new one (fewer than [`TRUST_PACKETS`] packets) if
    /// there is one, the least recently seen.
    Untrusted,
    /// The trusted entry of the bucket idle longest, idle for at least
    /// [`ConnTableConfig::trusted_evict_idle`], in a bucket with no free slot and no untrusted
    /// entry.
    IdleTrusted,
}

/// Event counters of one [`ConnTable`]; sum them over the workers on scrape.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnCounters {
    /// Lookups that found a live entry.
    pub hits: u64,
    /// Lookups that found no live entry.
    pub misses: u64,
    /// New entries placed: [`InsertOutcome::Inserted`] and [`InsertOutcome::Evicted`].
    pub inserts: u64,
    /// Inserts of a flow already tracked ([`InsertOutcome::Replaced`]).
    pub replacements: u64,
    /// Live untrusted entries evicted to make room for a new flow.
    pub evictions_untrusted: u64,
    /// Idle trusted entries evicted to make room for a new flow ([`Victim::IdleTrusted`]).
    pub evictions_idle_trusted: u64,
    /// Expired entries freed, whether found by a lookup, an insert or the background sweep.
    pub evictions_expired: u64,
    /// Inserts that found no room ([`InsertOutcome::Full`]): fallbacks to pure Maglev hashing.
    pub full: u64,
    /// Untrusted entries promoted to trusted (see [`TRUST_PACKETS`]).
    pub promotions: u64,
}

/// How many slots a [`ConnTable`] uses, by class. Expired entries count until they are freed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Occupancy {
    /// Trusted entries: flows that have sent [`TRUST_PACKETS`] packets over at least
    /// [`ConnTableConfig::trust_after`].
    pub trusted: usize,
    /// Untrusted entries: flows that have not (yet).
    pub untrusted: usize,
    /// Total slots.
    pub capacity: usize,
}

#[derive(Clone, Copy)]
struct Entry {
    key: FlowKey,
    tracked: Tracked,
    /// `now` of the flow's first packet, in nanoseconds.
    first_seen: u64,
    /// `now` of the last packet seen, in nanoseconds.
    last_seen: u64,
    /// Packets seen, saturating at 255.
    packets: u8,
    trusted: bool,
}

impl Entry {
    /// Whether it has sent [`TRUST_PACKETS`] packets: no longer *new* (the first victims, under a
    /// quota, with a short idle time).
    #[inline]
    fn active(&self) -> bool {
        self.packets >= TRUST_PACKETS
    }
}

/// Idle timeouts and trust delays in nanoseconds.
#[derive(Clone, Copy, Debug)]
struct Timeouts {
    tcp: u64,
    udp: u64,
    other: u64,
    new: u64,
    trust_after: u64,
    trusted_evict_idle: u64,
}

impl Timeouts {
    fn new(config: &ConnTableConfig) -> Self {
        let ns = crate::time::nanos;
        Self {
            tcp: ns(config.tcp_idle),
            udp: ns(config.udp_idle),
            other: ns(config.other_idle),
            new: ns(config.new_idle),
            trust_after: ns(config.trust_after),
            trusted_evict_idle: ns(config.trusted_evict_idle),
        }
    }

    /// The idle time after which an entry of this protocol expires: its protocol's, or for an
    /// entry of fewer than [`TRUST_PACKETS`] packets (never trusted), at most the untrusted one.
    #[inline]
    fn idle_limit(&self, protocol: u8, active: bool) -> u64 {
        let limit = match protocol {
            PROTO_TCP => self.tcp,
            PROTO_UDP => self.udp,
            _ => self.other,
        };
        if active { limit } else { limit.min(self.new) }
    }

    /// Whether the entry has been idle for longer than its timeout.
    #[inline]
    fn expired(&self, entry: &Entry, now: u64) -> bool {
        now.saturating_sub(entry.last_seen) > self.idle_limit(entry.key.protocol(), entry.active())
    }
}

/// A fixed-capacity, set-associative connection table for one worker (see the module docs).
pub struct ConnTable {
    /// One tag per slot, [`EMPTY_TAG`] when the slot is empty.
    tags: Vec<u16>,
    /// One entry per slot, `None` exactly when the tag is [`EMPTY_TAG`].
    entries: Vec<Option<Entry>>,
    /// `64 - log2(buckets)`: the bucket is `hash >> shift` (64, meaning bucket 0, for one bucket).
    shift: u32,
    timeouts: Timeouts,
    /// New entries a bucket may hold.
    new_per_bucket: usize,
    trusted: usize,
    untrusted: usize,
    /// Next bucket the insert-time sweep visits.
    sweep_cursor: usize,
    counters: ConnCounters,
}

impl ConnTable {
    /// The bytes a table of `capacity` slots allocates (after the rounding [`ConnTable::new`]
    /// does), for the config's memory estimate.
    #[must_use]
    pub fn memory_bytes(capacity: usize) -> u64 {
        let slots = capacity.clamp(WAYS, MAX_CAPACITY).next_power_of_two();
        (slots * (size_of::<u16>() + size_of::<Option<Entry>>())) as u64
    }

    /// A table of `config.capacity` slots rounded up to a power of two (see
    /// [`ConnTableConfig::capacity`]). This is the only allocation the table ever makes.
    #[must_use]
    pub fn new(config: ConnTableConfig) -> Self {
        let capacity = config
            .capacity
            .clamp(WAYS, MAX_CAPACITY)
            .next_power_of_two();
        let buckets = capacity / WAYS;
        let percent = usize::from(config.new_percent.clamp(1, 100));
        Self {
            tags: vec![EMPTY_TAG; capacity],
            entries: vec![None; capacity],
            shift: 64 - buckets.trailing_zeros(),
            timeouts: Timeouts::new(&config),
            new_per_bucket: (WAYS * percent / 100).max(1),
            trusted: 0,
            untrusted: 0,
            sweep_cursor: 0,
            counters: ConnCounters::default(),
        }
    }

    /// First slot of the flow's bucket, and the flow's tag.
    #[inline]
    fn locate(&self, hash: u64) -> (usize, u16) {
        // The bucket index is below 2^26 / WAYS, so it fits in a usize.
        let bucket = hash.checked_shr(self.shift).unwrap_or(0) as usize;
        // The low 16 bits, apart from the high bits of the bucket; 0 is kept for empty slots.
        let tag = (hash as u16).max(1);
        (bucket * WAYS, tag)
    }

    /// The backend and VIP of a tracked flow, `hash` being `key.hash()`.
    ///
    /// A hit counts a packet of the flow, marks it seen at `now` and, if it was untrusted,
    /// promotes it to trusted when this is at least its [`TRUST_PACKETS`]th packet and
    /// [`ConnTableConfig::trust_after`] has passed since its first. An entry idle for longer than
    /// its timeout is freed and is a miss.
    pub fn lookup(&mut self, key: &FlowKey, hash: u64, now: u64) -> Option<Tracked> {
        let (base, tag) = self.locate(hash);
        for slot in base..base + WAYS {
            if self.tags[slot] != tag {
                continue;
            }
            let Some(entry) = &mut self.entries[slot] else {
                continue;
            };
            if entry.key != *key {
                continue;
            }
            if self.timeouts.expired(entry, now) {
                self.free(slot);
                self.counters.evictions_expired += 1;
                break;
            }
            entry.packets = entry.packets.saturating_add(1);
            entry.last_seen = entry.last_seen.max(now);
            if !entry.trusted
                && entry.active()
                && entry.last_seen - entry.first_seen >= self.timeouts.trust_after
            {
                entry.trusted = true;
                self.untrusted -= 1;
                self.trusted += 1;
                self.counters.promotions += 1;
            }
            self.counters.hits += 1;
            return Some(entry.tracked);
        }
        self.counters.misses += 1;
        None
    }

    /// Reads, without changing anything, what the lookups of these flow hashes will read: first
    /// each bucket's tags, then the entries whose tag matches. Called on a batch before its
    /// lookups, it has their cache misses overlap instead of taking them one packet after the
    /// other (with 1M flows the table is far larger than the caches). Returns a value made of
    /// what it read, for the caller to pass to `std::hint::black_box`, so the reads are kept.
    ///
    /// Plain reads, not prefetch instructions, which safe Rust does not have: each loop does so
    /// little that many reads are in flight at once.
    #[inline]
    #[must_use]
    pub fn touch(&self, hashes: &[u64]) -> u64 {
        let mut seen = 0u64;
        for &hash in hashes {
            let (base, _) = self.locate(hash);
            seen ^= u64::from(self.tags[base]);
        }
        for &hash in hashes {
            let (base, tag) = self.locate(hash);
            for slot in base..base + WAYS {
                if self.tags[slot] == tag
                    && let Some(entry) = &self.entries[slot]
                {
                    seen ^= entry.last_seen ^ u64::from(entry.tracked.backend_tag);
                }
            }
        }
        seen
    }

    /// Tracks a flow, `hash` being `key.hash()`, following the insert policy of the module docs.
    /// A new entry is untrusted, of one packet, seen at `now`. Whatever the outcome, the packet is
    /// forwarded.
    pub fn insert(&mut self, key: FlowKey, hash: u64, tracked: Tracked, now: u64) -> InsertOutcome {
        let (base, tag) = self.locate(hash);
        let mut empty = None;
        let mut reclaimed = None;
        let mut new_here = 0;
        // The untrusted victim: new entries (fewer than TRUST_PACKETS packets) first, then the
        // least recently seen.
        let mut untrusted_victim: Option<(usize, (bool, u64))> = None;
        let mut idle_trusted: Option<(usize, u64)> = None;
        for slot in base..base + WAYS {
            let Some(entry) = &mut self.entries[slot] else {
                empty = empty.or(Some(slot));
                continue;
            };
            if self.timeouts.expired(entry, now) {
                self.free(slot);
                self.counters.evictions_expired += 1;
                reclaimed = reclaimed.or(Some(slot));
                continue;
            }
            if self.tags[slot] == tag && entry.key == key {
                entry.tracked = tracked;
                entry.last_seen = entry.last_seen.max(now);
                self.counters.replacements += 1;
                self.sweep_next(now);
                return InsertOutcome::Replaced;
            }
            if entry.trusted {
                if now.saturating_sub(entry.last_seen) >= self.timeouts.trusted_evict_idle
                    && idle_trusted.is_none_or(|(_, seen)| entry.last_seen < seen)
                {
                    idle_trusted = Some((slot, entry.last_seen));
                }
            } else {
                new_here += usize::from(!entry.active());
                let rank = (entry.active(), entry.last_seen);
                if untrusted_victim.is_none_or(|(_, best)| rank < best) {
                    untrusted_victim = Some((slot, rank));
                }
            }
        }
        // Room for one more new entry. Without it, the victim is a new entry (there is one).
        let room = new_here < self.new_per_bucket;
        let choice = match (empty, reclaimed, untrusted_victim, idle_trusted) {
            (Some(slot), _, _, _) if room => Some((slot, InsertOutcome::Inserted)),
            (_, Some(slot), _, _) if room => Some((slot, InsertOutcome::Evicted(Victim::Expired))),
            (_, _, Some((slot, _)), _) => {
                self.free(slot);
                self.counters.evictions_untrusted += 1;
                Some((slot, InsertOutcome::Evicted(Victim::Untrusted)))
            }
            (_, _, None, Some((slot, _))) if room => {
                self.free(slot);
                self.counters.evictions_idle_trusted += 1;
                Some((slot, InsertOutcome::Evicted(Victim::IdleTrusted)))
            }
            _ => None,
        };
        let outcome = match choice {
            Some((slot, outcome)) => {
                self.tags[slot] = tag;
                self.entries[slot] = Some(Entry {
                    key,
                    tracked,
                    first_seen: now,
                    last_seen: now,
                    packets: 1,
                    trusted: false,
                });
                self.untrusted += 1;
                self.counters.inserts += 1;
                outcome
            }
            None => {
                self.counters.full += 1;
                InsertOutcome::Full
            }
        };
        self.sweep_next(now);
        outcome
    }

    /// Stops tracking a flow, `hash` being `key.hash()`. Returns whether it had an entry (live,
    /// or expired but not yet freed).
    pub fn remove(&mut self, key: &FlowKey, hash: u64) -> bool {
        let (base, tag) = self.locate(hash);
        for slot in base..base + WAYS {
            if self.tags[slot] == tag
                && let Some(entry) = &self.entries[slot]
                && entry.key == *key
            {
                self.free(slot);
                return true;
            }
        }
        false
    }

    /// The event counters.
    #[must_use]
    pub fn counters(&self) -> ConnCounters {
        self.counters
    }

    /// Slots used by each class, in O(1).
    #[must_use]
    pub fn occupancy(&self) -> Occupancy {
        Occupancy {
            trusted: self.trusted,
            untrusted: self.untrusted,
            capacity: self.capacity(),
        }
    }

    /// Total slots: the configured capacity, rounded up to a power of two.
    #[must_use]
    pub fn capacity(&self) -> usize {
        self.entries.len()
    }

    /// The most new entries (fewer than [`TRUST_PACKETS`] packets) a bucket holds at once.
    #[must_use]
    pub fn new_per_bucket(&self) -> usize {
        self.new_per_bucket
    }

    /// The most new entries the table holds at once: [`Self::new_per_bucket`] in each bucket.
    #[must_use]
    pub fn new_max(&self) -> usize {
        self.new_per_bucket * (self.capacity() / WAYS)
    }

    /// Empties a slot and updates the class counts.
    fn free(&mut self, slot: usize) {
        if let Some(entry) = self.entries[slot].take() {
            if entry.trusted {
                self.trusted -= 1;
            } else {
                self.untrusted -= 1;
            }
        }
        self.tags[slot] = EMPTY_TAG;
    }

    /// Frees the expired entries of the bucket under the sweep cursor, then advances it.
    fn sweep_next(&mut self, now: u64) {
        let base = self.sweep_cursor * WAYS;
        for slot in base..base + WAYS {
            if let Some(entry) = &self.entries[slot]
                && self.timeouts.expired(entry, now)
            {
                self.free(slot);
                self.counters.evictions_expired += 1;
            }
        }
        self.sweep_cursor = (self.sweep_cursor + 1) % (self.capacity() / WAYS);
    }
}

impl fmt::Debug for ConnTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnTable")
            .field("occupancy", &self.occupancy())
            .field("new_per_bucket", &self.new_per_bucket)
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;
    use std::net::Ipv4Addr;

    const SEC: u64 = 1_000_000_000;
    /// The default `trust_after`, in nanoseconds.
    const TRUST: u64 = 250_000_000;

    fn flow(i: u32, protocol: u8) -> FlowKey {
        FlowKey::v4(
            Ipv4Addr::from(0x0a00_0000 + i),
            Ipv4Addr::new(198, 18, 100, 1),
            protocol,
            40_000 + (i % 20_000) as u16,
            80,
        )
    }

    fn tcp(i: u32) -> FlowKey {
        flow(i, PROTO_TCP)
    }

    fn to(backend: u16) -> Tracked {
        Tracked {
            backend,
            vip: 7,
            backend_tag: u32::from(backend),
        }
    }

    fn table(capacity: usize) -> ConnTable {
        ConnTable::new(ConnTableConfig {
            capacity,
            ..ConnTableConfig::default()
        })
    }

    /// A table of one bucket, so that every flow competes for the same 8 slots.
    fn one_bucket(new_percent: u8) -> ConnTable {
        ConnTable::new(ConnTableConfig {
            capacity: WAYS,
            new_percent,
            ..ConnTableConfig::default()
        })
    }

    fn insert(t: &mut ConnTable, k: FlowKey, tracked: Tracked, now: u64) -> InsertOutcome {
        t.insert(k, k.hash(), tracked, now)
    }

    fn lookup(t: &mut ConnTable, k: FlowKey, now: u64) -> Option<Tracked> {
        t.lookup(&k, k.hash(), now)
    }

    /// Inserts a flow and sees two more of its packets, the last `TRUST` later, so that it is
    /// trusted; it is last seen at `now + TRUST`.
    fn establish(t: &mut ConnTable, k: FlowKey, tracked: Tracked, now: u64) -> bool {
        insert(t, k, tracked, now) != InsertOutcome::Full
            && lookup(t, k, now) == Some(tracked)
            && lookup(t, k, now + TRUST) == Some(tracked)
    }

    /// Counts the classes by walking every slot, and checks tags and entries agree.
    fn brute_force(t: &ConnTable) -> Occupancy {
        let (mut trusted, mut untrusted) = (0, 0);
        for (tag, entry) in t.tags.iter().zip(&t.entries) {
            assert_eq!(*tag == EMPTY_TAG, entry.is_none());
            match entry {
                Some(e) if e.trusted => trusted += 1,
                Some(_) => untrusted += 1,
                None => {}
            }
        }
        Occupancy {
            trusted,
            untrusted,
            capacity: t.entries.len(),
        }
    }

    /// New entries (fewer than TRUST_PACKETS packets), by walking every slot.
    fn new_entries(t: &ConnTable) -> usize {
        t.entries.iter().flatten().filter(|e| !e.active()).count()
    }

    #[test]
    fn capacity_rounds_up_to_a_power_of_two() {
        assert_eq!(table(1000).capacity(), 1024);
        assert_eq!(table(1024).capacity(), 1024);
        assert_eq!(table(0).capacity(), WAYS);
        assert_eq!(table(usize::MAX).capacity(), MAX_CAPACITY);
        assert_eq!(table(1000).new_max(), 256);
        assert_eq!(one_bucket(0).new_max(), 1);
        assert_eq!(one_bucket(200).new_max(), WAYS);
    }

    #[test]
    fn entries_are_compact() {
        // The key's enum tag gives `Option` a niche: an empty slot costs nothing extra. One
        // cache line.
        assert!(
            size_of::<Option<Entry>>() <= 64,
            "{}",
            size_of::<Option<Entry>>()
        );
    }

    #[test]
    fn insert_then_lookup_hits_and_remove_forgets() {
        let mut t = table(1024);
        let (a, b) = (tcp(1), tcp(2));
        assert_eq!(insert(&mut t, a, to(3), 0), InsertOutcome::Inserted);
        assert_eq!(lookup(&mut t, a, 1), Some(to(3)));
        assert_eq!(lookup(&mut t, b, 1), None);
        assert_eq!(insert(&mut t, a, to(4), 2), InsertOutcome::Replaced);
        assert_eq!(lookup(&mut t, a, 3), Some(to(4)));
        assert!(t.remove(&a, a.hash()));
        assert!(!t.remove(&a, a.hash()));
        assert!(!t.remove(&b, b.hash()));
        assert_eq!(lookup(&mut t, a, 4), None);
        assert_eq!(t.occupancy(), brute_force(&t));
        assert_eq!(t.occupancy().trusted + t.occupancy().untrusted, 0);
        let c = t.counters();
        assert_eq!((c.hits, c.misses, c.inserts, c.replacements), (2, 2, 1, 1));
    }

    #[test]
    fn a_tag_collision_does_not_return_another_flow() {
        // Same hash (so same bucket and tag) for two keys: only the full key compare tells them
        // apart.
        let mut t = one_bucket(100);
        let (a, b) = (tcp(1), tcp(2));
        assert_eq!(t.insert(a, 42, to(1), 0), InsertOutcome::Inserted);
        assert_eq!(t.lookup(&b, 42, 0), None);
        assert_eq!(t.insert(b, 42, to(2), 0), InsertOutcome::Inserted);
        assert_eq!(t.lookup(&a, 42, 0), Some(to(1)));
        assert_eq!(t.lookup(&b, 42, 0), Some(to(2)));
        assert!(t.remove(&a, 42));
        assert_eq!(t.lookup(&b, 42, 0), Some(to(2)));
    }

    #[test]
    fn tcp_and_udp_idle_timeouts() {
        let mut t = table(1024);
        let (tk, uk) = (tcp(1), flow(2, PROTO_UDP));
        let t0 = SEC;
        assert!(establish(&mut t, tk, to(1), t0));
        assert!(establish(&mut t, uk, to(2), t0));
        // UDP: 30 s, not before (the hits refresh both).
        let t1 = t0 + 30 * SEC;
        assert_eq!(lookup(&mut t, uk, t1), Some(to(2)));
        assert_eq!(lookup(&mut t, tk, t1), Some(to(1)));
        let t2 = t1 + 30 * SEC + 1;
        assert_eq!(lookup(&mut t, uk, t2), None);
        assert_eq!(lookup(&mut t, tk, t2), Some(to(1)));
        // TCP: 300 s.
        assert_eq!(lookup(&mut t, tk, t2 + 300 * SEC), Some(to(1)));
        assert_eq!(lookup(&mut t, tk, t2 + 600 * SEC + 1), None);
        assert_eq!(t.counters().evictions_expired, 2);
        assert_eq!(t.occupancy(), brute_force(&t));
        assert_eq!(t.occupancy().trusted, 0);
    }

    #[test]
    fn untrusted_entries_expire_sooner() {
        let mut t = table(1024);
        let (a, b) = (tcp(1), tcp(2));
        assert_eq!(insert(&mut t, a, to(1), 0), InsertOutcome::Inserted);
        assert_eq!(insert(&mut t, b, to(2), 0), InsertOutcome::Inserted);
        assert_eq!(lookup(&mut t, a, 10 * SEC), Some(to(1)));
        assert_eq!(lookup(&mut t, b, 10 * SEC + 1), None);
        // Two packets are not enough: `a` still expires after 10 s.
        assert_eq!(lookup(&mut t, a, 20 * SEC + 1), None);
        // A third packet (well after `trust_after`) makes it trusted: TCP's 300 s apply.
        assert_eq!(insert(&mut t, a, to(1), 30 * SEC), InsertOutcome::Inserted);
        assert_eq!(lookup(&mut t, a, 31 * SEC), Some(to(1)));
        assert_eq!(lookup(&mut t, a, 32 * SEC), Some(to(1)));
        assert_eq!(t.occupancy().trusted, 1);
        assert_eq!(lookup(&mut t, a, 232 * SEC), Some(to(1)));
    }

    #[test]
    fn an_expired_slot_is_reused() {
        let mut t = one_bucket(100);
        for i in 0..8 {
            assert!(establish(&mut t, tcp(i), to(i as u16), 0));
        }
        assert_eq!(insert(&mut t, tcp(100), to(9), SEC), InsertOutcome::Full);
        let later = TRUST + 300 * SEC + 1;
        assert_eq!(
            insert(&mut t, tcp(100), to(9), later),
            InsertOutcome::Evicted(Victim::Expired)
        );
        assert_eq!(lookup(&mut t, tcp(100), later), Some(to(9)));
        // The insert freed the other seven expired entries of the bucket too.
        assert_eq!(t.counters().evictions_expired, 8);
        assert_eq!(t.occupancy(), brute_force(&t));
        assert_eq!((t.occupancy().trusted, t.occupancy().untrusted), (0, 1));
    }

    #[test]
    fn the_sweep_frees_expired_entries_of_other_buckets() {
        let mut t = table(64);
        for i in 0..40 {
            insert(&mut t, tcp(i), to(1), 0);
        }
        assert!(t.occupancy().untrusted > 8, "{:?}", t.occupancy());
        // 8 buckets: 8 inserts of one flow later, the sweep has visited them all.
        for now in 0..8 {
            insert(&mut t, tcp(1000), to(2), 11 * SEC + now);
        }
        assert_eq!(t.occupancy().untrusted, 1);
        assert_eq!(t.occupancy(), brute_force(&t));
    }

    #[test]
    fn trust_needs_a_third_packet_after_trust_after() {
        let mut t = table(1024);
        let k = tcp(1);
        insert(&mut t, k, to(1), 0);
        assert_eq!((t.occupancy().trusted, t.occupancy().untrusted), (0, 1));
        // A spoofed SYN+ACK: two packets, however far apart, are not trusted.
        assert_eq!(lookup(&mut t, k, 5 * SEC), Some(to(1)));
        assert_eq!((t.occupancy().trusted, t.occupancy().untrusted), (0, 1));
        // Three packets within `trust_after` are not either.
        let quick = tcp(2);
        insert(&mut t, quick, to(1), 0);
        for now in [1, TRUST - 1] {
            assert_eq!(lookup(&mut t, quick, now), Some(to(1)));
        }
        assert_eq!(t.counters().promotions, 0);
        // The third packet `trust_after` after the first is.
        assert_eq!(lookup(&mut t, quick, TRUST), Some(to(1)));
        assert_eq!(lookup(&mut t, k, 5 * SEC + 1), Some(to(1)));
        assert_eq!((t.occupancy().trusted, t.occupancy().untrusted), (2, 0));
        assert_eq!(lookup(&mut t, k, 5 * SEC + 2), Some(to(1)));
        assert_eq!(t.counters().promotions, 2);
        // A replaced entry keeps its class.
        assert_eq!(insert(&mut t, k, to(2), 6 * SEC), InsertOutcome::Replaced);
        assert_eq!((t.occupancy().trusted, t.occupancy().untrusted), (2, 0));
        assert_eq!(t.occupancy(), brute_force(&t));
    }

    #[test]
    fn untrusted_entries_of_three_packets_keep_their_protocol_idle_time() {
        // A keep-alive connection that went quiet within `trust_after` is not trusted, but it is
        // no flood either: it keeps TCP's 300 s.
        let mut t = table(1024);
        let k = tcp(1);
        insert(&mut t, k, to(1), 0);
        lookup(&mut t, k, 1);
        lookup(&mut t, k, 2);
        assert_eq!(t.occupancy().untrusted, 1);
        assert_eq!(lookup(&mut t, k, 2 + 300 * SEC), Some(to(1)));
        assert_eq!(lookup(&mut t, k, 3 + 600 * SEC), None);
    }

    #[test]
    fn hits_keep_a_flow_alive() {
        let mut t = table(1024);
        let k = flow(1, PROTO_UDP);
        assert!(establish(&mut t, k, to(1), 0));
        for s in (20..=2000).step_by(20) {
            assert_eq!(lookup(&mut t, k, s * SEC), Some(to(1)), "at {s} s");
        }
    }

    #[test]
    fn trusted_entries_are_never_evicted_and_the_oldest_untrusted_is() {
        let mut t = one_bucket(100);
        for i in 0..6 {
            assert!(establish(&mut t, tcp(i), to(1), 0));
        }
        let t0 = TRUST;
        assert_eq!(
            insert(&mut t, tcp(10), to(2), t0 + 1),
            InsertOutcome::Inserted
        );
        assert_eq!(
            insert(&mut t, tcp(11), to(2), t0 + 2),
            InsertOutcome::Inserted
        );
        assert_eq!(
            insert(&mut t, tcp(12), to(3), t0 + 3),
            InsertOutcome::Evicted(Victim::Untrusted)
        );
        assert_eq!(
            lookup(&mut t, tcp(10), t0 + 4),
            None,
            "the oldest untrusted goes"
        );
        for now in [t0 + 4, t0 + 4 + TRUST] {
            assert_eq!(lookup(&mut t, tcp(11), now), Some(to(2)));
            assert_eq!(lookup(&mut t, tcp(12), now), Some(to(3)));
        }
        // Eight trusted entries now, all recently seen: no new flow gets in.
        let t1 = t0 + 5 + TRUST;
        assert_eq!(insert(&mut t, tcp(13), to(4), t1), InsertOutcome::Full);
        for i in (0..6).chain([11, 12]) {
            assert!(lookup(&mut t, tcp(i), t1).is_some(), "flow {i} evicted");
        }
        let c = t.counters();
        assert_eq!((c.evictions_untrusted, c.full), (1, 1));
    }

    #[test]
    fn the_untrusted_quota_holds_even_with_empty_slots() {
        let mut t = one_bucket(25); // 2 untrusted of 8
        assert_eq!(insert(&mut t, tcp(1), to(1), 0), InsertOutcome::Inserted);
        assert_eq!(insert(&mut t, tcp(2), to(1), 1), InsertOutcome::Inserted);
        assert_eq!(
            insert(&mut t, tcp(3), to(1), 2),
            InsertOutcome::Evicted(Victim::Untrusted)
        );
        assert_eq!(lookup(&mut t, tcp(1), 3), None);
        // Promoting both frees the quota; trusted entries do not count against it.
        for now in [3, 3 + TRUST] {
            assert!(lookup(&mut t, tcp(2), now).is_some());
            assert!(lookup(&mut t, tcp(3), now).is_some());
        }
        assert_eq!(t.occupancy().trusted, 2);
        assert_eq!(
            insert(&mut t, tcp(4), to(1), 4 + TRUST),
            InsertOutcome::Inserted
        );
        assert_eq!(
            insert(&mut t, tcp(5), to(1), 5 + TRUST),
            InsertOutcome::Inserted
        );
        assert_eq!(t.occupancy().untrusted, 2);
    }

    #[test]
    fn a_flood_cycles_only_the_untrusted_slots_of_a_bucket() {
        let mut t = one_bucket(25);
        assert!(establish(&mut t, tcp(1), to(1), 0));
        assert_eq!(insert(&mut t, tcp(2), to(1), 0), InsertOutcome::Inserted);
        assert_eq!(insert(&mut t, tcp(3), to(1), 0), InsertOutcome::Inserted);
        assert!(lookup(&mut t, tcp(2), 0).is_some());
        assert!(lookup(&mut t, tcp(2), TRUST).is_some());
        // Quota 2: one untrusted (3) left in the bucket; a flood only cycles that slot.
        assert_eq!(t.occupancy().untrusted, 1);
        assert_eq!(
            insert(&mut t, tcp(4), to(1), TRUST + 1),
            InsertOutcome::Inserted
        );
        for i in 5..50 {
            assert_eq!(
                insert(&mut t, tcp(i), to(1), TRUST + 2 + u64::from(i)),
                InsertOutcome::Evicted(Victim::Untrusted)
            );
        }
        assert_eq!(t.occupancy().untrusted, 2);
        assert_eq!(t.occupancy().trusted, 2);
    }

    /// Ananta's guarantee: new single-packet flows, however many, never evict an established one.
    #[test]
    fn syn_flood_never_evicts_established_flows() {
        let mut t = table(4096);
        let capacity = t.capacity() as u32;
        let mut established = Vec::new();
        for i in 0..capacity / 2 {
            let tracked = to((i % 100) as u16);
            if establish(&mut t, tcp(i), tracked, u64::from(i)) {
                established.push((tcp(i), tracked));
            }
        }
        assert!(
            established.len() > capacity as usize * 45 / 100,
            "only {} established",
            established.len()
        );
        let before = t.counters();
        let start = u64::from(capacity);
        for i in 0..20 * capacity {
            // Distinct flows from another address range; each sends one packet (a SYN), 1 µs apart.
            let syn = flow(1_000_000 + i, PROTO_TCP);
            insert(&mut t, syn, to(999), start + u64::from(i) * 1000);
            assert!(t.occupancy().untrusted <= t.new_max());
        }
        let now = start + u64::from(20 * capacity) * 1000;
        assert!(now < 10 * SEC, "the flood outlived the untrusted timeout");
        for (k, tracked) in &established {
            assert_eq!(lookup(&mut t, *k, now), Some(*tracked), "{k} lost");
        }
        let c = t.counters();
        assert!(c.full > before.full, "{c:?}");
        assert!(c.evictions_untrusted > before.evictions_untrusted, "{c:?}");
        assert_eq!(t.occupancy().trusted, established.len());
        assert_eq!(t.occupancy(), brute_force(&t));
    }

    #[test]
    fn an_idle_trusted_entry_makes_room_under_pressure_and_a_recent_one_does_not() {
        let mut t = one_bucket(25);
        for i in 0..8 {
            assert!(establish(&mut t, tcp(i), to(1), u64::from(i)));
        }
        let seen = TRUST + 7;
        // Every slot trusted and seen within 5 s: no room.
        assert_eq!(
            insert(&mut t, tcp(100), to(2), seen + 4 * SEC),
            InsertOutcome::Full
        );
        // Flows 1..8 stay active; flow 0 goes quiet.
        let later = seen + 6 * SEC;
        for i in 1..8 {
            assert!(lookup(&mut t, tcp(i), later).is_some());
        }
        assert_eq!(
            insert(&mut t, tcp(100), to(2), later),
            InsertOutcome::Evicted(Victim::IdleTrusted)
        );
        assert_eq!(lookup(&mut t, tcp(0), later), None, "the idle one went");
        for i in 1..8 {
            assert!(lookup(&mut t, tcp(i), later).is_some(), "flow {i}");
        }
        // No other trusted entry is idle: the next new flow takes the untrusted slot only.
        assert_eq!(
            insert(&mut t, tcp(101), to(2), later + 1),
            InsertOutcome::Evicted(Victim::Untrusted)
        );
        assert_eq!(t.counters().evictions_idle_trusted, 1);
        assert_eq!(t.occupancy(), brute_force(&t));
    }

    #[test]
    fn the_new_entry_quota_is_per_bucket() {
        // 2 untrusted slots in each of 8 buckets: every bucket, not only those a flood has not
        // reached yet, has room for a new flow.
        let mut t = table(64);
        assert_eq!((t.new_per_bucket(), t.new_max()), (2, 16));
        let mut now = 0;
        for i in 0..1000 {
            now += 1000;
            let outcome = insert(&mut t, tcp(i), to(1), now);
            assert_ne!(outcome, InsertOutcome::Full, "flow {i}");
            assert!(t.occupancy().untrusted <= 16);
        }
        assert_eq!(t.occupancy().untrusted, 16);
        for b in 0..8 {
            let untrusted = t.entries[b * WAYS..(b + 1) * WAYS]
                .iter()
                .flatten()
                .filter(|e| !e.active())
                .count();
            assert_eq!(untrusted, 2, "bucket {b}");
        }
    }

    /// What `syn_ack_flood` leaves: the table, the connections opened during the flood and those
    /// established before it (each with what it is tracked to), and the end of the flood.
    type Flooded = (
        ConnTable,
        Vec<(FlowKey, Tracked)>,
        Vec<(FlowKey, Tracked)>,
        u64,
    );

    /// A spoofed flood that sends a SYN then an ACK per flow, as the test battery did: `pairs` new
    /// flows a second for `seconds`, 1 µs between the SYN and the ACK. Meanwhile a real
    /// connection opens every `every` ns (SYN, then ACK and first data 100 µs and 200 µs later)
    /// and every open one sends a packet every `interval` ns. Before the flood, `before` flows
    /// were established, half of which stay quiet throughout. Returns the table, the real
    /// connections and the pre-flood ones (each with what it is tracked to), and the end.
    fn syn_ack_flood(
        capacity: usize,
        pairs: u64,
        seconds: u64,
        every: u64,
        interval: u64,
        before: u32,
        seed: u32,
    ) -> Flooded {
        let mut t = table(capacity);
        let mut established = Vec::new();
        for i in 0..before {
            let k = flow(i, PROTO_TCP);
            let tracked = to((i % 50) as u16);
            assert!(establish(&mut t, k, tracked, u64::from(i)), "{k}");
            established.push((k, tracked));
        }
        let start = 2 * TRUST;
        let end = start + seconds * SEC;
        let gap = SEC / pairs;
        let mut real: Vec<(FlowKey, Tracked, u64)> = Vec::new();
        let (mut next_real, mut next_flood, mut n) = (start, start, 0u32);
        while next_flood < end {
            let spoofed = FlowKey::v4(
                Ipv4Addr::from(0xc613_0000 ^ seed.wrapping_mul(0x9e37_79b9) ^ n),
                Ipv4Addr::new(198, 18, 100, 1),
                PROTO_TCP,
                1024 + (n % 60_000) as u16,
                80,
            );
            insert(&mut t, spoofed, to(999), next_flood);
            lookup(&mut t, spoofed, next_flood + 1000);
            n += 1;
            next_flood += gap;
            if next_flood >= next_real {
                let i = 500_000 + real.len() as u32;
                let k = flow(i, PROTO_TCP);
                let tracked = to(100 + real.len() as u16);
                insert(&mut t, k, tracked, next_real);
                lookup(&mut t, k, next_real + 100_000);
                lookup(&mut t, k, next_real + 200_000);
                real.push((k, tracked, next_real + 200_000));
                next_real += every;
            }
            for (k, tracked, last) in &mut real {
                if next_flood >= *last + interval {
                    *last = next_flood;
                    if lookup(&mut t, *k, next_flood).is_none() {
                        // As the forwarding decision does on a miss.
                        insert(&mut t, *k, *tracked, next_flood);
                    }
                }
            }
            for (k, _) in established.iter().skip(before as usize / 2) {
                // The active half of the pre-flood flows: a packet every `interval` too.
                if (next_flood / interval) != ((next_flood - gap) / interval) {
                    lookup(&mut t, *k, next_flood);
                }
            }
        }
        let real = real
            .into_iter()
            .map(|(k, tracked, _)| (k, tracked))
            .collect();
        (t, real, established, end)
    }

    /// Issue 12, item 5: SYN+ACK pairs from spoofed sources must neither fill the table with
    /// trusted entries nor keep the connections opened during the flood from being tracked, and
    /// the connections established before it stay untouched.
    #[test]
    fn a_spoofed_syn_ack_flood_leaves_new_flows_tracked_and_old_ones_untouched() {
        // 57 kpps (28 500 pairs a second) for 3 s into 2048 slots, as the battery did; a real
        // connection every 100 ms, each sending every 200 ms.
        let (mut t, real, established, end) =
            syn_ack_flood(2048, 28_500, 3, SEC / 10, SEC / 5, 200, 0);
        assert!((30..=31).contains(&real.len()), "{}", real.len());
        let c = t.counters();
        assert!(c.inserts > 80_000, "{c:?}");
        // The flood never earned trust: only the real flows and the pre-flood ones did.
        assert!(
            t.occupancy().trusted <= established.len() + real.len(),
            "{:?}",
            t.occupancy()
        );
        for (k, tracked) in &established {
            assert_eq!(
                lookup(&mut t, *k, end),
                Some(*tracked),
                "pre-flood {k} lost"
            );
        }
        for (k, tracked) in &real {
            assert_eq!(
                lookup(&mut t, *k, end),
                Some(*tracked),
                "{k}, opened during the flood, lost"
            );
        }
        assert_eq!(t.occupancy(), brute_force(&t));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// The same for other table sizes, flood rates, real connection rates and keys.
        #[test]
        fn under_a_syn_ack_flood_real_flows_stay_tracked(
            capacity in prop::sample::select(vec![1024usize, 2048, 8192]),
            pairs in 5_000u64..60_000,
            every_ms in 60u64..300,
            interval_ms in 20u64..240,
            seed in any::<u32>(),
        ) {
            let (mut t, real, established, end) = syn_ack_flood(
                capacity, pairs, 2, every_ms * 1_000_000, interval_ms * 1_000_000, 100, seed,
            );
            for (k, tracked) in established.iter().chain(&real) {
                prop_assert_eq!(lookup(&mut t, *k, end), Some(*tracked), "{} lost", k);
            }
        }
    }

    #[test]
    fn never_over_capacity_and_never_allocates() {
        let mut t = table(64);
        let (tags, entries) = (t.tags.as_ptr(), t.entries.as_ptr());
        let (tags_cap, entries_cap) = (t.tags.capacity(), t.entries.capacity());
        let mut now = 0;
        for i in 0..20_000u64 {
            if i % 100 == 0 {
                now += SEC; // a key comes back about every 7 s
            }
            if i == 10_000 {
                now += 400 * SEC; // everything expires
            }
            // A scrambled sequence of keys and operations.
            let r = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32;
            // 64 keys that come back often (and earn trust), 700 rarely.
            let k = key_of(if r % 4 == 0 {
                (r % 700) as u32
            } else {
                (r % 64) as u32
            });
            match (r / 700) % 5 {
                0 | 1 => {
                    insert(&mut t, k, to(1), now);
                }
                2 | 3 => {
                    lookup(&mut t, k, now);
                }
                _ => {
                    t.remove(&k, k.hash());
                }
            }
            let occupancy = t.occupancy();
            assert!(occupancy.trusted + occupancy.untrusted <= t.capacity());
            assert!(new_entries(&t) <= t.new_max());
            if i % 97 == 0 {
                assert_eq!(occupancy, brute_force(&t));
            }
        }
        assert_eq!(t.occupancy(), brute_force(&t));
        let c = t.counters();
        assert!(
            c.promotions > 0 && c.evictions_untrusted > 0 && c.evictions_expired > 0,
            "{c:?}"
        );
        assert_eq!((t.tags.as_ptr(), t.entries.as_ptr()), (tags, entries));
        assert_eq!(
            (t.tags.capacity(), t.entries.capacity()),
            (tags_cap, entries_cap)
        );
        assert_eq!((t.tags.len(), t.entries.len()), (64, 64));
    }

    #[derive(Clone, Debug)]
    enum Op {
        Insert(u32, u16),
        Lookup(u32),
        Remove(u32),
        Advance(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0..40u32, any::<u16>()).prop_map(|(k, b)| Op::Insert(k, b)),
            3 => (0..40u32).prop_map(Op::Lookup),
            1 => (0..40u32).prop_map(Op::Remove),
            1 => (0..400u64).prop_map(Op::Advance),
        ]
    }

    /// What the model knows of a flow the table may hold.
    struct Model {
        tracked: Tracked,
        first_seen: u64,
        last_seen: u64,
        packets: u8,
        trusted: bool,
    }

    /// `model_config`'s trust delay and trusted eviction idle time, in the model's words.
    const MODEL_TRUST_AFTER: u64 = 50;
    const MODEL_EVICT_IDLE: u64 = 400;

    impl Model {
        /// Whether the table may have evicted it for a new flow by `now`.
        fn evictable(&self, now: u64) -> bool {
            !self.trusted || now - self.last_seen >= MODEL_EVICT_IDLE
        }
    }

    /// The model's own statement of the timeouts of `model_config`.
    fn model_limit(protocol: u8, packets: u8) -> u64 {
        let limit = match protocol {
            PROTO_TCP => 1000,
            PROTO_UDP => 300,
            _ => 200,
        };
        if packets >= 3 { limit } else { limit.min(100) }
    }

    fn model_config() -> ConnTableConfig {
        ConnTableConfig {
            capacity: 16,
            tcp_idle: Duration::from_nanos(1000),
            udp_idle: Duration::from_nanos(300),
            other_idle: Duration::from_nanos(200),
            new_idle: Duration::from_nanos(100),
            new_percent: 25,
            trust_after: Duration::from_nanos(MODEL_TRUST_AFTER),
            trusted_evict_idle: Duration::from_nanos(MODEL_EVICT_IDLE),
        }
    }

    fn key_of(k: u32) -> FlowKey {
        flow(k, [PROTO_TCP, PROTO_UDP, 1][(k % 3) as usize])
    }

    proptest! {
        /// Against a model: a hit returns the last value inserted for a live key, never a value
        /// for a removed or expired key; trust comes exactly as the module docs say; a live
        /// trusted flow is lost only after `trusted_evict_idle` without a packet; the counts and
        /// quotas hold after every step.
        #[test]
        fn matches_model(ops in prop::collection::vec(op(), 1..300)) {
            let mut t = ConnTable::new(model_config());
            let mut model: HashMap<u32, Model> = HashMap::new();
            let mut now = 0u64;
            for op in ops {
                // The model's entry for `k`, if live at `now`.
                let live = |model: &HashMap<u32, Model>, k: u32, now: u64| {
                    model.get(&k).filter(|m| {
                        now - m.last_seen <= model_limit(key_of(k).protocol(), m.packets)
                    }).map(|m| (m.tracked, m.evictable(now)))
                };
                match op {
                    Op::Insert(k, backend) => {
                        let key = key_of(k);
                        let tracked = Tracked { backend, vip: (k % 4) as u16, backend_tag: 0x5eed };
                        let before = live(&model, k, now);
                        let outcome = t.insert(key, key.hash(), tracked, now);
                        match outcome {
                            InsertOutcome::Replaced => {
                                prop_assert!(before.is_some(), "replaced a dead {key}");
                                let m = model.get_mut(&k).unwrap();
                                m.tracked = tracked;
                                m.last_seen = now;
                            }
                            InsertOutcome::Inserted | InsertOutcome::Evicted(_) => {
                                prop_assert!(before.is_none_or(|(_, evictable)| evictable));
                                model.insert(k, Model {
                                    tracked, first_seen: now, last_seen: now, packets: 1, trusted: false,
                                });
                            }
                            InsertOutcome::Full => {
                                prop_assert!(before.is_none_or(|(_, evictable)| evictable));
                                model.remove(&k);
                            }
                        }
                    }
                    Op::Lookup(k) => {
                        let key = key_of(k);
                        let before = live(&model, k, now);
                        match t.lookup(&key, key.hash(), now) {
                            Some(got) => {
                                prop_assert_eq!(Some(got), before.map(|(v, _)| v), "{}", key);
                                let m = model.get_mut(&k).unwrap();
                                m.packets = m.packets.saturating_add(1);
                                m.last_seen = now;
                                if m.packets >= 3 && now - m.first_seen >= MODEL_TRUST_AFTER {
                                    m.trusted = true;
                                }
                            }
                            None => {
                                prop_assert!(
                                    before.is_none_or(|(_, evictable)| evictable),
                                    "trusted {} lost", key
                                );
                                model.remove(&k);
                            }
                        }
                    }
                    Op::Remove(k) => {
                        let key = key_of(k);
                        let before = live(&model, k, now);
                        let removed = t.remove(&key, key.hash());
                        prop_assert!(removed || before.is_none_or(|(_, evictable)| evictable));
                        model.remove(&k);
                    }
                    Op::Advance(d) => now += d,
                }
                let occupancy = t.occupancy();
                prop_assert_eq!(occupancy, brute_force(&t));
                prop_assert!(occupancy.trusted + occupancy.untrusted <= t.capacity());
                prop_assert!(new_entries(&t) <= t.new_max());
                let live_trusted = model
                    .iter()
                    .filter(|&(&k, m)| m.trusted && live(&model, k, now).is_some())
                    .count();
                prop_assert!(live_trusted <= occupancy.trusted + occupancy.untrusted);
                let protected = model
                    .iter()
                    .filter(|&(&k, m)| live(&model, k, now).is_some_and(|(_, evictable)| !evictable) && m.trusted)
                    .count();
                prop_assert!(protected <= occupancy.trusted);
            }
        }
    }
}

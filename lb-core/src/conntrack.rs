//! [`ConnTable`]: the per-worker connection table of a mux (Maglev, NSDI 2016, §3.3), with
//! Ananta's trusted/untrusted split against SYN floods (Patel et al., SIGCOMM 2013, §3.3.2).
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
//! would allocate), and lets the eviction choice be local: the oldest untrusted entry of the
//! bucket, an approximate LRU like Katran's per-CPU LRU map. The price is that an insert can find
//! its bucket full before the table is: it then gets [`InsertOutcome::Full`], which is harmless.
//!
//! **Trusted and untrusted entries.** A new entry is *untrusted*; the next [`ConnTable::lookup`]
//! hit (the flow's second packet) promotes it to *trusted*. The classes have separate quotas:
//! untrusted entries hold at most [`ConnTableConfig::untrusted_percent`] of the slots (default a
//! quarter), and trusted entries may hold every slot an untrusted entry does not, so a flood of
//! new flows leaves them at least the other three quarters. Untrusted entries also expire sooner
//! ([`ConnTableConfig::untrusted_idle`], default 10 s), as in Ananta.
//!
//! **Insert policy**, within the flow's bucket: update the key's live entry if there is one;
//! otherwise, if the untrusted quota has room, take an empty slot, then the slot of an expired
//! entry; otherwise evict the least recently seen untrusted entry; otherwise [`InsertOutcome::Full`].
//! Every insert also reclaims the expired entries of one more bucket, round robin, so stale
//! entries stop holding the untrusted quota within `capacity / 8` inserts.
//!
//! **Invariants.**
//! - The capacity is fixed by [`ConnTable::new`], the only function that allocates.
//! - At most `capacity` entries, at most [`ConnTable::untrusted_max`] of them untrusted.
//! - A trusted entry leaves the table only by expiring or by [`ConnTable::remove`]: no insert
//!   evicts it, so a SYN flood (any number of new single-packet flows) never breaks an
//!   established flow that this table tracks.
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

/// Sizing, idle timeouts and the untrusted quota of a [`ConnTable`].
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
    /// Idle time after which an untrusted entry expires, if its protocol's timeout is not shorter.
    /// Default 10 s: a flooded SYN frees its slot soon, and a real client's second packet comes
    /// well within it.
    pub untrusted_idle: Duration,
    /// The share of the slots untrusted entries may hold, in percent; clamped to 1..=100 (and at
    /// least one slot). Default 25.
    pub untrusted_percent: u8,
}

impl Default for ConnTableConfig {
    fn default() -> Self {
        Self {
            capacity: 1 << 18,
            tcp_idle: Duration::from_secs(300),
            udp_idle: Duration::from_secs(30),
            other_idle: Duration::from_secs(30),
            untrusted_idle: Duration::from_secs(10),
            untrusted_percent: 25,
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
    /// No room in the flow's bucket, or the untrusted quota is spent and the bucket holds no
    /// untrusted entry: the flow is not tracked, and its packets are forwarded by pure Maglev
    /// hashing.
    Full,
}

/// The class of an entry evicted by [`ConnTable::insert`]. A live trusted entry is never evicted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Victim {
    /// An entry (of either class) idle for longer than its timeout.
    Expired,
    /// The least recently seen live untrusted entry of the bucket.
    Untrusted,
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
    /// Expired entries freed, whether found by a lookup, an insert or the background sweep.
    pub evictions_expired: u64,
    /// Inserts that found no room ([`InsertOutcome::Full`]): fallbacks to pure Maglev hashing.
    pub full: u64,
    /// Untrusted entries promoted to trusted by a second packet.
    pub promotions: u64,
}

/// How many slots a [`ConnTable`] uses, by class. Expired entries count until they are freed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Occupancy {
    /// Trusted entries: flows that have sent at least two packets.
    pub trusted: usize,
    /// Untrusted entries: flows seen once.
    pub untrusted: usize,
    /// Total slots.
    pub capacity: usize,
}

#[derive(Clone, Copy)]
struct Entry {
    key: FlowKey,
    tracked: Tracked,
    /// `now` of the last packet seen, in nanoseconds.
    last_seen: u64,
    trusted: bool,
}

/// Idle timeouts in nanoseconds.
#[derive(Clone, Copy, Debug)]
struct Timeouts {
    tcp: u64,
    udp: u64,
    other: u64,
    untrusted: u64,
}

impl Timeouts {
    fn new(config: &ConnTableConfig) -> Self {
        let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        Self {
            tcp: ns(config.tcp_idle),
            udp: ns(config.udp_idle),
            other: ns(config.other_idle),
            untrusted: ns(config.untrusted_idle),
        }
    }

    /// The idle time after which an entry of this protocol and class expires.
    #[inline]
    fn idle_limit(&self, protocol: u8, trusted: bool) -> u64 {
        let limit = match protocol {
            PROTO_TCP => self.tcp,
            PROTO_UDP => self.udp,
            _ => self.other,
        };
        if trusted {
            limit
        } else {
            limit.min(self.untrusted)
        }
    }

    /// Whether the entry has been idle for longer than its timeout.
    #[inline]
    fn expired(&self, entry: &Entry, now: u64) -> bool {
        now.saturating_sub(entry.last_seen) > self.idle_limit(entry.key.protocol(), entry.trusted)
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
    untrusted_max: usize,
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
        let percent = usize::from(config.untrusted_percent.clamp(1, 100));
        Self {
            tags: vec![EMPTY_TAG; capacity],
            entries: vec![None; capacity],
            shift: 64 - buckets.trailing_zeros(),
            timeouts: Timeouts::new(&config),
            untrusted_max: (capacity * percent / 100).max(1),
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
    /// A hit marks the flow seen at `now` and, if it was untrusted, promotes it to trusted (this
    /// is its second packet). An entry idle for longer than its timeout is freed and is a miss.
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
            if !entry.trusted {
                entry.trusted = true;
                self.untrusted -= 1;
                self.trusted += 1;
                self.counters.promotions += 1;
            }
            entry.last_seen = entry.last_seen.max(now);
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
    /// A new entry is untrusted and seen at `now`. Whatever the outcome, the packet is forwarded.
    pub fn insert(&mut self, key: FlowKey, hash: u64, tracked: Tracked, now: u64) -> InsertOutcome {
        let (base, tag) = self.locate(hash);
        let mut empty = None;
        let mut reclaimed = None;
        let mut oldest_untrusted: Option<(usize, u64)> = None;
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
            if !entry.trusted && oldest_untrusted.is_none_or(|(_, seen)| entry.last_seen < seen) {
                oldest_untrusted = Some((slot, entry.last_seen));
            }
        }
        let quota_left = self.untrusted < self.untrusted_max;
        let choice = match (empty, reclaimed, oldest_untrusted) {
            (Some(slot), _, _) if quota_left => Some((slot, InsertOutcome::Inserted)),
            (_, Some(slot), _) if quota_left => {
                Some((slot, InsertOutcome::Evicted(Victim::Expired)))
            }
            (_, _, Some((slot, _))) => {
                self.free(slot);
                self.counters.evictions_untrusted += 1;
                Some((slot, InsertOutcome::Evicted(Victim::Untrusted)))
            }
            _ => None,
        };
        let outcome = match choice {
            Some((slot, outcome)) => {
                self.tags[slot] = tag;
                self.entries[slot] = Some(Entry {
                    key,
                    tracked,
                    last_seen: now,
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

    /// The most untrusted entries the table holds at once.
    #[must_use]
    pub fn untrusted_max(&self) -> usize {
        self.untrusted_max
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
            .field("untrusted_max", &self.untrusted_max)
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
    fn one_bucket(untrusted_percent: u8) -> ConnTable {
        ConnTable::new(ConnTableConfig {
            capacity: WAYS,
            untrusted_percent,
            ..ConnTableConfig::default()
        })
    }

    fn insert(t: &mut ConnTable, k: FlowKey, tracked: Tracked, now: u64) -> InsertOutcome {
        t.insert(k, k.hash(), tracked, now)
    }

    fn lookup(t: &mut ConnTable, k: FlowKey, now: u64) -> Option<Tracked> {
        t.lookup(&k, k.hash(), now)
    }

    /// Inserts a flow and sees its second packet, so that it is trusted.
    fn establish(t: &mut ConnTable, k: FlowKey, tracked: Tracked, now: u64) -> bool {
        insert(t, k, tracked, now) != InsertOutcome::Full && lookup(t, k, now) == Some(tracked)
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

    #[test]
    fn capacity_rounds_up_to_a_power_of_two() {
        assert_eq!(table(1000).capacity(), 1024);
        assert_eq!(table(1024).capacity(), 1024);
        assert_eq!(table(0).capacity(), WAYS);
        assert_eq!(table(usize::MAX).capacity(), MAX_CAPACITY);
        assert_eq!(table(1000).untrusted_max(), 256);
        assert_eq!(one_bucket(0).untrusted_max(), 1);
        assert_eq!(one_bucket(200).untrusted_max(), WAYS);
    }

    #[test]
    fn entries_are_compact() {
        // The key's enum tag gives `Option` a niche: an empty slot costs nothing extra.
        assert!(
            size_of::<Option<Entry>>() <= 56,
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
        // `a` is trusted now: TCP's 300 s apply.
        assert_eq!(lookup(&mut t, a, 200 * SEC), Some(to(1)));
    }

    #[test]
    fn an_expired_slot_is_reused() {
        let mut t = one_bucket(100);
        for i in 0..8 {
            assert!(establish(&mut t, tcp(i), to(i as u16), 0));
        }
        assert_eq!(insert(&mut t, tcp(100), to(9), SEC), InsertOutcome::Full);
        let later = 300 * SEC + 1;
        assert_eq!(
            insert(&mut t, tcp(100), to(9), later),
            InsertOutcome::Evicted(Victim::Expired)
        );
        assert_eq!(lookup(&mut t, tcp(100), later), Some(to(9)));
        // The insert freed the other seven expired entries of the bucket too.
        assert_eq!(t.counters().evictions_expired, 8);
        assert_eq!(t.occupancy(), brute_force(&t));
        assert_eq!((t.occupancy().trusted, t.occupancy().untrusted), (1, 0));
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
    fn second_packet_promotes() {
        let mut t = table(1024);
        let k = tcp(1);
        insert(&mut t, k, to(1), 0);
        assert_eq!((t.occupancy().trusted, t.occupancy().untrusted), (0, 1));
        assert_eq!(lookup(&mut t, k, 1), Some(to(1)));
        assert_eq!((t.occupancy().trusted, t.occupancy().untrusted), (1, 0));
        assert_eq!(lookup(&mut t, k, 2), Some(to(1)));
        assert_eq!(t.counters().promotions, 1);
        // A replaced entry keeps its class.
        assert_eq!(insert(&mut t, k, to(2), 3), InsertOutcome::Replaced);
        assert_eq!((t.occupancy().trusted, t.occupancy().untrusted), (1, 0));
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
        assert_eq!(insert(&mut t, tcp(10), to(2), 1), InsertOutcome::Inserted);
        assert_eq!(insert(&mut t, tcp(11), to(2), 2), InsertOutcome::Inserted);
        assert_eq!(
            insert(&mut t, tcp(12), to(3), 3),
            InsertOutcome::Evicted(Victim::Untrusted)
        );
        assert_eq!(
            lookup(&mut t, tcp(10), 4),
            None,
            "the oldest untrusted goes"
        );
        assert_eq!(lookup(&mut t, tcp(11), 4), Some(to(2)));
        assert_eq!(lookup(&mut t, tcp(12), 4), Some(to(3)));
        // Eight trusted entries now: no new flow gets in.
        assert_eq!(insert(&mut t, tcp(13), to(4), 5), InsertOutcome::Full);
        for i in (0..6).chain([11, 12]) {
            assert!(lookup(&mut t, tcp(i), 6).is_some(), "flow {i} evicted");
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
        assert!(lookup(&mut t, tcp(2), 3).is_some());
        assert!(lookup(&mut t, tcp(3), 3).is_some());
        assert_eq!(insert(&mut t, tcp(4), to(1), 4), InsertOutcome::Inserted);
        assert_eq!(insert(&mut t, tcp(5), to(1), 5), InsertOutcome::Inserted);
        assert_eq!(t.occupancy().untrusted, 2);
    }

    #[test]
    fn untrusted_quota_full_and_no_untrusted_in_bucket_is_full() {
        let mut t = one_bucket(25);
        assert!(establish(&mut t, tcp(1), to(1), 0));
        assert_eq!(insert(&mut t, tcp(2), to(1), 0), InsertOutcome::Inserted);
        assert_eq!(insert(&mut t, tcp(3), to(1), 0), InsertOutcome::Inserted);
        assert!(lookup(&mut t, tcp(2), 0).is_some());
        // Quota 2: one untrusted (3) left in the bucket; a flood only cycles that slot.
        assert_eq!(t.occupancy().untrusted, 1);
        assert_eq!(insert(&mut t, tcp(4), to(1), 1), InsertOutcome::Inserted);
        for i in 5..50 {
            assert_eq!(
                insert(&mut t, tcp(i), to(1), 2 + u64::from(i)),
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
            assert!(t.occupancy().untrusted <= t.untrusted_max());
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
    fn never_over_capacity_and_never_allocates() {
        let mut t = table(256);
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
            let k = key_of((r % 700) as u32);
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
            assert!(occupancy.untrusted <= t.untrusted_max());
            if i % 97 == 0 {
                assert_eq!(occupancy, brute_force(&t));
            }
        }
        assert_eq!(t.occupancy(), brute_force(&t));
        let c = t.counters();
        assert!(
            c.promotions > 0 && c.full > 0 && c.evictions_expired > 0,
            "{c:?}"
        );
        assert_eq!((t.tags.as_ptr(), t.entries.as_ptr()), (tags, entries));
        assert_eq!(
            (t.tags.capacity(), t.entries.capacity()),
            (tags_cap, entries_cap)
        );
        assert_eq!((t.tags.len(), t.entries.len()), (256, 256));
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
        last_seen: u64,
        trusted: bool,
    }

    /// The model's own statement of the timeouts of `model_config`.
    fn model_limit(protocol: u8, trusted: bool) -> u64 {
        let limit = match protocol {
            PROTO_TCP => 1000,
            PROTO_UDP => 300,
            _ => 200,
        };
        if trusted { limit } else { limit.min(100) }
    }

    fn model_config() -> ConnTableConfig {
        ConnTableConfig {
            capacity: 16,
            tcp_idle: Duration::from_nanos(1000),
            udp_idle: Duration::from_nanos(300),
            other_idle: Duration::from_nanos(200),
            untrusted_idle: Duration::from_nanos(100),
            untrusted_percent: 25,
        }
    }

    fn key_of(k: u32) -> FlowKey {
        flow(k, [PROTO_TCP, PROTO_UDP, 1][(k % 3) as usize])
    }

    proptest! {
        /// Against a model: a hit returns the last value inserted for a live key, never a value
        /// for a removed or expired key; a live trusted flow is never lost; the counts and
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
                        now - m.last_seen <= model_limit(key_of(k).protocol(), m.trusted)
                    }).map(|m| (m.tracked, m.trusted))
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
                                prop_assert!(before.is_none_or(|(_, trusted)| !trusted));
                                model.insert(k, Model { tracked, last_seen: now, trusted: false });
                            }
                            InsertOutcome::Full => {
                                prop_assert!(before.is_none_or(|(_, trusted)| !trusted));
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
                                m.trusted = true;
                                m.last_seen = now;
                            }
                            None => {
                                prop_assert!(
                                    before.is_none_or(|(_, trusted)| !trusted),
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
                        prop_assert!(removed || before.is_none_or(|(_, trusted)| !trusted));
                        model.remove(&k);
                    }
                    Op::Advance(d) => now += d,
                }
                let occupancy = t.occupancy();
                prop_assert_eq!(occupancy, brute_force(&t));
                prop_assert!(occupancy.trusted + occupancy.untrusted <= t.capacity());
                prop_assert!(occupancy.untrusted <= t.untrusted_max());
                let live_trusted = model
                    .keys()
                    .filter(|&&k| live(&model, k, now).is_some_and(|(_, trusted)| trusted))
                    .count();
                prop_assert!(live_trusted <= occupancy.trusted);
            }
        }
    }
}

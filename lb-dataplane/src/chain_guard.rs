//! What daisy chaining may cost the agent, bounded: answer caches and two budgets.
//!
//! **The threat.** During a chaining window, every non-SYN TCP segment a mux tags with a previous
//! backend is a chaining candidate on the new backend: unless the connection is known here, the
//! agent asks the kernel (sock_diag, a netlink round trip) and, if the answer is "absent", sends
//! the segment on to the previous backend. A flood of spoofed non-SYN segments (each a new
//! 4-tuple, or the same few over and over) would cost one lookup and one relay per packet, and
//! the receive thread's time with them: legitimate traffic then queues and drops.
//!
//! **The bounds** ([`ChainGuard`]):
//! - **Answers are cached**, each for a time after it was last used (a connection that keeps
//!   sending keeps its answer): "present" for [`PRESENT_TTL`] (at most [`PRESENT_CAPACITY`]
//!   entries; when full, new ones are not kept until expired ones are swept), "absent" for
//!   [`ABSENT_TTL`] in a fixed array of [`ABSENT_SLOTS`] slots, [`ABSENT_WAYS`]-way set
//!   associative by a keyed hash of the 4-tuple (a new answer takes a free or expired slot of
//!   its set, else the one closest to expiry, so the cache never grows and is always
//!   writable). A spoofer repeating tuples is answered from the cache.
//! - **A SYN carrying a previous backend marks its connection present**: it is delivered here,
//!   so the connection starts here. This drops any cached "absent" for it (which would chain the
//!   handshake's last ACK away) and spares its later segments a lookup.
//! - **Lookups have a budget**: a token bucket of `agent.chain_lookups_per_second`, holding one
//!   second's worth. A candidate answered by neither cache when the bucket is empty is dropped
//!   (counted as `lookup_budget`); TCP retransmits it. Dropping is the one safe choice: to
//!   deliver a segment of a connection that lives on the previous backend would make this host
//!   reset it, and to chain one of a connection that lives here would make the previous backend
//!   reset it.
//! - **Relays have a budget**: a token bucket of `agent.chain_relays_per_second`, one second's
//!   worth. A packet to chain beyond it is dropped (counted as `relay_budget`).
//!
//! So a flood costs at most `chain_lookups_per_second` lookups and `chain_relays_per_second`
//! relays a second, plus a cache probe per packet. The cost of the bound: while a flood spends
//! the lookup budget, segments of legitimate connections that moved (and are in no cache yet)
//! compete with it for lookups, and some are retransmitted; connections known here (cached
//! present, or started here by a SYN) and all non-chaining traffic are not affected.
//!
//! Everything here is pure: time is passed in as monotonic nanoseconds.

use lb_core::time::nanos;
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::SocketAddr;
use std::time::Duration;

use crate::agent::Connections;

/// How long a "present" answer is trusted.
pub const PRESENT_TTL: Duration = Duration::from_secs(60);
/// How long an "absent" answer is trusted (a SYN delivered here overrides it at once).
pub const ABSENT_TTL: Duration = Duration::from_secs(1);
/// Most "present" answers remembered.
pub const PRESENT_CAPACITY: usize = 65_536;
/// Slots of the "absent" cache.
pub const ABSENT_SLOTS: usize = 8_192;
/// Slots of the "absent" cache one 4-tuple may take (its set).
pub const ABSENT_WAYS: usize = 4;

/// A TCP connection as the agent sees it: (local = VIP end, remote = client end).
type Pair = (SocketAddr, SocketAddr);

/// The two budgets, per second.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChainBudget {
    /// sock_diag lookups per second (`agent.chain_lookups_per_second`).
    pub lookups_per_second: u32,
    /// Packets chained per second (`agent.chain_relays_per_second`).
    pub relays_per_second: u32,
}

impl ChainBudget {
    /// The budget of an agent config.
    #[must_use]
    pub fn of(agent: &lb_core::config::AgentConfig) -> Self {
        Self {
            lookups_per_second: agent.chain_lookups_per_second,
            relays_per_second: agent.chain_relays_per_second,
        }
    }
}

/// A token bucket: `rate` tokens a second, at most `rate` held (one second's worth); it starts
/// full.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    rate: f64,
    tokens: f64,
    last: u64,
}

impl TokenBucket {
    /// A full bucket of `rate` tokens a second, at `now` (ns).
    #[must_use]
    pub fn new(rate: u32, now: u64) -> Self {
        Self {
            rate: f64::from(rate),
            tokens: f64::from(rate),
            last: now,
        }
    }

    /// Changes the rate, keeping the tokens held (capped at the new rate).
    pub fn set_rate(&mut self, rate: u32, now: u64) {
        self.refill(now);
        self.rate = f64::from(rate);
        self.tokens = self.tokens.min(self.rate);
    }

    fn refill(&mut self, now: u64) {
        let elapsed = now.saturating_sub(self.last) as f64 / 1e9;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        self.last = self.last.max(now);
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, now: u64) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What a [`ChainGuard`] has done, cumulative. (Its refusals are counted by the caller, as the
/// `lookup_budget` and `relay_budget` reject reasons.)
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChainCounters {
    /// sock_diag lookups made.
    pub lookups: u64,
    /// Questions answered from a cache.
    pub cache_hits: u64,
}

/// The answer caches and the budgets of daisy chaining. See the module docs.
#[derive(Debug)]
pub struct ChainGuard {
    /// "Present" answers: the pair and when the answer expires (ns).
    present: HashMap<Pair, u64>,
    /// "Absent" answers in sets of [`ABSENT_WAYS`] slots chosen by `hasher`: the pair and when
    /// the answer expires.
    absent: Box<[Option<(Pair, u64)>]>,
    hasher: RandomState,
    lookups: TokenBucket,
    relays: TokenBucket,
    counters: ChainCounters,
}

impl ChainGuard {
    /// Empty caches and full buckets of `budget`, at `now` (ns).
    #[must_use]
    pub fn new(budget: ChainBudget, now: u64) -> Self {
        Self {
            present: HashMap::new(),
            absent: vec![None; ABSENT_SLOTS].into_boxed_slice(),
            hasher: RandomState::new(),
            lookups: TokenBucket::new(budget.lookups_per_second, now),
            relays: TokenBucket::new(budget.relays_per_second, now),
            counters: ChainCounters::default(),
        }
    }

    /// A reloaded config's budget (the caches stay).
    pub fn set_budget(&mut self, budget: ChainBudget, now: u64) {
        self.lookups.set_rate(budget.lookups_per_second, now);
        self.relays.set_rate(budget.relays_per_second, now);
    }

    /// The counters so far.
    #[must_use]
    pub fn counters(&self) -> ChainCounters {
        self.counters
    }

    /// "Present" answers held now (expired ones included until [`Self::expire`]).
    #[must_use]
    pub fn present_len(&self) -> usize {
        self.present.len()
    }

    /// The first slot of `pair`'s set.
    fn set(&self, pair: &Pair) -> usize {
        (self.hasher.hash_one(pair) as usize) % (self.absent.len() / ABSENT_WAYS) * ABSENT_WAYS
    }

    /// The slot holding an unexpired "absent" answer for `pair`.
    fn find_absent(&self, pair: &Pair, now: u64) -> Option<usize> {
        let set = self.set(pair);
        (set..set + ABSENT_WAYS)
            .find(|&i| self.absent[i].is_some_and(|(held, expires)| held == *pair && now < expires))
    }

    fn remember_absent(&mut self, pair: Pair, now: u64) {
        let set = self.set(&pair);
        let slots = set..set + ABSENT_WAYS;
        // The pair's own slot, a free or expired one, else the one that expires first.
        let slot = slots
            .clone()
            .find(|&i| self.absent[i].is_some_and(|(held, _)| held == pair))
            .or_else(|| {
                slots
                    .clone()
                    .find(|&i| self.absent[i].is_none_or(|(_, expires)| expires <= now))
            })
            .or_else(|| slots.min_by_key(|&i| self.absent[i].map_or(0, |(_, e)| e)))
            .unwrap_or(set);
        self.absent[slot] = Some((pair, now.saturating_add(nanos(ABSENT_TTL))));
    }

    /// Whether this host has the connection `(local, remote)`: from a cache, or else from
    /// `lookup` (the kernel) if the lookup budget allows; `None` when it does not.
    pub fn has_connection(
        &mut self,
        local: SocketAddr,
        remote: SocketAddr,
        now: u64,
        lookup: &mut dyn FnMut(SocketAddr, SocketAddr) -> bool,
    ) -> Option<bool> {
        let pair = (local, remote);
        if let Some(expires) = self.present.get_mut(&pair) {
            if now < *expires {
                *expires = now.saturating_add(nanos(PRESENT_TTL));
                self.counters.cache_hits += 1;
                return Some(true);
            }
            self.present.remove(&pair);
        }
        if let Some(slot) = self.find_absent(&pair, now) {
            if let Some((_, expires)) = &mut self.absent[slot] {
                *expires = now.saturating_add(nanos(ABSENT_TTL));
            }
            self.counters.cache_hits += 1;
            return Some(false);
        }
        if !self.lookups.take(now) {
            return None;
        }
        self.counters.lookups += 1;
        let exists = lookup(local, remote);
        if exists {
            self.mark_present(pair, now);
        } else {
            self.remember_absent(pair, now);
        }
        Some(exists)
    }

    /// A SYN of `(local, remote)` carrying a previous backend is being delivered here.
    pub fn connection_starts(&mut self, local: SocketAddr, remote: SocketAddr, now: u64) {
        let pair = (local, remote);
        if let Some(slot) = self.find_absent(&pair, now) {
            self.absent[slot] = None;
        }
        self.mark_present(pair, now);
    }

    fn mark_present(&mut self, pair: Pair, now: u64) {
        if self.present.len() < PRESENT_CAPACITY || self.present.contains_key(&pair) {
            self.present
                .insert(pair, now.saturating_add(nanos(PRESENT_TTL)));
        }
    }

    /// Whether one more packet may be chained now (takes a relay token).
    pub fn allow_relay(&mut self, now: u64) -> bool {
        self.relays.take(now)
    }

    /// Forgets expired "present" answers (the "absent" ones expire in place). Call it now and
    /// then (the agent does once a second): it walks the whole cache.
    pub fn expire(&mut self, now: u64) {
        self.present.retain(|_, expires| now < *expires);
    }
}

/// [`Connections`] for [`crate::agent::classify`]: a [`ChainGuard`] at one instant, asking the
/// kernel through `lookup`.
pub struct Asking<'a> {
    /// The caches and budgets.
    pub guard: &'a mut ChainGuard,
    /// Now (monotonic ns).
    pub now: u64,
    /// The kernel's answer (sock_diag).
    pub lookup: &'a mut dyn FnMut(SocketAddr, SocketAddr) -> bool,
}

impl Connections for Asking<'_> {
    fn has_connection(&mut self, local: SocketAddr, remote: SocketAddr) -> Option<bool> {
        self.guard
            .has_connection(local, remote, self.now, &mut *self.lookup)
    }

    fn connection_starts(&mut self, local: SocketAddr, remote: SocketAddr) {
        self.guard.connection_starts(local, remote, self.now);
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use etherparse::PacketBuilder;
    use lb_core::config::Config;
    use lb_core::encap::{EncapKind, EncapParams, encapsulate};
    use lb_core::snapshot::backend_tag;

    use super::*;
    use crate::agent::{Policy, Reject, Verdict, classify};

    const SECOND: u64 = 1_000_000_000;
    const ME: &str = "198.18.23.2";
    const PREVIOUS: &str = "198.18.21.2";
    const MUX: &str = "198.18.12.2";
    const BUDGET: ChainBudget = ChainBudget {
        lookups_per_second: 100,
        relays_per_second: 300,
    };

    fn policy() -> Policy {
        let text = format!(
            "[node]\naddress_v4 = \"{ME}\"\n[agent]\nmuxes = [\"198.18.12.0/24\"]\n\
             [[vip]]\nname = \"web\"\naddress = \"198.18.100.1\"\nprotocol = \"tcp\"\nport = 80\nencap = \"gre\"\n\
             [[vip.backend]]\naddress = \"{ME}\"\n[[vip.backend]]\naddress = \"{PREVIOUS}\"\n"
        );
        Policy::from_config(&Config::from_toml(&text, "agent.toml").unwrap()).unwrap()
    }

    /// A tunnel packet from the mux, keyed with the previous backend, carrying TCP from
    /// `client:port` to the VIP: a SYN or a bare ACK.
    fn keyed(client: [u8; 4], port: u16, syn: bool) -> Vec<u8> {
        let b = PacketBuilder::ipv4(client, [198, 18, 100, 1], 64).tcp(port, 80, 1, 1000);
        let b = if syn { b.syn() } else { b.ack(7) };
        let mut inner = Vec::new();
        b.write(&mut inner, &[]).unwrap();
        let mut out = vec![0u8; inner.len() + 64];
        let n = encapsulate(
            &inner,
            &EncapParams {
                outer_src: MUX.parse().unwrap(),
                outer_dst: ME.parse().unwrap(),
                ttl: 64,
                kind: EncapKind::Gre {
                    key: Some(backend_tag(PREVIOUS.parse().unwrap())),
                },
            },
            &mut out,
        )
        .unwrap();
        out.truncate(n);
        out
    }

    /// What the agent's receive loop does with one packet: classify with the guard, then the
    /// relay budget for a chain verdict. Returns the verdict's kind.
    #[derive(Debug, PartialEq, Eq)]
    enum Did {
        Deliver,
        Chain,
        Reject(Reject),
        Other,
    }

    fn step(
        packet: &[u8],
        policy: &Policy,
        guard: &mut ChainGuard,
        now: u64,
        kernel: &mut dyn FnMut(SocketAddr, SocketAddr) -> bool,
    ) -> Did {
        let mut asking = Asking {
            guard,
            now,
            lookup: kernel,
        };
        match classify(packet, policy, &mut asking) {
            Verdict::Deliver(_) => Did::Deliver,
            Verdict::Chain { to, .. } => {
                assert_eq!(to, PREVIOUS.parse::<IpAddr>().unwrap());
                if asking.guard.allow_relay(now) {
                    Did::Chain
                } else {
                    Did::Reject(Reject::RelayBudget)
                }
            }
            Verdict::Reject(r) => Did::Reject(r),
            _ => Did::Other,
        }
    }

    #[test]
    fn a_token_bucket_gives_its_burst_then_its_rate() {
        let mut b = TokenBucket::new(10, 0);
        assert_eq!(
            (0..100).filter(|_| b.take(0)).count(),
            10,
            "one second's worth"
        );
        assert!(!b.take(SECOND / 20), "half a token");
        assert!(b.take(SECOND / 10));
        // Idle for a minute: still one second's worth, no more.
        assert_eq!((0..100).filter(|_| b.take(61 * SECOND)).count(), 10);
        b.set_rate(2, 61 * SECOND);
        assert_eq!((0..100).filter(|_| b.take(70 * SECOND)).count(), 2);
    }

    #[test]
    fn a_flood_of_spoofed_tuples_costs_at_most_the_budgets() {
        let policy = policy();
        let mut guard = ChainGuard::new(BUDGET, 0);
        let mut lookups = 0u64;
        let mut kernel = |_: SocketAddr, _: SocketAddr| {
            lookups += 1;
            false
        };
        // 100 000 spoofed ACKs over 10 s: each a new 4-tuple, from many sources.
        let seconds = 10;
        let total = 100_000u32;
        let mut did = HashMap::<String, u64>::new();
        for i in 0..total {
            let now = u64::from(i) * seconds * SECOND / u64::from(total);
            let [a, b, c, d] = (0xc612_0000u32 | (i >> 15)).to_be_bytes();
            let packet = keyed([a, b, c, d], (i & 0x7fff) as u16 + 1024, false);
            let outcome = step(&packet, &policy, &mut guard, now, &mut kernel);
            *did.entry(format!("{outcome:?}")).or_default() += 1;
        }
        let budget_lookups = u64::from(BUDGET.lookups_per_second) * (seconds + 1);
        assert!(lookups <= budget_lookups, "{lookups} lookups: {did:?}");
        assert_eq!(guard.counters().lookups, lookups);
        let refused = did["Reject(LookupBudget)"];
        assert_eq!(refused + lookups, u64::from(total), "{did:?}");
        // Every lookup said "absent": those packets were chained (within the relay budget).
        assert!(did["Chain"] <= u64::from(BUDGET.relays_per_second) * (seconds + 1));
        assert_eq!(did["Chain"], lookups, "{did:?}");
        assert!(lookups >= u64::from(BUDGET.lookups_per_second) * seconds);
    }

    #[test]
    fn spoofed_repeats_are_answered_from_the_cache_and_relays_are_bounded() {
        let policy = policy();
        let mut guard = ChainGuard::new(BUDGET, 0);
        let lookups = std::cell::Cell::new(0u64);
        let mut kernel = |_: SocketAddr, _: SocketAddr| {
            lookups.set(lookups.get() + 1);
            false
        };
        // 50 tuples, each 200 times, within half a second: 50 lookups, the rest cache hits.
        let packets: Vec<Vec<u8>> = (0..50u16)
            .map(|p| keyed([198, 18, 1, 2], 20_000 + p, false))
            .collect();
        let mut did = HashMap::<String, u64>::new();
        for round in 0..200u64 {
            for p in &packets {
                let outcome = step(p, &policy, &mut guard, round * SECOND / 400, &mut kernel);
                *did.entry(format!("{outcome:?}")).or_default() += 1;
            }
        }
        assert_eq!(lookups.get(), 50, "{did:?}");
        assert_eq!(guard.counters().cache_hits, 50 * 199);
        // The bucket's second's worth, and what it refills in the half second.
        let relay_bound = u64::from(BUDGET.relays_per_second) * 3 / 2;
        assert!(
            (relay_bound - 2..=relay_bound).contains(&did["Chain"]),
            "{did:?}"
        );
        assert_eq!(did["Reject(RelayBudget)"], 10_000 - did["Chain"]);
        // An answer used keeps; one unused for ABSENT_TTL is asked again.
        let again = step(&packets[0], &policy, &mut guard, 2 * SECOND, &mut kernel);
        assert_eq!(again, Did::Chain);
        assert_eq!(lookups.get(), 51);
    }

    #[test]
    fn connections_known_here_need_no_lookup_when_the_budget_is_spent() {
        let policy = policy();
        let mut guard = ChainGuard::new(
            ChainBudget {
                lookups_per_second: 1,
                relays_per_second: 1,
            },
            0,
        );
        let local_conn = keyed([198, 18, 1, 2], 40_000, false);
        let mut kernel = |_: SocketAddr, remote: SocketAddr| remote.port() == 40_000;
        assert_eq!(
            step(&local_conn, &policy, &mut guard, 0, &mut kernel),
            Did::Deliver
        );
        // The budget is spent: a new candidate is refused ...
        let other = keyed([198, 18, 1, 2], 40_001, false);
        assert_eq!(
            step(&other, &policy, &mut guard, 1, &mut kernel),
            Did::Reject(Reject::LookupBudget)
        );
        // ... but the known connection is delivered from the cache.
        for t in 2..1000 {
            assert_eq!(
                step(&local_conn, &policy, &mut guard, t, &mut kernel),
                Did::Deliver
            );
        }
        // A connection that starts here (its SYN carries the previous backend): no lookup for
        // its later segments, even with a stale "absent" answer cached before the SYN.
        let mut guard = ChainGuard::new(BUDGET, 0);
        let mut asked = 0;
        let mut kernel = |_: SocketAddr, _: SocketAddr| {
            asked += 1;
            false
        };
        let ack = keyed([198, 18, 1, 3], 50_000, false);
        assert_eq!(step(&ack, &policy, &mut guard, 0, &mut kernel), Did::Chain);
        let syn = keyed([198, 18, 1, 3], 50_000, true);
        assert_eq!(
            step(&syn, &policy, &mut guard, 1, &mut kernel),
            Did::Deliver
        );
        assert_eq!(
            step(&ack, &policy, &mut guard, 2, &mut kernel),
            Did::Deliver
        );
        assert_eq!(asked, 1);
    }

    #[test]
    fn the_caches_are_bounded() {
        let mut guard = ChainGuard::new(
            ChainBudget {
                lookups_per_second: u32::MAX,
                relays_per_second: 1,
            },
            0,
        );
        let vip: SocketAddr = "198.18.100.1:80".parse().unwrap();
        for i in 0..(PRESENT_CAPACITY as u32 + 1000) {
            let [a, b, c, d] = (0x0a00_0000 | i).to_be_bytes();
            let remote = SocketAddr::new(IpAddr::from([a, b, c, d]), 1000);
            guard.has_connection(vip, remote, 0, &mut |_, _| true);
            guard.has_connection(vip, remote, 0, &mut |_, _| true);
        }
        assert_eq!(guard.present_len(), PRESENT_CAPACITY);
        assert_eq!(guard.absent.len(), ABSENT_SLOTS);
        guard.expire(nanos(PRESENT_TTL) + 1);
        assert_eq!(guard.present_len(), 0);
    }
}

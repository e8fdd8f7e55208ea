//! Rise/fall dampening: a pure state machine from a stream of probe results to a health state.
//!
//! Invariant: a healthy backend turns unhealthy only on the `fall`-th consecutive failure, and an
//! unhealthy one turns healthy only on the `rise`-th consecutive success. A result that agrees
//! with the current state resets the count, so a stream whose runs of failures are all shorter
//! than `fall` and whose runs of successes are all shorter than `rise` (a flapping backend)
//! never changes the state. No clock, no I/O: the same stream always gives the same states.

/// A change of health state, returned by [`HealthState::observe`] when it happens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transition {
    /// Unhealthy → healthy, after `rise` consecutive successes.
    Up,
    /// Healthy → unhealthy, after `fall` consecutive failures.
    Down,
}

impl Transition {
    /// The state after the transition: `true` for healthy.
    #[must_use]
    pub fn healthy(self) -> bool {
        matches!(self, Self::Up)
    }
}

/// The dampened health of one backend as seen by one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthState {
    healthy: bool,
    /// Consecutive results that disagree with `healthy` (always below the threshold that
    /// would flip it).
    streak: u32,
    rise: u32,
    fall: u32,
}

impl HealthState {
    /// A state starting `initial` (`true`: healthy), turning healthy after `rise` consecutive
    /// successes and unhealthy after `fall` consecutive failures. A count of 0 is taken as 1
    /// (validated configs never have 0).
    #[must_use]
    pub fn new(initial: bool, rise: u32, fall: u32) -> Self {
        Self {
            healthy: initial,
            streak: 0,
            rise: rise.max(1),
            fall: fall.max(1),
        }
    }

    /// Whether the backend is healthy now.
    #[must_use]
    pub fn healthy(&self) -> bool {
        self.healthy
    }

    /// Consecutive results so far that disagree with the current state.
    #[must_use]
    pub fn streak(&self) -> u32 {
        self.streak
    }

    /// Feeds one probe result; returns the transition it causes, if any.
    pub fn observe(&mut self, success: bool) -> Option<Transition> {
        if success == self.healthy {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if success { self.rise } else { self.fall };
        if self.streak < needed {
            return None;
        }
        self.healthy = success;
        self.streak = 0;
        Some(if success {
            Transition::Up
        } else {
            Transition::Down
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run(state: &mut HealthState, stream: &[bool]) -> Vec<(usize, Transition)> {
        stream
            .iter()
            .enumerate()
            .filter_map(|(i, &s)| state.observe(s).map(|t| (i, t)))
            .collect()
    }

    #[test]
    fn falls_after_fall_failures_and_rises_after_rise_successes() {
        let mut s = HealthState::new(true, 2, 3);
        assert_eq!(s.observe(false), None);
        assert_eq!(s.observe(false), None);
        assert_eq!(s.observe(false), Some(Transition::Down));
        assert!(!s.healthy());
        assert_eq!(s.observe(false), None);
        assert_eq!(s.observe(true), None);
        assert_eq!(s.observe(true), Some(Transition::Up));
        assert!(s.healthy());
    }

    #[test]
    fn flapping_stream_does_not_flap_the_state() {
        // Alternating results, from either state, with the default rise 2 / fall 3.
        for initial in [true, false] {
            let mut s = HealthState::new(initial, 2, 3);
            let alternating: Vec<bool> = (0..1000).map(|i| i % 2 == 0).collect();
            assert_eq!(run(&mut s, &alternating), []);
            assert_eq!(s.healthy(), initial);
        }
        // Runs of two failures between single successes never reach fall = 3.
        let mut s = HealthState::new(true, 2, 3);
        let pattern = [false, false, true].repeat(300);
        assert_eq!(run(&mut s, &pattern), []);
        assert!(s.healthy());
    }

    #[test]
    fn an_agreeing_result_resets_the_count() {
        let mut s = HealthState::new(true, 1, 3);
        assert_eq!(run(&mut s, &[false, false, true, false, false]), []);
        assert_eq!(s.streak(), 2);
        assert_eq!(s.observe(false), Some(Transition::Down));
        assert_eq!(s.streak(), 0);
    }

    #[test]
    fn rise_and_fall_of_one_follow_every_result() {
        let mut s = HealthState::new(true, 1, 1);
        assert_eq!(
            run(&mut s, &[false, true, true, false]),
            [
                (0, Transition::Down),
                (1, Transition::Up),
                (3, Transition::Down)
            ]
        );
        let mut zero = HealthState::new(true, 0, 0);
        assert_eq!(zero.observe(false), Some(Transition::Down));
    }

    proptest! {
        /// A stream alternating runs of any length that agree with the state and runs that
        /// disagree but are shorter than rise (successes) or fall (failures) never changes it.
        #[test]
        fn short_runs_never_transition(
            initial in any::<bool>(),
            rise in 1u32..8,
            fall in 1u32..8,
            runs in proptest::collection::vec(1u32..8, 0..60),
        ) {
            let mut s = HealthState::new(initial, rise, fall);
            let mut value = !initial;
            for len in runs {
                let len = if value == initial {
                    len
                } else {
                    len.min(if value { rise } else { fall } - 1)
                };
                for _ in 0..len {
                    prop_assert_eq!(s.observe(value), None);
                }
                prop_assert_eq!(s.healthy(), initial);
                value = !value;
            }
        }

        /// Transitions alternate, each comes exactly when the last `rise` (or `fall`) results
        /// are all successes (failures) since the previous transition, and the state always
        /// matches a run that reached its threshold.
        #[test]
        fn transitions_match_the_definition(
            initial in any::<bool>(),
            rise in 1u32..6,
            fall in 1u32..6,
            stream in proptest::collection::vec(any::<bool>(), 0..300),
        ) {
            let mut s = HealthState::new(initial, rise, fall);
            let mut healthy = initial;
            let mut since_change: Vec<bool> = Vec::new();
            for &r in &stream {
                since_change.push(r);
                let t = s.observe(r);
                // Disagreeing results at the end of the stream since the last change.
                let tail = since_change.iter().rev().take_while(|&&x| x != healthy).count();
                let needed = if healthy { fall } else { rise } as usize;
                let expected = tail >= needed;
                prop_assert_eq!(t.is_some(), expected);
                if let Some(t) = t {
                    prop_assert_eq!(t.healthy(), !healthy);
                    prop_assert_eq!(tail, needed);
                    healthy = !healthy;
                    since_change.clear();
                }
                prop_assert_eq!(s.healthy(), healthy);
            }
        }
    }
}

//! Fleet-stable hashing: fixed xxh3 seeds and range reduction.
//!
//! Invariant: every value computed here depends only on its input bytes and the constants below,
//! never on the process, the machine or the Rust release. `std`'s `DefaultHasher` and
//! `RandomState` are never used, because their output may change between releases and is
//! randomised per process; two muxes built from different compilers must still agree.
//!
//! Changing any seed changes every Maglev table and every flow-to-backend mapping of the fleet.
//! Golden tests pin the results (`maglev::tests::golden_fingerprint`, `flow::tests::golden_hashes`),
//! so such a change fails loudly instead of silently splitting a fleet running mixed versions.

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Seed of h1 in Maglev's permutation: a backend's `offset = h1(id) mod M` (ASCII "maglevof").
pub const MAGLEV_OFFSET_SEED: u64 = 0x6d61_676c_6576_6f66;
/// Seed of h2 in Maglev's permutation: a backend's `skip = h2(id) mod (M-1) + 1` (ASCII "maglevsk").
pub const MAGLEV_SKIP_SEED: u64 = 0x6d61_676c_6576_736b;
/// Seed of the flow hash that picks a table slot for a 5-tuple (ASCII "lb-flow5").
pub const FLOW_SEED: u64 = 0x6c62_2d66_6c6f_7735;
/// Seed of the table fingerprint (ASCII "lbtblfpr").
pub const FINGERPRINT_SEED: u64 = 0x6c62_7462_6c66_7072;

/// xxh3-64 of `bytes` with one of the fixed seeds above.
#[inline]
#[must_use]
pub fn xxh3(bytes: &[u8], seed: u64) -> u64 {
    xxh3_64_with_seed(bytes, seed)
}

/// Maps a 64-bit hash uniformly onto `[0, range)` with one multiplication and a shift
/// (Lemire, "Fast Random Integer Generation in an Interval", 2019), instead of a division.
///
/// It uses the high bits of the hash, which xxh3 mixes as well as the low ones.
#[inline]
#[must_use]
pub fn fast_range(hash: u64, range: u32) -> u32 {
    // The product of a u64 and a u32 shifted right by 64 is below `range`, so it fits in a u32.
    ((u128::from(hash) * u128::from(range)) >> 64) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn fast_range_stays_in_range(hash in any::<u64>(), range in 1u32..) {
            prop_assert!(fast_range(hash, range) < range);
        }
    }

    #[test]
    fn fast_range_covers_the_ends() {
        assert_eq!(fast_range(0, 65537), 0);
        assert_eq!(fast_range(u64::MAX, 65537), 65536);
    }

    #[test]
    fn seeds_are_distinct() {
        let seeds = [
            MAGLEV_OFFSET_SEED,
            MAGLEV_SKIP_SEED,
            FLOW_SEED,
            FINGERPRINT_SEED,
        ];
        for (i, a) in seeds.iter().enumerate() {
            for b in &seeds[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }
}

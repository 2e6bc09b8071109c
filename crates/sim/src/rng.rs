//! The only source of randomness of the simulation: a small SplitMix64 generator, so that a seed
//! replays the same run on every machine and every Rust version.

use std::time::Duration;

/// A SplitMix64 pseudo-random generator (Steele, Lea, Flood 2014).
#[derive(Clone, Debug)]
pub struct Rng {
    state: u64,
}

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..bound` (0 when `bound` is 0). The modulo bias is irrelevant here.
    pub fn below(&mut self, bound: u64) -> u64 {
        if bound == 0 {
            0
        } else {
            self.next_u64() % bound
        }
    }

    /// An index in `0..len` (0 when `len` is 0).
    pub fn index(&mut self, len: usize) -> usize {
        // usize fits in u64 on every supported target, and the result is below `len`.
        usize::try_from(self.below(len as u64)).unwrap_or(0)
    }

    /// True with probability `per_mille / 1000`.
    pub fn chance(&mut self, per_mille: u32) -> bool {
        self.below(1000) < u64::from(per_mille)
    }

    /// A duration uniformly drawn in `min..=max` (nanosecond resolution).
    pub fn duration(&mut self, min: Duration, max: Duration) -> Duration {
        if max <= min {
            return min;
        }
        let span = u64::try_from((max - min).as_nanos()).unwrap_or(u64::MAX);
        min + Duration::from_nanos(self.below(span.saturating_add(1)))
    }

    /// A duration in milliseconds, uniformly drawn in `min_ms..=max_ms`.
    pub fn millis(&mut self, min_ms: u64, max_ms: u64) -> Duration {
        self.duration(Duration::from_millis(min_ms), Duration::from_millis(max_ms))
    }

    /// An independent generator, for a separate stream of decisions (so that drawing more in one
    /// stream does not shift the others).
    pub fn fork(&mut self) -> Rng {
        Rng::new(self.next_u64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_stream_and_bounds_hold() {
        let mut first = Rng::new(42);
        let mut second = Rng::new(42);
        for _ in 0..1000 {
            assert_eq!(first.next_u64(), second.next_u64());
            assert!(first.below(7) < 7);
            second.below(7);
            let drawn = first.millis(5, 9);
            second.millis(5, 9);
            assert!(drawn >= Duration::from_millis(5) && drawn <= Duration::from_millis(9));
        }
        assert_ne!(Rng::new(1).next_u64(), Rng::new(2).next_u64());
        assert_eq!(Rng::new(3).below(0), 0);
    }
}

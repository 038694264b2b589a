//! The one seeded generator behind everything random that is not sampling (random checkpoints,
//! benchmark prompts, the token sequences head scores are measured on): SplitMix64 (Steele, Lea
//! and Flood 2014, <https://doi.org/10.1145/2714064.2660195>), so the same seed gives the same
//! numbers on every machine, without another dependency. Sampling uses candle-transformers'
//! `LogitsProcessor` and its own generator.

/// A SplitMix64 stream.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// The stream that starts from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform on `0..n` (`n > 0`), up to a modulo bias below 2⁻⁴⁰ for the sizes used here.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Uniform with mean 0 and variance 1: on [-√3, √3], from 24 random bits.
    pub fn unit(&mut self) -> f32 {
        let u = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        (2.0 * u - 1.0) * 3f32.sqrt()
    }
}

/// FNV-1a of `name`: a seed per tensor name, so a random tensor does not depend on which other
/// tensors were made before it.
pub fn hash_name(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_matches_the_reference_sequence() {
        // The first outputs for seed 1234567 of the reference C code (Vigna's splitmix64.c).
        let mut r = SplitMix64::new(1234567);
        assert_eq!(r.next_u64(), 6457827717110365317);
        assert_eq!(r.next_u64(), 3203168211198807973);
        assert_eq!(r.next_u64(), 9817491932198370423);
    }

    #[test]
    fn unit_has_mean_zero_and_variance_one() {
        let mut r = SplitMix64::new(7);
        let v: Vec<f64> = (0..100_000).map(|_| r.unit() as f64).collect();
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(
            mean.abs() < 0.01 && (var - 1.0).abs() < 0.01,
            "{mean} {var}"
        );
        assert!(v.iter().all(|x| x.abs() <= 3f64.sqrt()));
    }
}

//! Choosing the next token: greedy argmax (temperature 0), or temperature plus
//! nucleus (top-p) sampling from a seeded, deterministic PRNG.

/// SplitMix64: tiny, fast, and the same sequence on every platform.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 53 bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Index of the largest logit; the first one on ties (as torch's argmax).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Greedy or temperature/top-p sampling.
#[derive(Debug, Clone)]
pub struct Sampler {
    temperature: f32,
    top_p: f32,
    rng: SplitMix64,
}

impl Sampler {
    /// `temperature <= 0` is greedy; `top_p` in (0, 1] keeps the smallest set of
    /// most likely tokens whose probability reaches it.
    pub fn new(temperature: f32, top_p: f32, seed: u64) -> Self {
        Sampler {
            temperature,
            top_p: if top_p > 0.0 && top_p <= 1.0 {
                top_p
            } else {
                1.0
            },
            rng: SplitMix64::new(seed),
        }
    }

    /// The next token.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.temperature <= 0.0 || !self.temperature.is_finite() {
            return argmax(logits);
        }
        let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let inv_t = 1.0 / self.temperature as f64;
        let mut probs: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, ((l - max) as f64 * inv_t).exp()))
            .collect();
        // Descending probability, ties by id: a total order, so runs are reproducible.
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let total: f64 = probs.iter().map(|p| p.1).sum();
        let mut keep = probs.len();
        let mut cum = 0.0;
        for (i, p) in probs.iter().enumerate() {
            cum += p.1 / total;
            if cum >= self.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        let kept = &probs[..keep];
        let mass: f64 = kept.iter().map(|p| p.1).sum();
        let mut u = self.rng.next_f64() * mass;
        for p in kept {
            if u < p.1 {
                return p.0;
            }
            u -= p.1;
        }
        kept[keep - 1].0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum() {
        assert_eq!(Sampler::new(0.0, 1.0, 0).sample(&[1.0, 3.0, 3.0, 2.0]), 1);
    }

    #[test]
    fn sampling_is_seeded_and_respects_top_p() {
        let logits = [2.0, 1.9, 0.0, -1.0, -5.0];
        let run = |seed| {
            let mut s = Sampler::new(1.0, 1.0, seed);
            (0..50).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(run(3), run(3));
        assert_ne!(run(3), run(4));
        // top_p small enough keeps only the best token.
        let mut s = Sampler::new(1.0, 0.1, 9);
        assert!((0..50).all(|_| s.sample(&logits) == 0));
        // top_p 0.6 keeps the two best (≈0.43 + 0.39).
        let mut s = Sampler::new(1.0, 0.6, 9);
        assert!((0..200).all(|_| s.sample(&logits) < 2));
    }
}

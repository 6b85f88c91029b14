//! Choosing the next token from logits: greedy, or temperature with nucleus (top-p) sampling
//! from a seeded generator, so that a seed repeats its output.

/// Settings of [`Sampler`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplerConfig {
    /// Softmax temperature. 0 picks the most likely token (greedy decoding).
    pub temperature: f32,
    /// Keeps the smallest set of most likely tokens whose probabilities sum to at least this
    /// (1 keeps all).
    pub top_p: f32,
    /// Seed of the random generator.
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> SamplerConfig {
        SamplerConfig { temperature: 0.0, top_p: 1.0, seed: 0 }
    }
}

/// Picks tokens from logits as its [`SamplerConfig`] sets.
#[derive(Debug, Clone)]
pub struct Sampler {
    config: SamplerConfig,
    state: u64,
}

impl Sampler {
    /// Creates a sampler. A temperature below 0 counts as 0 and `top_p` is clamped to (0, 1].
    pub fn new(config: SamplerConfig) -> Sampler {
        Sampler { config, state: config.seed }
    }

    /// Returns the next number of the SplitMix64 sequence (Steele, Lea and Flood, 2014).
    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Returns a uniform number in `[0, 1)`.
    fn next_unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Picks a token from one row of logits. NaN logits are never picked.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.config.temperature <= 0.0 || !self.config.temperature.is_finite() {
            return argmax(logits);
        }

        let inv_t = 1.0 / f64::from(self.config.temperature);
        let max = logits.iter().copied().filter(|v| !v.is_nan()).fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .filter(|(_, v)| !v.is_nan())
            .map(|(i, &v)| (i as u32, ((f64::from(v) - f64::from(max)) * inv_t).exp()))
            .collect();
        let total: f64 = probs.iter().map(|p| p.1).sum();
        if probs.is_empty() || total.is_nan() || total <= 0.0 {
            return argmax(logits);
        }

        // Keep the most likely tokens up to the top-p mass, then draw among them.
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let top_p = f64::from(self.config.top_p.clamp(f32::MIN_POSITIVE, 1.0));
        let mut nucleus_len = 0;
        let mut mass = 0.0;
        for p in &probs {
            mass += p.1 / total;
            nucleus_len += 1;
            if mass >= top_p {
                break;
            }
        }
        probs.truncate(nucleus_len);

        let nucleus_total: f64 = probs.iter().map(|p| p.1).sum();
        let mut target = self.next_unit() * nucleus_total;
        for &(id, p) in &probs {
            if target < p {
                return id;
            }
            target -= p;
        }
        probs[probs.len() - 1].0
    }
}

/// Returns the index of the largest logit, the first one on ties, ignoring NaN.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_value = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_value {
            best = i;
            best_value = v;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_largest() {
        let mut s = Sampler::new(SamplerConfig::default());
        assert_eq!(s.sample(&[0.1, 3.0, f32::NAN, 2.9]), 1);
        assert_eq!(argmax(&[f32::NAN, -1.0]), 1);
    }

    #[test]
    fn seed_repeats_and_top_p_cuts() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let config = SamplerConfig { temperature: 1.0, top_p: 0.9, seed: 42 };
        let draws = |c| {
            let mut s = Sampler::new(c);
            (0..200).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draws(config), draws(config));
        assert_ne!(draws(config), draws(SamplerConfig { seed: 43, ..config }));

        // With top-p 0.3 only the few most likely tokens may come out.
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        let narrow = draws(SamplerConfig { top_p: 0.3, ..config });
        let distinct: std::collections::BTreeSet<u32> = narrow.iter().copied().collect();
        assert!(distinct.len() > 1, "top-p 0.3 kept a single token: {distinct:?}");
        for id in &distinct {
            let rank = order.iter().position(|&i| i == *id as usize).unwrap();
            assert!(rank < 8, "token {id} of rank {rank} came out with top-p 0.3");
        }
    }

    #[test]
    fn temperature_sharpens() {
        let logits = [1.0f32, 0.0, 0.0, 0.0];
        let count_first = |t| {
            let mut s = Sampler::new(SamplerConfig { temperature: t, top_p: 1.0, seed: 1 });
            (0..2000).filter(|_| s.sample(&logits) == 0).count()
        };
        let cold = count_first(0.3);
        let warm = count_first(2.0);
        // Expected shares: 0.90 at t = 0.3 and 0.35 at t = 2.
        assert!(cold > 1750, "{cold}");
        assert!((550..850).contains(&warm), "{warm}");
    }
}

//! From logits to the next token: repeat penalty, then greedy (temperature 0) or temperature,
//! top-k and top-p sampling with a seedable generator.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 is greedy.
    pub temperature: f32,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`.
    pub top_p: Option<f32>,
    /// Keep the `top_k` most likely tokens; 0 or `None` keeps all.
    pub top_k: Option<usize>,
    /// Same seed, same tokens; `None` draws one from the OS.
    pub seed: Option<u64>,
    /// Logits of recently seen tokens are divided (if positive) or multiplied by this; 1 is off.
    pub repeat_penalty: f32,
    /// How many of the last tokens the penalty looks at.
    pub repeat_last_n: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_p: None,
            top_k: None,
            seed: None,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::invalid_argument(format!(
                "temperature must be a finite number >= 0, got {}",
                self.temperature
            )));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(Error::invalid_argument(format!(
                    "top_p must be in (0, 1], got {p}"
                )));
            }
        }
        if !(self.repeat_penalty.is_finite() && self.repeat_penalty > 0.0) {
            return Err(Error::invalid_argument(format!(
                "repeat_penalty must be a finite number > 0, got {}",
                self.repeat_penalty
            )));
        }
        Ok(())
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Reused between steps: (token, probability) candidates.
    candidates: Vec<(u32, f32)>,
    /// Reused between steps: (token, raw logit) of the tokens the penalty changed.
    penalized: Vec<(usize, f32)>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Self {
            params,
            rng,
            candidates: Vec::new(),
            penalized: Vec::new(),
        }
    }

    /// Picks the next token; `history` holds the tokens seen so far, prompt included. The
    /// penalty is applied to `logits` in place and undone before returning, so that the caller
    /// can take the raw log-probability of the pick without a copy of the logits.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        self.apply_repeat_penalty(logits, history);
        let id = self.pick(logits);
        for &(i, raw) in &self.penalized {
            logits[i] = raw;
        }
        id
    }

    fn pick(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature == 0.0 {
            return argmax(logits);
        }
        let inv_temp = 1.0 / self.params.temperature;
        self.candidates.clear();
        self.candidates.extend(
            logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (i as u32, l * inv_temp)),
        );
        let candidates = &mut self.candidates;
        if let Some(k) = self.params.top_k.filter(|&k| k > 0 && k < candidates.len()) {
            candidates.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
            candidates.truncate(k);
        }
        // Softmax over the survivors.
        let max = candidates
            .iter()
            .map(|c| c.1)
            .fold(f32::NEG_INFINITY, f32::max);
        let mut total = 0.0f64;
        for c in candidates.iter_mut() {
            c.1 = (c.1 - max).exp();
            total += f64::from(c.1);
        }
        if let Some(top_p) = self.params.top_p.filter(|&p| p < 1.0) {
            candidates.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
            let mut kept = 0.0f64;
            let mut keep = candidates.len();
            for (i, c) in candidates.iter().enumerate() {
                kept += f64::from(c.1);
                if kept >= f64::from(top_p) * total {
                    keep = i + 1;
                    break;
                }
            }
            candidates.truncate(keep);
            total = kept.min(total);
        }
        let mut target = self.rng.random::<f64>() * total;
        for &(id, weight) in candidates.iter() {
            target -= f64::from(weight);
            if target <= 0.0 {
                return id;
            }
        }
        // Rounding left a sliver of mass: the last survivor takes it.
        candidates.last().map_or(0, |c| c.0)
    }

    fn apply_repeat_penalty(&mut self, logits: &mut [f32], history: &[u32]) {
        self.penalized.clear();
        let penalty = self.params.repeat_penalty;
        if penalty == 1.0 || self.params.repeat_last_n == 0 {
            return;
        }
        let recent = &history[history.len().saturating_sub(self.params.repeat_last_n)..];
        let mut seen = std::collections::HashSet::with_capacity(recent.len());
        for &id in recent {
            if !seen.insert(id) {
                continue;
            }
            if let Some(l) = logits.get_mut(id as usize) {
                self.penalized.push((id as usize, *l));
                *l = if *l >= 0.0 {
                    *l / penalty
                } else {
                    *l * penalty
                };
            }
        }
    }
}

pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// `log_softmax(logits)[id]`, computed in f64.
pub fn log_prob(logits: &[f32], id: u32) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    (f64::from(logits[id as usize] - max) - sum.ln()) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            seed: Some(7),
            ..SamplingParams::default()
        }
    }

    #[test]
    fn greedy_takes_the_largest_logit() {
        let mut s = Sampler::new(params(0.0));
        assert_eq!(s.sample(&mut [0.1, 3.0, -1.0, 2.9], &[]), 1);
    }

    #[test]
    fn repeat_penalty_demotes_recent_tokens() {
        let mut s = Sampler::new(SamplingParams {
            repeat_penalty: 2.0,
            ..params(0.0)
        });
        // 3.0 / 2 = 1.5 < 2.9: token 1 was just seen, token 3 wins.
        assert_eq!(s.sample(&mut [0.1, 3.0, -1.0, 2.9], &[1]), 3);
        // Negative logits are multiplied: -1 * 2 = -2 falls below -1.5.
        let mut logits = [-1.5, -1.0];
        assert_eq!(s.sample(&mut logits, &[1]), 0);
        // And the caller gets its logits back as they were.
        assert_eq!(logits, [-1.5, -1.0]);
    }

    #[test]
    fn repeat_last_n_limits_the_window() {
        let mut s = Sampler::new(SamplingParams {
            repeat_penalty: 2.0,
            repeat_last_n: 1,
            ..params(0.0)
        });
        // Token 1 is two steps back, out of the window: not penalized.
        assert_eq!(s.sample(&mut [0.1, 3.0, -1.0, 2.9], &[1, 0]), 1);
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin()).collect();
        let draw = |seed| {
            let mut s = Sampler::new(SamplingParams {
                seed: Some(seed),
                ..params(1.0)
            });
            (0..50)
                .map(|_| s.sample(&mut logits.clone(), &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(1), draw(1));
        assert_ne!(draw(1), draw(2));
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut s = Sampler::new(SamplingParams {
            top_k: Some(1),
            ..params(5.0)
        });
        for _ in 0..20 {
            assert_eq!(s.sample(&mut [0.1, 3.0, -1.0, 2.9], &[]), 1);
        }
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // Probabilities about 0.64, 0.24, 0.09, 0.03: top_p 0.7 keeps the first two.
        let mut s = Sampler::new(SamplingParams {
            top_p: Some(0.7),
            ..params(1.0)
        });
        let mut seen = [0usize; 4];
        for _ in 0..2000 {
            seen[s.sample(&mut [3.0, 2.0, 1.0, 0.0], &[]) as usize] += 1;
        }
        assert_eq!(seen[2] + seen[3], 0, "{seen:?}");
        assert!(seen[1] > 300, "{seen:?}");
    }

    #[test]
    fn temperature_sampling_follows_the_distribution() {
        let mut s = Sampler::new(params(1.0));
        let mut seen = [0usize; 2];
        for _ in 0..4000 {
            seen[s.sample(&mut [0.0, 2.0f32.ln()], &[]) as usize] += 1;
        }
        // Probabilities 1/3 and 2/3.
        let share = seen[1] as f64 / 4000.0;
        assert!((share - 2.0 / 3.0).abs() < 0.04, "{seen:?}");
    }

    #[test]
    fn invalid_parameters_name_the_argument() {
        let bad = [
            SamplingParams {
                temperature: -1.0,
                ..params(1.0)
            },
            SamplingParams {
                top_p: Some(0.0),
                ..params(1.0)
            },
            SamplingParams {
                top_p: Some(1.5),
                ..params(1.0)
            },
            SamplingParams {
                repeat_penalty: 0.0,
                ..params(1.0)
            },
        ];
        let names = ["temperature", "top_p", "top_p", "repeat_penalty"];
        for (p, name) in bad.iter().zip(names) {
            let err = p.validate().unwrap_err().to_string();
            assert!(err.starts_with(name), "{err}");
        }
    }

    #[test]
    fn log_prob_is_log_softmax() {
        let lp = log_prob(&[1.0, 2.0, 3.0], 2);
        let expected = 3.0 - (1f64.exp() + 2f64.exp() + 3f64.exp()).ln();
        assert!((f64::from(lp) - expected).abs() < 1e-6);
    }
}

//! From logits to the next token: logit bias and penalties (repeat; presence and frequency, as
//! OpenAI's), then greedy (temperature 0) or temperature, top-k, top-p and min-p sampling with a
//! seedable generator.

use std::collections::HashMap;

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
    /// Subtracted once from the logit of every token this sampler has already picked.
    pub presence_penalty: f32,
    /// Subtracted from the logit of a token as many times as this sampler has picked it.
    pub frequency_penalty: f32,
    /// Added to the logits of these tokens before anything else (OpenAI's `logit_bias`).
    pub logit_bias: Vec<(u32, f32)>,
    /// Drop tokens less likely than `min_p` times the most likely one (after temperature).
    pub min_p: Option<f32>,
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
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            min_p: None,
        }
    }
}

/// OpenAI's bounds on its penalties and biases.
pub const MAX_PENALTY: f32 = 2.0;
pub const MAX_LOGIT_BIAS: f32 = 100.0;

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
        if let Some(p) = self.min_p {
            if !(0.0..=1.0).contains(&p) {
                return Err(Error::invalid_argument(format!(
                    "min_p must be in [0, 1], got {p}"
                )));
            }
        }
        for (name, value) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-MAX_PENALTY..=MAX_PENALTY).contains(&value) {
                return Err(Error::invalid_argument(format!(
                    "{name} must be in [-{MAX_PENALTY}, {MAX_PENALTY}], got {value}"
                )));
            }
        }
        for &(id, bias) in &self.logit_bias {
            if !(-MAX_LOGIT_BIAS..=MAX_LOGIT_BIAS).contains(&bias) {
                return Err(Error::invalid_argument(format!(
                    "logit_bias[{id}] must be in [-{MAX_LOGIT_BIAS}, {MAX_LOGIT_BIAS}], got {bias}"
                )));
            }
        }
        Ok(())
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Reused between steps: (token, probability) candidates.
    candidates: Vec<(u32, f32)>,
    /// Reused between steps: (token, raw logit) of the tokens the penalties changed, in the
    /// order changed (a token may appear more than once; its first entry holds the raw logit).
    penalized: Vec<(usize, f32)>,
    /// How many times this sampler picked each token, for the presence and frequency penalties.
    picked: HashMap<u32, u32>,
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
            picked: HashMap::new(),
        }
    }

    /// Picks the next token; `history` holds the tokens seen so far, prompt included. Biases
    /// and penalties are applied to `logits` in place and undone before returning, so that the
    /// caller can take the raw log-probability of the pick without a copy of the logits.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let id = self.propose(logits, history, None).unwrap_or(0);
        self.accept(id);
        id
    }

    /// [`sample`](Self::sample) in two steps, for a caller that may refuse the pick and ask
    /// again among the tokens `allowed` says yes to: the pick, or `None` when none is allowed.
    /// Nothing is counted until [`accept`](Self::accept).
    pub fn propose(
        &mut self,
        logits: &mut [f32],
        history: &[u32],
        allowed: Option<&dyn Fn(u32) -> bool>,
    ) -> Option<u32> {
        self.penalized.clear();
        self.apply_logit_bias(logits);
        self.apply_repeat_penalty(logits, history);
        self.apply_presence_and_frequency(logits);
        let id = self.pick(logits, allowed);
        for &(i, raw) in self.penalized.iter().rev() {
            logits[i] = raw;
        }
        id
    }

    /// `id` is the token taken: the presence and frequency penalties count it from now on.
    pub fn accept(&mut self, id: u32) {
        *self.picked.entry(id).or_default() += 1;
    }

    /// Sets `logits[id]` to `value`, remembering the value before.
    fn adjust(&mut self, logits: &mut [f32], id: u32, value: impl FnOnce(f32) -> f32) {
        if let Some(l) = logits.get_mut(id as usize) {
            self.penalized.push((id as usize, *l));
            *l = value(*l);
        }
    }

    fn apply_logit_bias(&mut self, logits: &mut [f32]) {
        for i in 0..self.params.logit_bias.len() {
            let (id, bias) = self.params.logit_bias[i];
            self.adjust(logits, id, |l| l + bias);
        }
    }

    fn apply_presence_and_frequency(&mut self, logits: &mut [f32]) {
        let (presence, frequency) = (self.params.presence_penalty, self.params.frequency_penalty);
        if presence == 0.0 && frequency == 0.0 {
            return;
        }
        let picked = std::mem::take(&mut self.picked);
        for (&id, &count) in &picked {
            self.adjust(logits, id, |l| l - presence - frequency * count as f32);
        }
        self.picked = picked;
    }

    fn pick(&mut self, logits: &[f32], allowed: Option<&dyn Fn(u32) -> bool>) -> Option<u32> {
        if self.params.temperature == 0.0 {
            return match allowed {
                None => Some(argmax(logits)),
                Some(allowed) => argmax_where(logits, allowed),
            };
        }
        let allowed = |id: u32| allowed.is_none_or(|allowed| allowed(id));
        let inv_temp = 1.0 / self.params.temperature;
        self.candidates.clear();
        self.candidates.extend(
            logits
                .iter()
                .enumerate()
                .filter(|&(i, _)| allowed(i as u32))
                .map(|(i, &l)| (i as u32, l * inv_temp)),
        );
        if self.candidates.is_empty() {
            return None;
        }
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
        // After the shift by the maximum, the most likely survivor has weight 1.
        if let Some(min_p) = self.params.min_p.filter(|&p| p > 0.0) {
            candidates.retain(|c| c.1 >= min_p);
            total = candidates.iter().map(|c| f64::from(c.1)).sum();
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
                return Some(id);
            }
        }
        // Rounding left a sliver of mass: the last survivor takes it.
        candidates.last().map(|c| c.0)
    }

    fn apply_repeat_penalty(&mut self, logits: &mut [f32], history: &[u32]) {
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
            self.adjust(
                logits,
                id,
                |l| if l >= 0.0 { l / penalty } else { l * penalty },
            );
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

/// The largest logit among the tokens `allowed` says yes to, if any.
fn argmax_where(logits: &[f32], allowed: &dyn Fn(u32) -> bool) -> Option<u32> {
    let mut best: Option<(u32, f32)> = None;
    for (i, &l) in logits.iter().enumerate() {
        if best.is_none_or(|(_, b)| l > b) && allowed(i as u32) {
            best = Some((i as u32, l));
        }
    }
    best.map(|(id, _)| id)
}

/// `log_softmax(logits)[id]`, computed in f64.
#[cfg(test)]
pub fn log_prob(logits: &[f32], id: u32) -> f32 {
    LogSoftmax::of(logits).at(logits, id)
}

/// What `log_softmax` needs of a row of logits, computed once for any number of lookups.
pub struct LogSoftmax {
    max: f32,
    log_sum: f64,
}

impl LogSoftmax {
    pub fn of(logits: &[f32]) -> Self {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
        Self {
            max,
            log_sum: sum.ln(),
        }
    }

    pub fn at(&self, logits: &[f32], id: u32) -> f32 {
        (f64::from(logits[id as usize] - self.max) - self.log_sum) as f32
    }

    /// The `k` most likely tokens with their log-probabilities, most likely first (ties by id).
    pub fn top(&self, logits: &[f32], k: usize) -> Vec<(u32, f32)> {
        let mut best: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
        if k == 0 {
            return best;
        }
        for (i, &l) in logits.iter().enumerate() {
            if best.len() == k && l <= best[k - 1].1 {
                continue;
            }
            let at = best.partition_point(|&(_, b)| b >= l);
            best.insert(at, (i as u32, l));
            best.truncate(k);
        }
        for entry in &mut best {
            entry.1 = self.at(logits, entry.0);
        }
        best
    }
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
            SamplingParams {
                min_p: Some(1.5),
                ..params(1.0)
            },
            SamplingParams {
                presence_penalty: 2.5,
                ..params(1.0)
            },
            SamplingParams {
                frequency_penalty: f32::NAN,
                ..params(1.0)
            },
            SamplingParams {
                logit_bias: vec![(3, 101.0)],
                ..params(1.0)
            },
        ];
        let names = [
            "temperature",
            "top_p",
            "top_p",
            "repeat_penalty",
            "min_p",
            "presence_penalty",
            "frequency_penalty",
            "logit_bias[3]",
        ];
        for (p, name) in bad.iter().zip(names) {
            let err = p.validate().unwrap_err().to_string();
            assert!(err.starts_with(name), "{err}");
        }
    }

    #[test]
    fn logit_bias_moves_greedy_and_is_undone() {
        let mut s = Sampler::new(SamplingParams {
            logit_bias: vec![(0, 5.0), (1, -100.0)],
            ..params(0.0)
        });
        let mut logits = [0.1, 3.0, -1.0, 2.9];
        assert_eq!(s.sample(&mut logits, &[]), 0);
        assert_eq!(logits, [0.1, 3.0, -1.0, 2.9]);
    }

    #[test]
    fn presence_and_frequency_count_the_samplers_own_picks() {
        // Token 1 leads token 3 by 0.1: picked once, a presence penalty of 0.2 hands the lead over.
        let mut s = Sampler::new(SamplingParams {
            presence_penalty: 0.2,
            ..params(0.0)
        });
        let logits = [0.1, 3.0, -1.0, 2.9];
        // The prompt (history) does not count: only what the sampler picked.
        assert_eq!(s.sample(&mut logits.clone(), &[1, 1, 1]), 1);
        assert_eq!(s.sample(&mut logits.clone(), &[]), 3);
        // Then both have been picked once: token 1 leads again.
        assert_eq!(s.sample(&mut logits.clone(), &[]), 1);

        // Frequency scales with the count: after two picks of token 1 at 0.06, 3.0 - 0.12 < 2.9.
        let mut s = Sampler::new(SamplingParams {
            frequency_penalty: 0.06,
            ..params(0.0)
        });
        assert_eq!(s.sample(&mut logits.clone(), &[]), 1);
        assert_eq!(s.sample(&mut logits.clone(), &[]), 1);
        assert_eq!(s.sample(&mut logits.clone(), &[]), 3);
    }

    #[test]
    fn penalties_on_one_token_are_undone_to_the_raw_logit() {
        let mut s = Sampler::new(SamplingParams {
            logit_bias: vec![(1, 1.0)],
            repeat_penalty: 2.0,
            presence_penalty: 0.5,
            ..params(0.0)
        });
        let mut logits = [0.1, 3.0];
        s.sample(&mut logits, &[1]);
        s.sample(&mut logits, &[1]);
        assert_eq!(logits, [0.1, 3.0]);
    }

    #[test]
    fn min_p_drops_the_unlikely() {
        // Probabilities relative to the best: 1, e^-1 = 0.37, e^-3 = 0.05.
        let mut s = Sampler::new(SamplingParams {
            min_p: Some(0.2),
            ..params(1.0)
        });
        let mut seen = [0usize; 3];
        for _ in 0..2000 {
            seen[s.sample(&mut [3.0, 2.0, 0.0], &[]) as usize] += 1;
        }
        assert_eq!(seen[2], 0, "{seen:?}");
        assert!(seen[1] > 300, "{seen:?}");
    }

    #[test]
    fn top_log_probs_are_sorted_and_exact() {
        let logits = [1.0, 4.0, 2.0, 4.0, -3.0];
        let softmax = LogSoftmax::of(&logits);
        let top = softmax.top(&logits, 3);
        let ids: Vec<u32> = top.iter().map(|t| t.0).collect();
        assert_eq!(ids, [1, 3, 2]);
        for &(id, lp) in &top {
            assert_eq!(lp, log_prob(&logits, id));
        }
        assert_eq!(softmax.top(&logits, 9).len(), logits.len());
        assert!(softmax.top(&logits, 0).is_empty());
    }

    #[test]
    fn log_prob_is_log_softmax() {
        let lp = log_prob(&[1.0, 2.0, 3.0], 2);
        let expected = 3.0 - (1f64.exp() + 2f64.exp() + 3f64.exp()).ln();
        assert!((f64::from(lp) - expected).abs() < 1e-6);
    }
}

//! The Phi-3 forward pass over candle tensors. The weights are immutable and shared by every
//! generation; each generation brings its own [`KvCache`].
//!
//! Per layer: `x += attn_output(attention(rope(qkv(rms_norm(x)))))`, then
//! `x += ffn_down(silu(gate) * up)` with `[gate, up] = ffn_up(rms_norm(x))`.

use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor, D};

use super::config::Config;
use super::kv_cache::KvCache;
use super::linear::Linear;
use super::rope::{use_long_factors, RopeTables};
use super::weights::WeightLoader;
use crate::error::{Error, Result};
use crate::gguf::names::tensors as names;
use crate::gguf::GgufFile;

/// Query, key and value projections: fused in one matrix (`attn_qkv`) in Phi-3 files, three
/// matrices in some converters' output.
enum QkvProjection {
    Fused(Linear),
    Split { q: Linear, k: Linear, v: Linear },
}

struct Layer {
    /// `(embedding_length,)`
    attn_norm: Tensor,
    qkv: QkvProjection,
    /// `(embedding_length, head_count * head_dim)`
    attn_output: Linear,
    /// `(embedding_length,)`
    ffn_norm: Tensor,
    /// `(2 * feed_forward_length, embedding_length)`: gate rows, then up rows.
    ffn_up: Linear,
    /// `(embedding_length, feed_forward_length)`
    ffn_down: Linear,
}

/// Most entries (positions × rotated frequency pairs) of the cos/sin tables built at load, each
/// table an f32 per entry: 2^24 (128 MiB for both) is twice what Phi-3-medium-128k needs at its
/// full context. A file alone cannot make `load` allocate more.
const MAX_ROPE_TABLE_ENTRIES: usize = 1 << 24;

pub struct Phi3Model {
    config: Config,
    /// Positions this instance serves (its KV caches and RoPE tables never exceed it).
    context_length: usize,
    vocab_size: usize,
    /// `(vocab, embedding_length)`, looked up row by row without dequantizing the table.
    token_embedding: Arc<QTensor>,
    layers: Vec<Layer>,
    /// `(embedding_length,)`
    output_norm: Tensor,
    /// `(vocab, embedding_length)`; the embedding table itself when the file ties them.
    output: Linear,
    rope: RopeTables,
}

impl Phi3Model {
    /// Builds the model from `file`, for contexts of up to `context_length` positions
    /// (default: the original training context, which selects LongRoPE's short factors).
    pub fn load(file: &GgufFile, context_length: Option<usize>) -> Result<Self> {
        let config = Config::from_metadata(file.metadata())?;
        let context_length = match context_length {
            None => config.original_context_length.min(config.context_length),
            Some(0) => return Err(Error::invalid_argument("context_length must be at least 1")),
            Some(n) if n > config.context_length => {
                return Err(Error::invalid_argument(format!(
                    "context_length {n} is over the model's maximum of {}",
                    config.context_length
                )))
            }
            Some(n) => n,
        };
        let rope_entries = context_length.saturating_mul(config.rope_dim / 2);
        if rope_entries > MAX_ROPE_TABLE_ENTRIES {
            return Err(Error::unsupported(format!(
                "a context_length of {context_length} with {} rotated dimensions per head needs \
                 RoPE tables of {rope_entries} entries, over the limit of \
                 {MAX_ROPE_TABLE_ENTRIES}: load with a smaller context_length",
                config.rope_dim
            )));
        }
        let w = WeightLoader::new(file);
        let n_embd = config.embedding_length;

        let embd_info = file.tensor(names::TOKEN_EMBD).ok_or_else(|| {
            Error::unsupported(format!("tensor '{}' is missing", names::TOKEN_EMBD))
        })?;
        let vocab_size = match embd_info.dims.as_slice() {
            [cols, rows] if *cols == n_embd && *rows > 0 => *rows,
            dims => {
                return Err(Error::unsupported(format!(
                    "tensor '{}' has shape {dims:?}, expected [{n_embd}, vocab]",
                    names::TOKEN_EMBD
                )))
            }
        };
        let token_embedding = w.qtensor(names::TOKEN_EMBD, n_embd, vocab_size)?;
        let output = if w.has(names::OUTPUT) {
            w.matmul(names::OUTPUT, n_embd, vocab_size)?
        } else {
            Linear::new(token_embedding.clone())?
        };
        let output_norm = w.vector_tensor(names::OUTPUT_NORM, n_embd)?;

        let q_width = config.head_count * config.head_dim;
        let kv_width = config.kv_width();
        let n_ff = config.feed_forward_length;
        let layers = (0..config.block_count)
            .map(|i| {
                let name = |suffix| names::layer(i, suffix);
                let qkv = if w.has(&name(names::ATTN_QKV)) {
                    QkvProjection::Fused(w.matmul(
                        &name(names::ATTN_QKV),
                        n_embd,
                        config.qkv_width(),
                    )?)
                } else {
                    QkvProjection::Split {
                        q: w.matmul(&name(names::ATTN_Q), n_embd, q_width)?,
                        k: w.matmul(&name(names::ATTN_K), n_embd, kv_width)?,
                        v: w.matmul(&name(names::ATTN_V), n_embd, kv_width)?,
                    }
                };
                Ok(Layer {
                    attn_norm: w.vector_tensor(&name(names::ATTN_NORM), n_embd)?,
                    qkv,
                    attn_output: w.matmul(&name(names::ATTN_OUTPUT), q_width, n_embd)?,
                    ffn_norm: w.vector_tensor(&name(names::FFN_NORM), n_embd)?,
                    ffn_up: w.matmul(&name(names::FFN_UP), n_embd, 2 * n_ff)?,
                    ffn_down: w.matmul(&name(names::FFN_DOWN), n_ff, n_embd)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;

        let factors_name = if use_long_factors(&config, context_length) {
            names::ROPE_FACTORS_LONG
        } else {
            names::ROPE_FACTORS_SHORT
        };
        let factors = if w.has(factors_name) {
            let factors = w.vector(factors_name, config.rope_dim / 2)?;
            // Divisors of the frequencies: 0 or less would make the tables inf or NaN.
            if let Some(i) = factors.iter().position(|&f| f <= 0.0) {
                return Err(Error::unsupported(format!(
                    "tensor '{factors_name}' holds a non-positive factor at index {i}"
                )));
            }
            Some(factors)
        } else {
            None
        };
        let rope = RopeTables::new(&config, factors.as_deref(), context_length)?;

        Ok(Self {
            config,
            context_length,
            vocab_size,
            token_embedding,
            layers,
            output_norm,
            output,
            rope,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn context_length(&self) -> usize {
        self.context_length
    }

    /// Rows of the embedding and output matrices.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// A cache with room for `capacity` positions to start with (it grows up to the context).
    pub fn new_cache(&self, capacity: usize) -> Result<KvCache> {
        KvCache::new(
            self.config.block_count,
            self.config.head_count_kv,
            self.config.head_dim,
            capacity,
            self.context_length,
        )
    }

    /// Runs `tokens` at positions `cache.len()..`, appends them to the cache and returns the
    /// logits `(vocab,)` of the last one.
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
        let seq = tokens.len();
        let start = cache.len();
        if seq == 0 {
            return Err(Error::invalid_argument("forward needs at least one token"));
        }
        if start + seq > self.context_length {
            return Err(Error::ContextOverflow {
                prompt_tokens: start + seq,
                context_length: self.context_length,
            });
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.vocab_size) {
            return Err(Error::invalid_argument(format!(
                "token id {bad} is out of range (vocabulary of {})",
                self.vocab_size
            )));
        }
        cache.reserve(seq)?;
        let ids = Tensor::from_slice(tokens, seq, &Device::Cpu)?;
        let mut x = self.token_embedding.embedding(&ids)?;
        let mask = self.attention_mask(start, seq)?;
        let eps = self.config.rms_eps;
        for (i, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, eps)?;
            let h = self.attention(i, layer, &h, start, mask.as_ref(), cache)?;
            x = (x + h)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, eps)?;
            let h = self.feed_forward(layer, &h)?;
            x = (x + h)?;
        }
        cache.advance(seq);
        let last = x.narrow(0, seq - 1, 1)?;
        let last = candle_nn::ops::rms_norm(&last, &self.output_norm, eps)?;
        let logits = self.output.forward(&last)?.squeeze(0)?;
        Ok(logits.to_vec1::<f32>()?)
    }

    /// First cached position that the batch starting at `start` may attend to.
    fn first_visible(&self, start: usize) -> usize {
        match self.config.sliding_window {
            Some(window) => (start + 1).saturating_sub(window),
            None => 0,
        }
    }

    /// `(seq, keys)` additive mask: causal, and within the sliding window. `None` when every
    /// key is visible to every query (a single decode step).
    fn attention_mask(&self, start: usize, seq: usize) -> Result<Option<Tensor>> {
        if seq == 1 {
            return Ok(None);
        }
        let first = self.first_visible(start);
        let keys = start + seq - first;
        let window = self.config.sliding_window.unwrap_or(usize::MAX);
        let mut mask = vec![0f32; seq * keys];
        for row in 0..seq {
            let pos = start + row;
            for (col, m) in mask[row * keys..(row + 1) * keys].iter_mut().enumerate() {
                let key_pos = first + col;
                if key_pos > pos || pos - key_pos >= window {
                    *m = f32::NEG_INFINITY;
                }
            }
        }
        Ok(Some(Tensor::from_vec(mask, (seq, keys), &Device::Cpu)?))
    }

    fn attention(
        &self,
        index: usize,
        layer: &Layer,
        x: &Tensor,
        start: usize,
        mask: Option<&Tensor>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let c = &self.config;
        let seq = x.dim(0)?;
        let (q, k, v) = match &layer.qkv {
            QkvProjection::Fused(qkv) => {
                let qkv = qkv.forward(x)?;
                let q_width = c.head_count * c.head_dim;
                (
                    qkv.narrow(D::Minus1, 0, q_width)?,
                    qkv.narrow(D::Minus1, q_width, c.kv_width())?,
                    qkv.narrow(D::Minus1, q_width + c.kv_width(), c.kv_width())?,
                )
            }
            QkvProjection::Split { q, k, v } => (q.forward(x)?, k.forward(x)?, v.forward(x)?),
        };
        let q = q.reshape((1, seq, c.head_count, c.head_dim))?;
        let k = k.reshape((1, seq, c.head_count_kv, c.head_dim))?;
        let q = self.rope.apply(&q, start, c.rope_dim)?;
        let k = self.rope.apply(&k, start, c.rope_dim)?;
        // (heads, seq, head_dim)
        let q = q.squeeze(0)?.transpose(0, 1)?.contiguous()?;
        let k = k.squeeze(0)?.transpose(0, 1)?.contiguous()?;
        let v = v
            .reshape((seq, c.head_count_kv, c.head_dim))?
            .transpose(0, 1)?
            .contiguous()?;
        cache.write(index, &k, &v)?;

        let first = self.first_visible(start);
        let group = c.head_count / c.head_count_kv;
        let scale = 1.0 / (c.head_dim as f64).sqrt();
        if seq == 1 {
            let q = q.flatten_all()?.to_vec1::<f32>()?;
            let mut out = vec![0f32; q.len()];
            cache.attend_one(index, &q, first, start + 1, group, scale as f32, &mut out);
            let out = Tensor::from_vec(out, (1, c.head_count * c.head_dim), &Device::Cpu)?;
            return layer.attn_output.forward(&out);
        }
        let (keys, values) = cache.view(index, first, start + seq)?;
        let n_keys = start + seq - first;
        // Grouped-query attention without copying K/V: the `group` query heads sharing one
        // KV head become extra rows of one matmul against it.
        let q = q.reshape((c.head_count_kv, group * seq, c.head_dim))?;
        let scores = (q.matmul(&keys.t()?)? * scale)?;
        let scores = match mask {
            None => scores,
            Some(mask) => scores
                .reshape((c.head_count_kv, group, seq, n_keys))?
                .broadcast_add(mask)?
                .reshape((c.head_count_kv, group * seq, n_keys))?,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs.matmul(&values)?;
        let out = out
            .reshape((c.head_count, seq, c.head_dim))?
            .transpose(0, 1)?
            .reshape((seq, c.head_count * c.head_dim))?;
        layer.attn_output.forward(&out)
    }

    fn feed_forward(&self, layer: &Layer, x: &Tensor) -> Result<Tensor> {
        let n_ff = self.config.feed_forward_length;
        let up = layer.ffn_up.forward(x)?;
        let gate = up.narrow(D::Minus1, 0, n_ff)?;
        let up = up.narrow(D::Minus1, n_ff, n_ff)?;
        let h = (candle_nn::ops::silu(&gate)? * up)?;
        Ok(layer.ffn_down.forward(&h)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::argmax;
    use crate::test_support::{fixture, ids, log_softmax, reference};

    /// Against llama.cpp's log-softmax at the last prompt position: the most likely token within
    /// 0.05 (it agrees far more tightly than the tail), the rest of the top 20 within 0.2 (llama.cpp
    /// rounds Q and the attention weights to f16, and candle quantizes Q8_0 activations per 256
    /// values: tails move by up to 0.17; a wrong RoPE or head layout moves them by whole units).
    /// Then the greedy continuation, exactly, where the margins make it stable.
    fn check_against_llamacpp(model_file: &str) {
        let refs = model_file.replace(".gguf", ".llamacpp.json");
        check_against(model_file, &refs, None);
    }

    fn check_against(model_file: &str, reference_file: &str, context_length: Option<usize>) {
        let file = GgufFile::open(fixture(model_file)).unwrap();
        let model = Phi3Model::load(&file, context_length).unwrap();
        let refs = reference(reference_file);
        for case in refs["cases"].as_array().unwrap() {
            let name = case["name"].as_str().unwrap();
            let prompt = ids(&case["prompt_ids"]);
            let mut cache = model.new_cache(prompt.len() + 64).unwrap();
            let logits = model.forward(&prompt, &mut cache).unwrap();
            let logprobs = log_softmax(&logits);
            for (rank, entry) in case["last_top64"]
                .as_array()
                .unwrap()
                .iter()
                .take(20)
                .enumerate()
            {
                let id = entry[0].as_u64().unwrap() as usize;
                let expected = entry[1].as_f64().unwrap();
                let tolerance = if rank == 0 { 0.05 } else { 0.2 };
                assert!(
                    (logprobs[id] - expected).abs() < tolerance,
                    "{model_file} {name}: token {id} logprob {} vs llama.cpp {expected}",
                    logprobs[id]
                );
            }
            if case["greedy_min_margin"].as_f64().unwrap() < 1.0 {
                continue;
            }
            let expected = ids(&case["greedy_ids"]);
            let mut generated = vec![];
            let mut next = argmax(&logits);
            while generated.len() < expected.len() {
                generated.push(next);
                next = argmax(&model.forward(&[next], &mut cache).unwrap());
            }
            assert_eq!(generated, expected, "{model_file} {name}: greedy ids");
        }
    }

    #[test]
    fn haiku_q4_k_m_matches_llamacpp() {
        check_against_llamacpp("tiny-phi3-haiku-q4_k_m.gguf");
    }

    #[test]
    fn haiku_q8_0_matches_llamacpp() {
        check_against_llamacpp("tiny-phi3-haiku-q8_0.gguf");
    }

    #[test]
    fn phi35_longrope_matches_llamacpp() {
        check_against_llamacpp("tiny-phi35-longrope-q4_k_m.gguf");
    }

    #[test]
    fn phi4mini_gqa_partial_rotary_tied_matches_llamacpp() {
        check_against_llamacpp("tiny-phi4mini-gqa-partial-tied-q4_k_m.gguf");
    }

    /// Past 4096 positions of context, LongRoPE switches to the long factors, which the model was
    /// not trained with: llama.cpp's answers change, and ours must change the same way.
    #[test]
    fn phi35_long_factors_match_llamacpp_at_8192() {
        check_against(
            "tiny-phi35-longrope-q4_k_m.gguf",
            "tiny-phi35-longrope-q4_k_m.ctx8192.llamacpp.json",
            Some(8192),
        );
    }

    /// 3,088 tokens, past the 2,047-token sliding window: transformers' reference model (which
    /// honours the window) within 0.1, in 512-token prefill chunks as generation runs them.
    #[test]
    fn sliding_window_matches_transformers() {
        let file = GgufFile::open(fixture("tiny-phi3-haiku-q8_0.gguf")).unwrap();
        let model = Phi3Model::load(&file, None).unwrap();
        let refs = reference("tiny-phi3-haiku-long-prompt.transformers.json");
        let prompt = ids(&refs["prompt_ids"]);
        let mut cache = model.new_cache(prompt.len()).unwrap();
        let mut logits = vec![];
        for chunk in prompt.chunks(512) {
            logits = model.forward(chunk, &mut cache).unwrap();
        }
        let logprobs = log_softmax(&logits);
        let expected: Vec<f64> = refs["reference_window"]["last_logsoftmax"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let mut top: Vec<usize> = (0..expected.len()).collect();
        top.sort_by(|&a, &b| expected[b].total_cmp(&expected[a]));
        for &id in &top[..20] {
            assert!(
                (logprobs[id] - expected[id]).abs() < 0.1,
                "token {id}: {} vs transformers {}",
                logprobs[id],
                expected[id]
            );
        }
    }
}

//! Every GGUF key and tensor name phi3 reads, in one place.

pub const GENERAL_ARCHITECTURE: &str = "general.architecture";
pub const GENERAL_NAME: &str = "general.name";

/// The one architecture phi3 runs: Phi-3, Phi-3.5 and Phi-4-mini files all declare it.
pub const ARCH_PHI3: &str = "phi3";

/// Hyper-parameter keys, prefixed with the architecture name.
pub mod hparams {
    pub const CONTEXT_LENGTH: &str = "context_length";
    pub const EMBEDDING_LENGTH: &str = "embedding_length";
    pub const FEED_FORWARD_LENGTH: &str = "feed_forward_length";
    pub const BLOCK_COUNT: &str = "block_count";
    pub const HEAD_COUNT: &str = "attention.head_count";
    pub const HEAD_COUNT_KV: &str = "attention.head_count_kv";
    pub const RMS_EPSILON: &str = "attention.layer_norm_rms_epsilon";
    pub const SLIDING_WINDOW: &str = "attention.sliding_window";
    pub const ROPE_DIMENSION_COUNT: &str = "rope.dimension_count";
    pub const ROPE_FREQ_BASE: &str = "rope.freq_base";
    pub const ROPE_ATTN_FACTOR: &str = "rope.scaling.attn_factor";
    pub const ROPE_ORIGINAL_CONTEXT: &str = "rope.scaling.original_context_length";

    /// `phi3.context_length` and friends.
    pub fn key(arch: &str, suffix: &str) -> String {
        format!("{arch}.{suffix}")
    }
}

pub mod tokenizer {
    pub const MODEL: &str = "tokenizer.ggml.model";
    pub const PRE: &str = "tokenizer.ggml.pre";
    pub const TOKENS: &str = "tokenizer.ggml.tokens";
    pub const SCORES: &str = "tokenizer.ggml.scores";
    pub const TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
    pub const MERGES: &str = "tokenizer.ggml.merges";
    pub const BOS_ID: &str = "tokenizer.ggml.bos_token_id";
    pub const EOS_ID: &str = "tokenizer.ggml.eos_token_id";
    pub const UNK_ID: &str = "tokenizer.ggml.unknown_token_id";
    #[cfg(test)]
    pub const PAD_ID: &str = "tokenizer.ggml.padding_token_id";
    pub const ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
    pub const ADD_SPACE_PREFIX: &str = "tokenizer.ggml.add_space_prefix";
    pub const CHAT_TEMPLATE: &str = "tokenizer.chat_template";
}

pub mod tensors {
    pub const TOKEN_EMBD: &str = "token_embd.weight";
    pub const OUTPUT_NORM: &str = "output_norm.weight";
    pub const OUTPUT: &str = "output.weight";
    pub const ROPE_FACTORS_SHORT: &str = "rope_factors_short.weight";
    pub const ROPE_FACTORS_LONG: &str = "rope_factors_long.weight";

    /// Per-layer tensors: `blk.{layer}.{suffix}`.
    pub const ATTN_NORM: &str = "attn_norm.weight";
    pub const ATTN_QKV: &str = "attn_qkv.weight";
    pub const ATTN_Q: &str = "attn_q.weight";
    pub const ATTN_K: &str = "attn_k.weight";
    pub const ATTN_V: &str = "attn_v.weight";
    pub const ATTN_OUTPUT: &str = "attn_output.weight";
    pub const FFN_NORM: &str = "ffn_norm.weight";
    /// Gate and up projections fused: `2 * n_ff` outputs, gate first.
    pub const FFN_UP: &str = "ffn_up.weight";
    pub const FFN_DOWN: &str = "ffn_down.weight";

    pub fn layer(layer: usize, suffix: &str) -> String {
        format!("blk.{layer}.{suffix}")
    }
}

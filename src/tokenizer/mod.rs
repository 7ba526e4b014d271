//! Text ↔ token ids, built from the GGUF file's own vocabulary (`tokenizer.ggml.*`) and matching
//! llama.cpp's ids: SentencePiece (`llama`, Phi-3 and Phi-3.5) or GPT-2 byte-level BPE (`gpt2`,
//! Phi-4 and Phi-4-mini), or a Hugging Face tokenizer.json in their place.
//!
//! Encoding first cuts special tokens out of the text (`Vocab::partition`), then hands each text
//! fragment to the model (`spm`, `bpe`). Decoding concatenates each token's bytes
//! (`token_bytes`); `DecodeStream` does the same incrementally.

mod bpe;
pub mod decode_stream;
mod hf;
mod spm;
mod vocab;

use std::path::Path;

pub use decode_stream::DecodeStream;

use self::bpe::{Bpe, PreTokenizerKind};
use self::spm::{Spm, SPACE};
use self::vocab::{parse_byte_token, Fragment, TokenEntry, TokenKind, Vocab};
use crate::error::{Error, Result};
use crate::gguf::names::{self, tokenizer as keys};
use crate::gguf::{Metadata, Value};

/// The largest vocabulary accepted (the Phi family's largest is Phi-4-mini's 200,064).
pub const MAX_VOCAB_SIZE: usize = 1 << 21;
/// The most merge rules accepted (Phi-4-mini has about 200,000).
pub const MAX_MERGES: usize = 1 << 22;

/// Tokens that end a generation besides EOS, by text. llama.cpp treats them as control tokens
/// whatever their declared type, and so does phi3.
const STOP_TEXTS: [&str; 4] = ["<|end|>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>"];

/// Special tokens that keep the whitespace after them under Phi-3's rule (llama.cpp).
const PHI3_NO_RSTRIP: [&str; 3] = ["<unk>", "<s>", "<|endoftext|>"];

/// A tokenizer: immutable once built, shared by all generations.
pub struct Tokenizer {
    vocab: Vocab,
    model: Model,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
    /// SentencePiece's dummy prefix: a `▁` before the text and after each special token, which
    /// decoding an answer drops once.
    space_prefix: bool,
    /// EOS and the `STOP_TEXTS` tokens present, sorted, without repeats.
    stop_ids: Vec<u32>,
}

enum Model {
    Spm(Spm),
    Bpe(Bpe),
    HuggingFace(Box<hf::HfModel>),
}

impl Tokenizer {
    /// The tokenizer a GGUF file describes: SentencePiece for `tokenizer.ggml.model = "llama"`,
    /// byte-level BPE for `"gpt2"`. Every inconsistency is an error that names its key.
    pub fn from_gguf(metadata: &Metadata) -> Result<Self> {
        let is_spm = match metadata.str(keys::MODEL)? {
            "llama" => true,
            "gpt2" => false,
            other => {
                return Err(Error::unsupported(format!(
                    "{} is '{other}'; phi3 reads 'llama' (SentencePiece) and 'gpt2' \
                     (byte-level BPE) vocabularies",
                    keys::MODEL
                )))
            }
        };

        let texts = metadata.string_array(keys::TOKENS)?;
        let n = texts.len();
        if n == 0 || n > MAX_VOCAB_SIZE {
            return Err(Error::Tokenizer(format!(
                "'{}' has {n} tokens (1 to {MAX_VOCAB_SIZE} allowed)",
                keys::TOKENS
            )));
        }
        let kinds = token_kinds(metadata, n)?;

        let mut entries = Vec::with_capacity(n);
        for (i, (text, kind)) in texts.iter().zip(kinds).enumerate() {
            if text.is_empty() {
                return Err(Error::Tokenizer(format!(
                    "'{}' item {i} is empty",
                    keys::TOKENS
                )));
            }
            let bytes = match kind {
                TokenKind::Normal if is_spm => text.replace(SPACE, " ").into_bytes(),
                TokenKind::Normal => bpe::token_text_bytes(text),
                TokenKind::Byte => vec![parse_byte_token(text).ok_or_else(|| {
                    Error::Tokenizer(format!(
                        "'{}' marks item {i} ({text:?}) as a byte token, but it is not <0xXX>",
                        keys::TOKEN_TYPE
                    ))
                })?],
                TokenKind::Control | TokenKind::Unknown | TokenKind::UserDefined => {
                    text.as_bytes().to_vec()
                }
                // llama.cpp decodes these to nothing.
                TokenKind::Unused | TokenKind::Undefined => Vec::new(),
            };
            entries.push(TokenEntry {
                text: text.to_string(),
                kind,
                bytes,
            });
        }
        let mut vocab = Vocab::new(entries, keys::TOKENS)?;

        // llama.cpp's defaults for SentencePiece vocabularies; BPE ones have none worth having.
        let default = |id: u32| (is_spm && (id as usize) < n).then_some(id);
        let bos = token_id(metadata, keys::BOS_ID, n)?.or(default(1));
        let eos = token_id(metadata, keys::EOS_ID, n)?.or(default(2));
        let unk = token_id(metadata, keys::UNK_ID, n)?.or(default(0));
        let add_bos = optional_bool(metadata, keys::ADD_BOS)?.unwrap_or(is_spm);
        if add_bos && bos.is_none() {
            return Err(Error::Tokenizer(format!(
                "'{}' asks for BOS but '{}' is not set",
                keys::ADD_BOS,
                keys::BOS_ID
            )));
        }
        // Only SentencePiece adds the prefix; llama.cpp's BPE never does.
        let space_prefix =
            is_spm && optional_bool(metadata, keys::ADD_SPACE_PREFIX)?.unwrap_or(true);

        let stop_ids = stop_ids(&mut vocab, eos);

        // Phi-3's rule: the whitespace after its special tokens is not text (`<|user|>\nHi` has
        // no newline token). llama.cpp applies it when `general.name` says phi3; phi3 also
        // applies it to every SentencePiece vocabulary of the phi3 architecture.
        let arch = metadata.optional_str(names::GENERAL_ARCHITECTURE)?;
        let name = metadata
            .optional_str(names::GENERAL_NAME)?
            .unwrap_or_default()
            .to_lowercase();
        let phi3_rule = (is_spm && arch == Some(names::ARCH_PHI3))
            || name.contains("phi3")
            || name.contains("phi-3");
        vocab.set_specials(|text| phi3_rule && !PHI3_NO_RSTRIP.contains(&text));

        let model = if is_spm {
            Model::Spm(Spm::new(&vocab, scores(metadata, n)?, unk))
        } else {
            let merges = metadata.string_array(keys::MERGES)?;
            if merges.len() > MAX_MERGES {
                return Err(Error::Tokenizer(format!(
                    "'{}' has {} rules, over the limit of {MAX_MERGES}",
                    keys::MERGES,
                    merges.len()
                )));
            }
            let pre = metadata.optional_str(keys::PRE)?;
            let kind = PreTokenizerKind::from_gguf(pre).ok_or_else(|| {
                Error::unsupported(format!(
                    "{} '{}' is not supported (phi3 knows 'gpt-2', 'default' and 'gpt-4o')",
                    keys::PRE,
                    pre.unwrap_or_default()
                ))
            })?;
            Model::Bpe(Bpe::new(kind, &merges, keys::MERGES)?)
        };

        Ok(Self {
            vocab,
            model,
            bos,
            eos,
            add_bos,
            space_prefix,
            stop_ids,
        })
    }

    /// A Hugging Face tokenizer.json in place of the GGUF vocabulary. BOS, EOS and whether BOS
    /// is added come from a `tokenizer_config.json` beside it when there is one.
    pub fn from_tokenizer_json(path: &Path) -> Result<Self> {
        let loaded = hf::load(path)?;
        let mut vocab = loaded.vocab;
        let stop_ids = stop_ids(&mut vocab, loaded.eos);
        Ok(Self {
            vocab,
            model: Model::HuggingFace(Box::new(loaded.model)),
            bos: loaded.bos,
            eos: loaded.eos,
            add_bos: loaded.add_bos,
            space_prefix: loaded.space_prefix,
            stop_ids,
        })
    }

    /// The ids of `text`, with BOS first if `add_bos`. With `parse_special`, special tokens
    /// written in the text (`<|user|>`) become their ids; without, they are tokenized as text.
    pub fn encode(&self, text: &str, add_bos: bool, parse_special: bool) -> Result<Vec<u32>> {
        self.encode_with(text, add_bos, parse_special, self.space_prefix)
    }

    /// The ids of `text` as it would be tokenized in the middle of an answer: no BOS, no
    /// dummy prefix, special tokens as text (user-defined ones are still split out, as always).
    pub fn encode_continuation(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_with(text, false, false, false)
    }

    fn encode_with(
        &self,
        text: &str,
        add_bos: bool,
        parse_special: bool,
        space_prefix: bool,
    ) -> Result<Vec<u32>> {
        let mut out = Vec::new();
        if add_bos {
            out.push(self.bos.ok_or_else(|| {
                Error::Tokenizer("BOS requested, but the vocabulary has no BOS token".into())
            })?);
        }
        match &self.model {
            Model::HuggingFace(hf) => out.extend(hf.encode(text, parse_special)?),
            Model::Spm(spm) => {
                // The dummy prefix goes before the first fragment and after each special token.
                let mut after_special = true;
                for fragment in self.vocab.partition(text, parse_special) {
                    match fragment {
                        Fragment::Text(t) => {
                            let prefix = space_prefix && after_special;
                            spm.encode(&self.vocab, t, prefix, &mut out)?;
                            after_special = false;
                        }
                        Fragment::Token(id) => {
                            out.push(id);
                            after_special = true;
                        }
                    }
                }
            }
            Model::Bpe(bpe) => {
                for fragment in self.vocab.partition(text, parse_special) {
                    match fragment {
                        Fragment::Text(t) => bpe.encode(&self.vocab, t, &mut out),
                        Fragment::Token(id) => out.push(id),
                    }
                }
            }
        }
        Ok(out)
    }

    /// The text of `ids`: their bytes concatenated, invalid UTF-8 replaced by U+FFFD. With
    /// `skip_special`, control tokens contribute nothing. The leading space of SentencePiece's
    /// dummy prefix is kept (see `strips_leading_space`).
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        let mut bytes = Vec::new();
        for &id in ids {
            let piece = self.token_bytes(id).ok_or_else(|| {
                Error::Tokenizer(format!(
                    "token id {id} is outside the vocabulary of {} tokens",
                    self.vocab_size()
                ))
            })?;
            if !(skip_special && self.is_control(id)) {
                bytes.extend_from_slice(piece);
            }
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// The raw bytes token `id` contributes to text: `▁` is a space, `<0x0A>` the byte 0x0A, a
    /// byte-level BPE token its bytes, a control token its text. `None` outside the vocabulary.
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        self.vocab.bytes(id)
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    pub fn token_to_id(&self, text: &str) -> Option<u32> {
        self.vocab.id(text)
    }

    pub fn id_to_token(&self, id: u32) -> Option<&str> {
        self.vocab.text(id)
    }

    /// Control (and unknown-type) tokens: `<s>`, `<|end|>`, ...; `decode(skip_special=true)`
    /// leaves them out.
    pub fn is_control(&self, id: u32) -> bool {
        self.vocab.kind(id).is_some_and(TokenKind::is_control)
    }

    /// Tokens that stand for text: normal and byte tokens. Control, user-defined and unused
    /// tokens are markers, even where their text is printable.
    pub fn is_text(&self, id: u32) -> bool {
        matches!(
            self.vocab.kind(id),
            Some(TokenKind::Normal | TokenKind::Byte)
        )
    }

    /// The ids that end a generation: EOS, and `<|end|>`, `<|endoftext|>`, `<|im_end|>`,
    /// `<|eot_id|>` where the vocabulary has them. Sorted.
    pub fn stop_ids(&self) -> Vec<u32> {
        self.stop_ids.clone()
    }

    /// Whether a prompt starts with BOS (`tokenizer.ggml.add_bos_token`, default true for
    /// SentencePiece vocabularies).
    pub fn add_bos_default(&self) -> bool {
        self.add_bos
    }

    /// SentencePiece with the dummy prefix: the first decoded piece of an answer carries a space
    /// that is not part of it, and should drop it.
    pub fn strips_leading_space(&self) -> bool {
        self.space_prefix
    }
}

/// Marks the stop tokens as control tokens (llama.cpp does) and returns their ids with EOS.
fn stop_ids(vocab: &mut Vocab, eos: Option<u32>) -> Vec<u32> {
    let mut ids: Vec<u32> = STOP_TEXTS.iter().filter_map(|t| vocab.id(t)).collect();
    for &id in &ids {
        vocab.make_control(id);
    }
    ids.extend(eos);
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// `tokenizer.ggml.token_type`, one kind per token; all normal when absent.
fn token_kinds(metadata: &Metadata, n: usize) -> Result<Vec<TokenKind>> {
    let Some(types) = metadata.optional_array(keys::TOKEN_TYPE)? else {
        return Ok(vec![TokenKind::Normal; n]);
    };
    check_len(keys::TOKEN_TYPE, types.len(), n)?;
    types
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_i64().and_then(TokenKind::from_gguf).ok_or_else(|| {
                Error::Tokenizer(format!(
                    "'{}' item {i} is {v:?}, not a token type (0 to 6)",
                    keys::TOKEN_TYPE
                ))
            })
        })
        .collect()
}

/// `tokenizer.ggml.scores`, one per token; all zero when absent (llama.cpp's default).
fn scores(metadata: &Metadata, n: usize) -> Result<Vec<f32>> {
    let Some(scores) = metadata.optional_array(keys::SCORES)? else {
        return Ok(vec![0.0; n]);
    };
    check_len(keys::SCORES, scores.len(), n)?;
    scores
        .iter()
        .enumerate()
        .map(|(i, v)| {
            // A NaN would make the merge order depend on the heap's internals.
            v.as_f64()
                .filter(|s| !s.is_nan())
                .map(|s| s as f32)
                .ok_or_else(|| {
                    Error::Tokenizer(format!(
                        "'{}' item {i} is {v:?}, not a number",
                        keys::SCORES
                    ))
                })
        })
        .collect()
}

fn check_len(key: &str, len: usize, n: usize) -> Result<()> {
    if len == n {
        return Ok(());
    }
    Err(Error::Tokenizer(format!(
        "'{key}' has {len} items but '{}' has {n} tokens",
        keys::TOKENS
    )))
}

/// A token id key, which must name a token of the vocabulary.
fn token_id(metadata: &Metadata, key: &str, n: usize) -> Result<Option<u32>> {
    match metadata.optional_u64(key)? {
        None => Ok(None),
        Some(id) if id < n as u64 => Ok(Some(id as u32)),
        Some(id) => Err(Error::Tokenizer(format!(
            "'{key}' is {id}, outside the vocabulary of {n} tokens"
        ))),
    }
}

fn optional_bool(metadata: &Metadata, key: &str) -> Result<Option<bool>> {
    match metadata.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(Error::unsupported(format!(
            "metadata key '{key}' should be a bool, found {}",
            other.type_name()
        ))),
    }
}

#[cfg(test)]
mod tests;

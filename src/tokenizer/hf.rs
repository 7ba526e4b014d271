//! A Hugging Face `tokenizer.json` in place of the GGUF vocabulary: the `tokenizers` crate
//! encodes; the vocabulary is read out of it so that decoding, `token_bytes` and streaming work
//! the same as for GGUF vocabularies.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::bpe::token_text_bytes;
use super::spm::SPACE;
use super::vocab::{parse_byte_token, TokenEntry, TokenKind, Vocab};
use super::MAX_VOCAB_SIZE;
use crate::error::{Error, Result};

/// tokenizer.json files run to tens of MB (Gemma's is 33 MB); anything far bigger is not one.
const MAX_JSON_BYTES: u64 = 256 << 20;

pub(crate) struct HfModel {
    /// Splits added tokens out of the text (`parse_special = true`).
    parse_special: tokenizers::Tokenizer,
    /// Encodes special added tokens as plain text (`parse_special = false`).
    plain: tokenizers::Tokenizer,
}

impl HfModel {
    pub(crate) fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>> {
        let tokenizer = if parse_special {
            &self.parse_special
        } else {
            &self.plain
        };
        // BOS is the caller's business (`add_bos`), not the post-processor's.
        let encoding = tokenizer
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(format!("tokenizer.json failed to encode: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }
}

/// What `Tokenizer::from_tokenizer_json` is made of.
pub(crate) struct Loaded {
    pub model: HfModel,
    pub vocab: Vocab,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub add_bos: bool,
    pub space_prefix: bool,
}

pub(crate) fn load(path: &Path) -> Result<Loaded> {
    let content = read_bounded(path, MAX_JSON_BYTES)?;
    let name = path.display();
    let json: Value = serde_json::from_slice(&content)
        .map_err(|e| Error::Tokenizer(format!("{name} is not valid JSON: {e}")))?;
    let parse_special = tokenizers::Tokenizer::from_bytes(&content)
        .map_err(|e| Error::Tokenizer(format!("{name} is not a tokenizer.json: {e}")))?;
    let mut plain = parse_special.clone();
    plain.set_encode_special_tokens(true);

    // Byte-level vocabularies (GPT-2 style) spell bytes with GPT-2's alphabet; the others are
    // SentencePiece style (`▁` for spaces, `<0xXX>` byte-fallback tokens).
    let byte_level = find_type(&json["decoder"], "ByteLevel").is_some()
        || find_type(&json["pre_tokenizer"], "ByteLevel").is_some();
    // SentencePiece style puts a `▁` before the text: a `Prepend` normalizer, or a `Metaspace`
    // pre-tokenizer that prepends.
    let space_prefix = !byte_level
        && (find_type(&json["normalizer"], "Prepend").is_some()
            || find_type(&json["pre_tokenizer"], "Metaspace").is_some_and(|m| {
                m["prepend_scheme"].as_str() != Some("never")
                    && m["add_prefix_space"].as_bool() != Some(false)
            }));

    let vocab = read_vocab(&parse_special, byte_level, &name.to_string())?;

    let config = read_config(path)?;
    let find = |candidates: &[&str]| candidates.iter().find_map(|t| vocab.id(t));
    let named = |field: &str| -> Result<Option<u32>> {
        let Some(text) = config.as_ref().and_then(|c| token_content(&c[field])) else {
            return Ok(None);
        };
        vocab.id(text).map(Some).ok_or_else(|| {
            Error::Tokenizer(format!(
                "tokenizer_config.json's {field} {text:?} is not in the vocabulary"
            ))
        })
    };
    let bos = match named("bos_token")? {
        Some(id) => Some(id),
        None => find(&["<s>", "<|begin_of_text|>", "<|endoftext|>"]),
    };
    let eos = match named("eos_token")? {
        Some(id) => Some(id),
        None => find(&["<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>"]),
    };
    let add_bos = match config.as_ref().and_then(|c| c["add_bos_token"].as_bool()) {
        Some(add) => add,
        // Without a config, what the post-processor would do: does it put BOS first?
        None => match (bos, parse_special.encode("", true)) {
            (Some(bos), Ok(encoding)) => encoding.get_ids().first() == Some(&bos),
            _ => false,
        },
    };
    if add_bos && bos.is_none() {
        return Err(Error::Tokenizer(format!(
            "{name}: BOS is to be added but no BOS token was found"
        )));
    }

    Ok(Loaded {
        model: HfModel {
            parse_special,
            plain,
        },
        vocab,
        bos,
        eos,
        add_bos,
        space_prefix,
    })
}

fn read_vocab(tokenizer: &tokenizers::Tokenizer, byte_level: bool, name: &str) -> Result<Vocab> {
    let ids = tokenizer.get_vocab(true);
    let n = ids.values().max().map_or(0, |&max| max as usize + 1);
    if n == 0 || n > MAX_VOCAB_SIZE {
        return Err(Error::Tokenizer(format!(
            "{name} has a vocabulary of {n} tokens (1 to {MAX_VOCAB_SIZE} allowed)"
        )));
    }
    // Ids no token claims stay empty holes that decode to nothing.
    let mut entries: Vec<TokenEntry> = (0..n)
        .map(|_| TokenEntry {
            text: String::new(),
            kind: TokenKind::Unused,
            bytes: Vec::new(),
        })
        .collect();
    for (text, id) in ids {
        let entry = &mut entries[id as usize];
        entry.kind = TokenKind::Normal;
        entry.bytes = if byte_level {
            token_text_bytes(&text)
        } else if let Some(b) = parse_byte_token(&text) {
            entry.kind = TokenKind::Byte;
            vec![b]
        } else {
            text.replace(SPACE, " ").into_bytes()
        };
        entry.text = text;
    }
    for (id, added) in tokenizer.get_added_tokens_decoder() {
        if let Some(entry) = entries.get_mut(id as usize) {
            entry.kind = if added.special {
                TokenKind::Control
            } else {
                TokenKind::UserDefined
            };
            entry.bytes = added.content.as_bytes().to_vec();
        }
    }
    Vocab::new(entries, name)
}

/// `tokenizer_config.json` beside the tokenizer.json, if there is one: it names BOS and EOS.
fn read_config(path: &Path) -> Result<Option<Value>> {
    let config_path = path.with_file_name("tokenizer_config.json");
    if !config_path.is_file() {
        return Ok(None);
    }
    let content = read_bounded(&config_path, MAX_JSON_BYTES)?;
    serde_json::from_slice(&content)
        .map(Some)
        .map_err(|e| Error::Tokenizer(format!("{} is not valid JSON: {e}", config_path.display())))
}

fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>> {
    let io = |source| Error::Io {
        path: PathBuf::from(path),
        source,
    };
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::FileNotFound(path.into()),
        _ => io(e),
    })?;
    if meta.len() > max {
        return Err(Error::Tokenizer(format!(
            "{} is {} bytes, over the limit of {max}",
            path.display(),
            meta.len()
        )));
    }
    std::fs::read(path).map_err(io)
}

/// A token as tokenizer_config.json writes it: a string or `{"content": ...}`.
fn token_content(value: &Value) -> Option<&str> {
    value.as_str().or_else(|| value["content"].as_str())
}

/// The first object (depth first) in `value` whose `"type"` is `ty`.
fn find_type<'v>(value: &'v Value, ty: &str) -> Option<&'v Value> {
    match value {
        Value::Object(map) => {
            if map.get("type").and_then(Value::as_str) == Some(ty) {
                return Some(value);
            }
            map.values().find_map(|v| find_type(v, ty))
        }
        Value::Array(items) => items.iter().find_map(|v| find_type(v, ty)),
        _ => None,
    }
}

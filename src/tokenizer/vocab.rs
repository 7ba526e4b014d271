//! The token table every tokenizer kind shares: id ↔ text, each token's kind, the bytes it
//! contributes to decoded text, and the split of raw text around special tokens.

use std::collections::HashMap;

use crate::error::{Error, Result};

/// What a token is, as GGUF's `tokenizer.ggml.token_type` (and llama.cpp) classifies it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TokenKind {
    /// Type 0: llama.cpp decodes it to nothing.
    Undefined,
    Normal,
    /// Type 2, e.g. Phi-3's `[PAD32011]` fillers: special (split out of text, hidden by
    /// `decode(skip_special=true)`).
    Unknown,
    /// Type 3: `<s>`, `<|user|>`, `<|end|>` ...
    Control,
    /// Type 4: split out of raw text even when special tokens are not parsed; always decoded.
    UserDefined,
    /// Type 5: decodes to nothing.
    Unused,
    /// Type 6: `<0xXX>`, one raw byte.
    Byte,
}

impl TokenKind {
    /// The GGUF code (llama.cpp's `llama_token_type`), or `None` for a value it never writes.
    pub(crate) fn from_gguf(code: i64) -> Option<Self> {
        Some(match code {
            0 => Self::Undefined,
            1 => Self::Normal,
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => return None,
        })
    }

    /// Control-like tokens: only matched in text when special tokens are parsed, and left out of
    /// `decode(skip_special=true)` (llama.cpp's `LLAMA_TOKEN_ATTR_CONTROL | _UNKNOWN`).
    pub(crate) fn is_control(self) -> bool {
        matches!(self, Self::Control | Self::Unknown)
    }

    /// Tokens that llama.cpp's `tokenizer_st_partition` finds in raw text.
    fn is_special(self) -> bool {
        matches!(self, Self::Control | Self::Unknown | Self::UserDefined)
    }
}

/// One token as the vocabulary loader hands it over.
pub(crate) struct TokenEntry {
    pub text: String,
    pub kind: TokenKind,
    /// What the token contributes to decoded text.
    pub bytes: Vec<u8>,
}

/// A special token that `partition` cuts out of raw text.
struct Special {
    id: u32,
    /// Strip the whitespace that follows it (Phi-3's rule; llama.cpp's `LLAMA_TOKEN_ATTR_RSTRIP`).
    rstrip: bool,
}

/// A piece of the input after special tokens are cut out.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Fragment<'t> {
    Text(&'t str),
    Token(u32),
}

/// Invariants: `texts`, `kinds` and `bytes` have one entry per id; `ids` maps every non-empty
/// text to its id (texts are unique); `specials` is ordered longest text first.
pub(crate) struct Vocab {
    texts: Vec<Box<str>>,
    kinds: Vec<TokenKind>,
    bytes: Vec<Box<[u8]>>,
    ids: HashMap<Box<str>, u32>,
    specials: Vec<Special>,
}

impl Vocab {
    /// `key` names the metadata (or file) the tokens came from, for error messages. Empty texts are
    /// allowed only as holes (a sparse tokenizer.json); they are never looked up or matched.
    pub(crate) fn new(entries: Vec<TokenEntry>, key: &str) -> Result<Self> {
        let n = entries.len();
        // Ids are u32 throughout; the caller has bounded `n` far below this.
        if u32::try_from(n).is_err() {
            return Err(Error::Tokenizer(format!(
                "'{key}' has {n} tokens, too many"
            )));
        }
        let mut texts = Vec::with_capacity(n);
        let mut kinds = Vec::with_capacity(n);
        let mut bytes = Vec::with_capacity(n);
        let mut ids = HashMap::with_capacity(n);
        for (id, entry) in entries.into_iter().enumerate() {
            let text: Box<str> = entry.text.into();
            if !text.is_empty() {
                if let Some(first) = ids.insert(text.clone(), id as u32) {
                    return Err(Error::Tokenizer(format!(
                        "'{key}' holds the token {text:?} twice (ids {first} and {id})"
                    )));
                }
            }
            texts.push(text);
            kinds.push(entry.kind);
            bytes.push(entry.bytes.into_boxed_slice());
        }
        Ok(Self {
            texts,
            kinds,
            bytes,
            ids,
            specials: Vec::new(),
        })
    }

    /// Collects the special tokens `partition` looks for; `rstrip(text)` says which of them strip
    /// the whitespace after them.
    pub(crate) fn set_specials(&mut self, rstrip: impl Fn(&str) -> bool) {
        let mut specials: Vec<Special> = (0..self.texts.len())
            .filter(|&i| self.kinds[i].is_special() && !self.texts[i].is_empty())
            .map(|i| Special {
                id: i as u32,
                rstrip: rstrip(&self.texts[i]),
            })
            .collect();
        // Longest first so that `<|endoftext|>` wins over any shorter token inside it; ties by id
        // so the order (and hence the result) never depends on the sort.
        specials.sort_by(|a, b| {
            let (ta, tb) = (&self.texts[a.id as usize], &self.texts[b.id as usize]);
            tb.len().cmp(&ta.len()).then(a.id.cmp(&b.id))
        });
        self.specials = specials;
    }

    pub(crate) fn len(&self) -> usize {
        self.texts.len()
    }

    pub(crate) fn id(&self, text: &str) -> Option<u32> {
        self.ids.get(text).copied()
    }

    pub(crate) fn text(&self, id: u32) -> Option<&str> {
        self.texts
            .get(id as usize)
            .map(|t| &**t)
            .filter(|t| !t.is_empty())
    }

    pub(crate) fn kind(&self, id: u32) -> Option<TokenKind> {
        self.kinds.get(id as usize).copied()
    }

    /// Marks `id` as a control token (llama.cpp does so for end-of-generation tokens whatever
    /// their declared type).
    pub(crate) fn make_control(&mut self, id: u32) {
        if let Some(kind) = self.kinds.get_mut(id as usize) {
            *kind = TokenKind::Control;
        }
    }

    pub(crate) fn bytes(&self, id: u32) -> Option<&[u8]> {
        self.bytes.get(id as usize).map(|b| &**b)
    }

    /// Cuts special tokens out of `text`, as llama.cpp's `tokenizer_st_partition`: each special
    /// token in turn (longest first) splits every remaining text fragment at each of its
    /// occurrences. Control and unknown tokens count only when `parse_special`; user-defined ones
    /// always. After a token with `rstrip`, the ASCII whitespace that follows is dropped.
    ///
    /// Cost: one substring scan of the text per special token.
    pub(crate) fn partition<'t>(&self, text: &'t str, parse_special: bool) -> Vec<Fragment<'t>> {
        let mut fragments = Vec::new();
        if text.is_empty() {
            return fragments;
        }
        fragments.push(Fragment::Text(text));
        for special in &self.specials {
            let id = special.id;
            if !parse_special && self.kinds[id as usize].is_control() {
                continue;
            }
            let needle = &*self.texts[id as usize];
            let mut next = Vec::with_capacity(fragments.len());
            for fragment in fragments {
                let Fragment::Text(mut rest) = fragment else {
                    next.push(fragment);
                    continue;
                };
                while let Some(at) = rest.find(needle) {
                    if at > 0 {
                        next.push(Fragment::Text(&rest[..at]));
                    }
                    next.push(Fragment::Token(id));
                    rest = &rest[at + needle.len()..];
                    if special.rstrip {
                        // C's isspace, as llama.cpp; ASCII only, so `rest` stays on a char boundary.
                        rest = rest.trim_start_matches([' ', '\t', '\n', '\x0B', '\x0C', '\r']);
                    }
                }
                if !rest.is_empty() {
                    next.push(Fragment::Text(rest));
                }
            }
            fragments = next;
        }
        fragments
    }
}

/// The byte a `<0xXX>` token stands for (either case of hex digits, as llama.cpp's `strtol`).
pub(crate) fn parse_byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab(tokens: &[(&str, TokenKind)]) -> Vocab {
        let entries = tokens
            .iter()
            .map(|&(text, kind)| TokenEntry {
                text: text.into(),
                kind,
                bytes: text.as_bytes().to_vec(),
            })
            .collect();
        let mut v = Vocab::new(entries, "test").unwrap();
        v.set_specials(|t| t != "<s>");
        v
    }

    #[test]
    fn partition_splits_longest_first_and_strips_after_rstrip_tokens() {
        use Fragment::*;
        let v = vocab(&[
            ("a", TokenKind::Normal),
            ("<s>", TokenKind::Control),
            ("<|user|>", TokenKind::Control),
            ("<|user|>x", TokenKind::UserDefined),
        ]);
        assert_eq!(
            v.partition("<s>\nhi<|user|>\n \tyo<|user|>", true),
            vec![Token(1), Text("\nhi"), Token(2), Text("yo"), Token(2)]
        );
        // The longer user-defined token wins over the control token it contains.
        assert_eq!(v.partition("<|user|>x!", true), vec![Token(3), Text("!")]);
        // Without parse_special only user-defined tokens are cut out.
        assert_eq!(
            v.partition("<s><|user|>x", false),
            vec![Text("<s>"), Token(3)]
        );
        assert_eq!(v.partition("", true), vec![]);
        assert_eq!(v.partition("<|user|>   ", true), vec![Token(2)]);
    }

    #[test]
    fn duplicate_tokens_are_rejected_with_the_key() {
        let entries = ["x", "x"]
            .iter()
            .map(|t| TokenEntry {
                text: t.to_string(),
                kind: TokenKind::Normal,
                bytes: vec![],
            })
            .collect();
        let err = Vocab::new(entries, "tokenizer.ggml.tokens")
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("tokenizer.ggml.tokens") && err.contains("twice"),
            "{err}"
        );
    }

    #[test]
    fn byte_tokens_parse() {
        assert_eq!(parse_byte_token("<0x0A>"), Some(10));
        assert_eq!(parse_byte_token("<0xff>"), Some(255));
        assert_eq!(parse_byte_token("<0xF>"), None);
        assert_eq!(parse_byte_token("<0x+F>"), None);
        assert_eq!(parse_byte_token("0x0A"), None);
    }
}

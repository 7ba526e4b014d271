//! llguidance's view of phi3's tokenizer: a trie of what each token contributes to the text,
//! built from the same bytes `DecodeStream` emits, so that the text a constraint accepts is the
//! text the caller reads.

use std::sync::Arc;

use toktrie::{TokRxInfo, TokTrie, TokenId, TokenizerEnv};

use crate::tokenizer::Tokenizer;

pub(super) struct GuidanceTokenizer {
    tokenizer: Arc<Tokenizer>,
    trie: TokTrie,
}

impl GuidanceTokenizer {
    /// `end` is the id llguidance offers when the constraint is complete; the generation loop
    /// treats every stop token alike.
    pub(super) fn new(tokenizer: Arc<Tokenizer>, end: TokenId) -> Self {
        let n = tokenizer.vocab_size();
        let words: Vec<Vec<u8>> = (0..n as u32).map(|id| token_word(&tokenizer, id)).collect();
        let mut info = TokRxInfo::new(n as u32, end);
        info.tok_bos = tokenizer.bos_id();
        let trie = TokTrie::from(&info, &words);
        Self { tokenizer, trie }
    }
}

/// A text token's bytes (a byte-fallback token is its one byte, SentencePiece's `▁` a space); a
/// marker token (`<|end|>`, `<|user|>`) is llguidance's special-token marker and its name, so no
/// constraint on text can produce it; a token that decodes to nothing is empty, never allowed.
fn token_word(tokenizer: &Tokenizer, id: u32) -> Vec<u8> {
    let bytes = tokenizer.token_bytes(id).unwrap_or_default();
    if tokenizer.is_text(id) || bytes.is_empty() {
        return bytes.to_vec();
    }
    let mut word = Vec::with_capacity(bytes.len() + 1);
    word.push(TokTrie::SPECIAL_TOKEN_MARKER);
    word.extend_from_slice(bytes);
    word
}

impl TokenizerEnv for GuidanceTokenizer {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    /// Bytes as they would be tokenized in the middle of an answer. Bytes that are not UTF-8
    /// cannot go through the tokenizer; the trie's greedy split stands in for them.
    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        match std::str::from_utf8(s) {
            Ok(text) => self
                .tokenizer
                .encode_continuation(text)
                .unwrap_or_else(|_| self.trie.greedy_tokenize(s)),
            Err(_) => self.trie.greedy_tokenize(s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::GgufFile;
    use crate::test_support::fixture;

    fn tok_env(file: &str) -> GuidanceTokenizer {
        let gguf = GgufFile::open(fixture(file)).unwrap();
        let tokenizer = Arc::new(Tokenizer::from_gguf(gguf.metadata()).unwrap());
        let end = tokenizer.stop_ids().first().copied().unwrap_or(0);
        GuidanceTokenizer::new(tokenizer, end)
    }

    /// Every text token's trie bytes are what decoding it yields; markers are special.
    #[test]
    fn the_trie_holds_what_decoding_yields() {
        for file in ["phi3-vocab.gguf", "gpt2-vocab.gguf"] {
            let env = tok_env(file);
            let tokenizer = &env.tokenizer;
            let trie = env.tok_trie();
            let mut special = 0;
            for id in 0..tokenizer.vocab_size() as u32 {
                let bytes = tokenizer.token_bytes(id).unwrap();
                if tokenizer.is_text(id) {
                    assert_eq!(trie.token(id), bytes, "{file}: token {id}");
                } else if !bytes.is_empty() {
                    assert!(trie.is_special_token(id), "{file}: token {id}");
                    special += 1;
                }
            }
            assert!(special > 0, "{file}");
            for id in tokenizer.stop_ids() {
                assert!(trie.is_special_token(id), "{file}: stop token {id}");
            }
        }
    }

    /// Byte-fallback: a character outside the vocabulary is its UTF-8 bytes, one token each.
    #[test]
    fn byte_tokens_are_single_bytes() {
        let env = tok_env("phi3-vocab.gguf");
        let id = env.tokenizer.token_to_id("<0x0A>").unwrap();
        assert_eq!(env.tok_trie().token(id), b"\n");
    }

    /// Mid-answer text: no dummy prefix, the same ids the tokenizer gives the text after a word.
    #[test]
    fn tokenize_bytes_adds_no_prefix() {
        let env = tok_env("phi3-vocab.gguf");
        let ids = env.tokenize_bytes(b"{\"a\": 1}");
        let text: Vec<u8> = ids
            .iter()
            .flat_map(|&id| env.tok_trie().token(id).to_vec())
            .collect();
        assert_eq!(text, b"{\"a\": 1}");
        let invalid = env.tokenize_bytes(&[0xe2, 0x82]);
        let bytes: Vec<u8> = invalid
            .iter()
            .flat_map(|&id| env.tok_trie().token(id).to_vec())
            .collect();
        assert_eq!(bytes, [0xe2, 0x82]);
    }
}

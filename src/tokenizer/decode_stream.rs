//! Incremental detokenization for streaming: text comes out as soon as it forms whole UTF-8
//! characters, so an emoji spread over four byte-fallback tokens comes out once, whole.

use std::sync::Arc;

use super::Tokenizer;

/// Decodes a generation one token at a time. The concatenation of everything `push` and
/// `finish` return equals `tokenizer.decode(ids, skip_special)`, less one leading space when the
/// tokenizer `strips_leading_space()` (SentencePiece's dummy prefix on the first word).
///
/// Each `push` costs O(bytes of that token): only the bytes of an unfinished character are held.
pub struct DecodeStream {
    tokenizer: Arc<Tokenizer>,
    skip_special: bool,
    /// A leading space is still to be dropped from the first bytes to come.
    strip_space: bool,
    /// Bytes received but not returned: the start of a character (at most 3 bytes) between
    /// calls.
    pending: Vec<u8>,
}

impl DecodeStream {
    pub fn new(tokenizer: Arc<Tokenizer>, skip_special: bool) -> Self {
        let strip_space = tokenizer.strips_leading_space();
        Self {
            tokenizer,
            skip_special,
            strip_space,
            pending: Vec::new(),
        }
    }

    /// Keeps the dummy prefix's space on the first token, for a caller that must see every
    /// byte the tokens carry.
    pub fn keeping_leading_space(mut self) -> Self {
        self.strip_space = false;
        self
    }

    /// The text that token `id` completes, or `None` when it completes none (part of a
    /// character, a skipped control token, or an id outside the vocabulary, which contributes
    /// nothing).
    pub fn push(&mut self, id: u32) -> Option<String> {
        if self.skip_special && self.tokenizer.is_control(id) {
            return None;
        }
        let mut bytes = self.tokenizer.token_bytes(id)?;
        if bytes.is_empty() {
            return None;
        }
        if std::mem::take(&mut self.strip_space) && bytes[0] == b' ' {
            bytes = &bytes[1..];
        }
        self.pending.extend_from_slice(bytes);
        self.take_complete()
    }

    /// Whatever is still held (an unfinished character) as U+FFFD, as `decode` renders it.
    pub fn finish(&mut self) -> Option<String> {
        if self.pending.is_empty() {
            return None;
        }
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        Some(text)
    }

    /// Returns the pending bytes up to the last complete character; invalid sequences become
    /// U+FFFD exactly as `String::from_utf8_lossy` (hence `decode`) renders them, and an
    /// unfinished character at the end stays pending.
    fn take_complete(&mut self) -> Option<String> {
        let mut text = String::new();
        let mut rest = &self.pending[..];
        loop {
            match std::str::from_utf8(rest) {
                Ok(valid) => {
                    text.push_str(valid);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    // The prefix was just validated.
                    text.push_str(std::str::from_utf8(valid).unwrap_or_default());
                    match e.error_len() {
                        Some(bad) => {
                            text.push(char::REPLACEMENT_CHARACTER);
                            rest = &after[bad..];
                        }
                        // An unfinished character at the end: wait for its other bytes.
                        None => {
                            rest = after;
                            break;
                        }
                    }
                }
            }
        }
        let keep = rest.len();
        self.pending.drain(..self.pending.len() - keep);
        (!text.is_empty()).then_some(text)
    }
}

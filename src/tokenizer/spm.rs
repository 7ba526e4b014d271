//! SentencePiece's BPE as llama.cpp runs it for `tokenizer.ggml.model = "llama"` vocabularies
//! (`llm_tokenizer_spm`): spaces become `▁`, the characters of a fragment are merged pairwise,
//! always the adjacent pair whose concatenation is the highest-scoring vocabulary token, and what
//! is left that is no token falls back to `<0xXX>` byte tokens.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use super::vocab::Vocab;
use crate::error::{Error, Result};

/// SentencePiece's escaped space, U+2581.
pub(crate) const SPACE: &str = "\u{2581}";

pub(crate) struct Spm {
    /// One score per token id: the merge priority (higher merges first). Never NaN.
    scores: Vec<f32>,
    /// The token for each byte value: `<0xXX>`, else the one-byte text, else `unk`. Boxed to
    /// keep `Spm` small.
    byte_tokens: Box<[Option<u32>; 256]>,
}

/// A symbol: a run of the fragment's bytes, linked to its neighbours. `len == 0` marks a symbol
/// merged into its left neighbour.
#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// A candidate merge of symbols `left` and `right` (adjacent when queued) into a token of
/// `score`; stale once either symbol changed (`size` no longer their total length).
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    size: usize,
}

impl Ord for Bigram {
    /// Highest score first; among equal scores the leftmost pair (llama.cpp's comparator).
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Bigram {}

impl Spm {
    /// `scores` has one finite-or-infinite value per token of `vocab` (checked by the caller).
    pub(crate) fn new(vocab: &Vocab, mut scores: Vec<f32>, unk: Option<u32>) -> Self {
        // -0.0 and 0.0 compare equal in llama.cpp's `<`; make `total_cmp` agree.
        for s in &mut scores {
            if *s == 0.0 {
                *s = 0.0;
            }
        }
        let mut byte_tokens = Box::new([None; 256]);
        for (b, slot) in byte_tokens.iter_mut().enumerate() {
            let b = b as u8;
            *slot = vocab
                .id(&format!("<0x{b:02X}>"))
                .or_else(|| std::str::from_utf8(&[b]).ok().and_then(|s| vocab.id(s)))
                .or(unk);
        }
        Self {
            scores,
            byte_tokens,
        }
    }

    /// Appends the tokens of one text fragment to `out`. `prefix_space` puts a `▁` in front of
    /// it (SentencePiece's dummy prefix: at the start of the text and after a special token).
    pub(crate) fn encode(
        &self,
        vocab: &Vocab,
        fragment: &str,
        prefix_space: bool,
        out: &mut Vec<u32>,
    ) -> Result<()> {
        let mut text = String::with_capacity(fragment.len() + 3 * (1 + fragment.len() / 4));
        if prefix_space {
            text.push_str(SPACE);
        }
        for c in fragment.chars() {
            if c == ' ' {
                text.push_str(SPACE);
            } else {
                text.push(c);
            }
        }
        if text.is_empty() {
            return Ok(());
        }

        // One symbol per character.
        let n = text.chars().count();
        let mut symbols: Vec<Symbol> = Vec::with_capacity(n);
        for (i, (start, c)) in text.char_indices().enumerate() {
            symbols.push(Symbol {
                start,
                len: c.len_utf8(),
                prev: i.checked_sub(1),
                next: (i + 1 < n).then_some(i + 1),
            });
        }

        let mut queue = BinaryHeap::with_capacity(n);
        for i in 1..n {
            self.try_add_bigram(vocab, &text, &symbols, Some(i - 1), Some(i), &mut queue);
        }
        // Every merge removes a symbol and queues at most two bigrams: O(n log n) in all.
        while let Some(bigram) = queue.pop() {
            let (l, r) = (symbols[bigram.left], symbols[bigram.right]);
            if l.len == 0 || r.len == 0 || l.len + r.len != bigram.size {
                continue;
            }
            symbols[bigram.left].len += r.len;
            symbols[bigram.right].len = 0;
            symbols[bigram.left].next = r.next;
            if let Some(next) = r.next {
                symbols[next].prev = Some(bigram.left);
            }
            let left = Some(bigram.left);
            self.try_add_bigram(vocab, &text, &symbols, l.prev, left, &mut queue);
            self.try_add_bigram(vocab, &text, &symbols, left, r.next, &mut queue);
        }

        // Every merged symbol is a vocabulary token by construction; a lone character that is not
        // becomes its bytes (llama.cpp's `resegment`).
        let mut at = Some(0);
        while let Some(i) = at {
            let s = symbols[i];
            let piece = &text[s.start..s.start + s.len];
            match vocab.id(piece) {
                Some(id) => out.push(id),
                None => {
                    for b in piece.bytes() {
                        let id = self.byte_tokens[b as usize].ok_or_else(|| {
                            Error::Tokenizer(format!(
                                "the vocabulary has no token for byte 0x{b:02X} \
                                 (no <0x{b:02X}> token and no unknown token)"
                            ))
                        })?;
                        out.push(id);
                    }
                }
            }
            at = s.next;
        }
        Ok(())
    }

    fn try_add_bigram(
        &self,
        vocab: &Vocab,
        text: &str,
        symbols: &[Symbol],
        left: Option<usize>,
        right: Option<usize>,
        queue: &mut BinaryHeap<Bigram>,
    ) {
        let (Some(left), Some(right)) = (left, right) else {
            return;
        };
        let start = symbols[left].start;
        let size = symbols[left].len + symbols[right].len;
        if let Some(id) = vocab.id(&text[start..start + size]) {
            queue.push(Bigram {
                score: self.scores[id as usize],
                left,
                right,
                size,
            });
        }
    }
}

//! GPT-2's byte-level BPE as llama.cpp runs it for `tokenizer.ggml.model = "gpt2"` vocabularies
//! (`llm_tokenizer_bpe`): a pre-tokenizer regex cuts the text into words, each word's UTF-8 bytes
//! are spelled with GPT-2's byte-to-unicode alphabet, and adjacent symbols are merged by the
//! rank of their pair in `tokenizer.ggml.merges` (lowest rank first).

use std::cmp::Ordering;
use std::collections::hash_map::Entry;
use std::collections::{BinaryHeap, HashMap};

use regex::Regex;

use super::vocab::Vocab;
use crate::error::{Error, Result};

/// The pre-tokenizers phi3 knows, by their `tokenizer.ggml.pre` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PreTokenizerKind {
    /// GPT-2's: `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`.
    Gpt2,
    /// GPT-4o's (o200k), used by Phi-4 and Phi-4-mini, as published in their tokenizer.json.
    /// llama.cpp runs an adaptation that tells upper from lower case by ASCII only and leaves
    /// combining marks (`\p{M}`) out of words; the two agree on ASCII and on caseless scripts
    /// (CJK), and differ on mixed-case non-ASCII words (`helloÄ`: `hello`, `Ä` here, one word
    /// in llama.cpp) and on decomposed accents.
    Gpt4o,
}

impl PreTokenizerKind {
    /// `None` for a pre-tokenizer phi3 does not implement. A missing `tokenizer.ggml.pre` and
    /// `default` both mean GPT-2's.
    pub(crate) fn from_gguf(name: Option<&str>) -> Option<Self> {
        match name {
            None | Some("default" | "gpt-2" | "phi-2") => Some(Self::Gpt2),
            Some("gpt-4o") => Some(Self::Gpt4o),
            Some(_) => None,
        }
    }

    /// The published regex without its `\s+(?!\S)` branch: the `regex` crate has no look-ahead
    /// (that is what keeps it linear), so `PreTokenizer::split` applies that branch by hand.
    fn pattern(self) -> &'static str {
        match self {
            Self::Gpt2 => r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+",
            Self::Gpt4o => concat!(
                r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
                r"|\p{N}{1,3}",
                r"| ?[^\s\p{L}\p{N}]+[\r\n/]*",
                r"|\s*[\r\n]+",
                r"|\s+",
            ),
        }
    }
}

/// Cuts text into the words BPE works on.
pub(crate) struct PreTokenizer {
    kind: PreTokenizerKind,
    regex: Regex,
}

impl PreTokenizer {
    pub(crate) fn new(kind: PreTokenizerKind) -> Self {
        // The patterns are constants known to compile.
        let regex = Regex::new(kind.pattern()).expect("pre-tokenizer regex compiles");
        Self { kind, regex }
    }

    /// The words of `text`, in order; their concatenation is `text`.
    ///
    /// The `regex` crate picks the same match as a backtracking engine (leftmost-first), so the
    /// branches before `\s+(?!\S)` behave as published. A whitespace run reaching the final `\s+`
    /// branch is maximal, so what follows it is a non-space character or the end; `\s+(?!\S)`
    /// would have matched it one character short when a character follows and the run is longer
    /// than one, leaving that last space to join the next word (`"a   b"` → `a`, `  `, ` b`).
    /// For GPT-4o, whitespace ending in `\r`/`\n` comes from `\s*[\r\n]+` and is kept whole.
    pub(crate) fn split<'t>(&self, text: &'t str) -> Vec<&'t str> {
        let mut words = Vec::new();
        let mut pos = 0;
        while pos < text.len() {
            let Some(m) = self.regex.find_at(text, pos) else {
                words.push(&text[pos..]);
                break;
            };
            if m.start() > pos {
                // Unreachable with these patterns (every character starts some branch), but text
                // between matches is kept, as Hugging Face's `Isolated` split behaviour does.
                words.push(&text[pos..m.start()]);
            }
            let mut end = m.end();
            let word = m.as_str();
            if end < text.len() && word.chars().all(char::is_whitespace) {
                let ends_in_newline = word.ends_with(['\r', '\n']);
                let from_last_branch = self.kind == PreTokenizerKind::Gpt2 || !ends_in_newline;
                let mut chars = word.chars();
                if let (true, Some(last), Some(_)) =
                    (from_last_branch, chars.next_back(), chars.next())
                {
                    end -= last.len_utf8();
                }
            }
            words.push(&text[m.start()..end]);
            pos = end;
        }
        words
    }
}

/// GPT-2's byte-to-unicode alphabet: printable Latin-1 bytes stand for themselves, the other 68
/// bytes for U+0100 onwards, in byte order.
pub(crate) fn byte_chars() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 0x100u32;
    for (b, slot) in table.iter_mut().enumerate() {
        let printable = matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF);
        let code = if printable {
            b as u32
        } else {
            next += 1;
            next - 1
        };
        // All codes are below U+0144: valid scalar values.
        *slot = char::from_u32(code).unwrap_or('\0');
    }
    table
}

/// The inverse of `byte_chars`: the byte a character of a byte-level token stands for.
pub(crate) fn char_byte(c: char) -> Option<u8> {
    let code = c as u32;
    match code {
        0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF => Some(code as u8),
        0x100..=0x143 => {
            // The 68 non-printable bytes, in order.
            (0u8..=255)
                .filter(|b| !matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF))
                .nth((code - 0x100) as usize)
        }
        _ => None,
    }
}

/// The UTF-8 bytes a byte-level token's text stands for. Characters outside GPT-2's alphabet
/// (none in a well-formed vocabulary) stand for their own UTF-8.
pub(crate) fn token_text_bytes(text: &str) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(text.len());
    for c in text.chars() {
        match char_byte(c) {
            Some(b) => bytes.push(b),
            None => bytes.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
        }
    }
    bytes
}

/// One merge rule: its rank (position in `tokenizer.ggml.merges`) and the piece it produces.
#[derive(Clone, Copy)]
struct Merge {
    rank: u32,
    result: u32,
}

pub(crate) struct Bpe {
    pre: PreTokenizer,
    /// Boxed to keep `Bpe` small.
    byte_chars: Box<[char; 256]>,
    /// Every text that is an operand or a result of a merge, interned; the merge table works on
    /// these ids so that a lookup neither allocates nor hashes strings.
    pieces: HashMap<Box<str>, u32>,
    /// (left piece, right piece) → merge. The first rule for a pair wins, as in llama.cpp.
    merges: HashMap<(u32, u32), Merge>,
}

/// A run of a word's bytes; `len == 0` marks a symbol merged into its left neighbour. `piece` is
/// its interned text, `None` if no merge rule mentions it.
#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    piece: Option<u32>,
    prev: Option<usize>,
    next: Option<usize>,
}

/// A candidate merge of `left` and `right`, stale once either symbol's length changed.
struct Bigram {
    rank: u32,
    left: usize,
    right: usize,
    left_len: usize,
    right_len: usize,
}

impl Ord for Bigram {
    /// Lowest rank first; among equal ranks the leftmost pair.
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .rank
            .cmp(&self.rank)
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

impl Bpe {
    /// `merges` are `"left right"` strings, rank = position; `key` names them in errors.
    pub(crate) fn new(kind: PreTokenizerKind, merges: &[&str], key: &str) -> Result<Self> {
        let mut pieces: HashMap<Box<str>, u32> = HashMap::with_capacity(merges.len() * 2);
        let mut table = HashMap::with_capacity(merges.len());
        let mut intern = |text: &str| -> u32 {
            let next = pieces.len() as u32;
            *pieces.entry(text.into()).or_insert(next)
        };
        for (rank, rule) in merges.iter().enumerate() {
            // llama.cpp splits at the first space after the first byte; skipping the whole first
            // character is the same on valid text and keeps the slicing on char boundaries.
            let first = rule.chars().next().map_or(0, char::len_utf8);
            let (left, right) = match rule[first..].find(' ') {
                Some(at) => (&rule[..first + at], &rule[first + at + 1..]),
                None => ("", ""),
            };
            if left.is_empty() || right.is_empty() {
                return Err(Error::Tokenizer(format!(
                    "'{key}' item {rank} ({rule:?}) is not two tokens separated by a space"
                )));
            }
            let (l, r) = (intern(left), intern(right));
            let result = intern(&format!("{left}{right}"));
            if let Entry::Vacant(slot) = table.entry((l, r)) {
                slot.insert(Merge {
                    rank: rank as u32,
                    result,
                });
            }
        }
        Ok(Self {
            pre: PreTokenizer::new(kind),
            byte_chars: Box::new(byte_chars()),
            pieces,
            merges: table,
        })
    }

    /// Appends the tokens of one text fragment to `out`.
    pub(crate) fn encode(&self, vocab: &Vocab, fragment: &str, out: &mut Vec<u32>) {
        let mut word = String::new();
        for raw in self.pre.split(fragment) {
            word.clear();
            word.extend(raw.bytes().map(|b| self.byte_chars[b as usize]));
            self.encode_word(vocab, &word, out);
        }
    }

    fn encode_word(&self, vocab: &Vocab, word: &str, out: &mut Vec<u32>) {
        let n = word.chars().count();
        let mut symbols: Vec<Symbol> = Vec::with_capacity(n);
        for (i, (start, c)) in word.char_indices().enumerate() {
            let len = c.len_utf8();
            symbols.push(Symbol {
                start,
                len,
                piece: self.pieces.get(&word[start..start + len]).copied(),
                prev: i.checked_sub(1),
                next: (i + 1 < n).then_some(i + 1),
            });
        }
        let mut queue = BinaryHeap::with_capacity(n);
        for i in 1..n {
            self.add_bigram(&symbols, Some(i - 1), Some(i), &mut queue);
        }
        // Every merge removes a symbol and queues at most two bigrams: O(n log n) in all.
        while let Some(bigram) = queue.pop() {
            let (l, r) = (symbols[bigram.left], symbols[bigram.right]);
            // A symbol's start never moves, so unchanged lengths mean unchanged texts (and,
            // both being alive, still adjacent).
            if l.len == 0 || r.len == 0 || l.len != bigram.left_len || r.len != bigram.right_len {
                continue;
            }
            let merged = (l.piece.zip(r.piece)).and_then(|pair| self.merges.get(&pair));
            let Some(merge) = merged else {
                continue;
            };
            symbols[bigram.left].len += r.len;
            symbols[bigram.left].piece = Some(merge.result);
            symbols[bigram.right].len = 0;
            symbols[bigram.left].next = r.next;
            if let Some(next) = r.next {
                symbols[next].prev = Some(bigram.left);
            }
            let left = Some(bigram.left);
            self.add_bigram(&symbols, l.prev, left, &mut queue);
            self.add_bigram(&symbols, left, r.next, &mut queue);
        }

        let mut at = (n > 0).then_some(0);
        while let Some(i) = at {
            let s = symbols[i];
            let text = &word[s.start..s.start + s.len];
            match vocab.id(text) {
                Some(id) => out.push(id),
                // A merge result missing from the vocabulary: llama.cpp falls back to the
                // one-byte tokens of its text, which exist only for ASCII characters, and drops
                // the rest. Same here.
                None => out.extend(
                    text.chars()
                        .filter(char::is_ascii)
                        .filter_map(|c| vocab.id(c.encode_utf8(&mut [0; 4]))),
                ),
            }
            at = s.next;
        }
    }

    fn add_bigram(
        &self,
        symbols: &[Symbol],
        left: Option<usize>,
        right: Option<usize>,
        queue: &mut BinaryHeap<Bigram>,
    ) {
        let (Some(left), Some(right)) = (left, right) else {
            return;
        };
        let (l, r) = (symbols[left], symbols[right]);
        let Some(pair) = l.piece.zip(r.piece) else {
            return;
        };
        if let Some(merge) = self.merges.get(&pair) {
            queue.push(Bigram {
                rank: merge.rank,
                left,
                right,
                left_len: l.len,
                right_len: r.len,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(kind: PreTokenizerKind, text: &str) -> Vec<String> {
        PreTokenizer::new(kind)
            .split(text)
            .into_iter()
            .map(String::from)
            .collect()
    }

    #[test]
    fn byte_alphabet_round_trips() {
        let table = byte_chars();
        for b in 0..=255u8 {
            assert_eq!(char_byte(table[b as usize]), Some(b), "byte {b}");
        }
        assert_eq!(table[b' ' as usize], 'Ġ');
        assert_eq!(table[b'\n' as usize], 'Ċ');
        assert_eq!(token_text_bytes("Ġhello"), b" hello");
    }

    #[test]
    fn gpt2_split() {
        use PreTokenizerKind::Gpt2;
        assert_eq!(
            split(Gpt2, "Hello world's  end!!\n\n x"),
            ["Hello", " world", "'s", " ", " end", "!!", "\n\n", " x"]
        );
        assert_eq!(split(Gpt2, "a \nb"), ["a", " ", "\n", "b"]);
        assert_eq!(split(Gpt2, "x   "), ["x", "   "]);
        assert_eq!(split(Gpt2, "12345 6"), ["12345", " 6"]);
    }

    #[test]
    fn gpt4o_split_hand_checked() {
        use PreTokenizerKind::Gpt4o;
        // Contractions attach to the word, case-insensitively.
        assert_eq!(
            split(Gpt4o, "I'm sure it'S fine"),
            ["I'm", " sure", " it'S", " fine"]
        );
        // Numbers in groups of at most three digits, never with a leading space.
        assert_eq!(split(Gpt4o, "1234567 89"), ["123", "456", "7", " ", "89"]);
        // CJK letters are both "upper" and "lower" (Lo) and run together with what follows.
        assert_eq!(split(Gpt4o, "我想在apple工作"), ["我想在apple工作"]);
        // Punctuation runs take one leading space and trailing newlines/slashes.
        assert_eq!(
            split(Gpt4o, "Hi!!! ...\n/path"),
            ["Hi", "!!!", " ...\n/", "path"]
        );
        // Case is Unicode's: a capital after lower-case letters starts a new word.
        assert_eq!(split(Gpt4o, "helloÄpfel"), ["hello", "Äpfel"]);
        // Combining marks stay in the word (e + U+0301).
        assert_eq!(split(Gpt4o, "cafe\u{301} ok"), ["cafe\u{301}", " ok"]);
        // CamelCase splits before each capital run; a non-letter prefix joins a word.
        assert_eq!(
            split(Gpt4o, "HTTPServer camelCase"),
            ["HTTPServer", " camel", "Case"]
        );
        // Whitespace: the last space joins the next word, newline runs stand alone.
        assert_eq!(
            split(Gpt4o, "a   b\n\n  c  "),
            ["a", "  ", " b", "\n\n", " ", " c", "  "]
        );
        assert_eq!(split(Gpt4o, "\tx"), ["\tx"]);
    }

    #[test]
    fn malformed_merges_name_the_key() {
        for bad in ["ab", "a ", " ", ""] {
            let err = Bpe::new(
                PreTokenizerKind::Gpt2,
                &["a b", bad],
                "tokenizer.ggml.merges",
            )
            .err()
            .unwrap()
            .to_string();
            assert!(
                err.contains("tokenizer.ggml.merges") && err.contains("item 1"),
                "{err}"
            );
        }
        // A space as the first character is part of the left token, as in llama.cpp.
        assert!(Bpe::new(PreTokenizerKind::Gpt2, &["  b"], "k").is_ok());
    }
}

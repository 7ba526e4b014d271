//! The tokenizer against llama.cpp's ids on the shared fixtures, plus hand-built vocabularies
//! for tokenizer.json files and hostile metadata.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::gguf::GgufFile;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/fixtures/")).join(name)
}

fn gguf_tokenizer(name: &str) -> Tokenizer {
    let file = GgufFile::open(fixture(name)).unwrap();
    Tokenizer::from_gguf(file.metadata()).unwrap()
}

/// llama.cpp's vocabulary test: `.inp` cases separated by `\n__ggml_vocab_test__\n` (the file
/// ends with the marker), `.out` one line of ids per case. Returns how many cases matched.
fn check_vocab_cases(tokenizer: &Tokenizer, stem: &str) -> usize {
    let inp = std::fs::read_to_string(fixture(&format!("{stem}.inp"))).unwrap();
    let out = std::fs::read_to_string(fixture(&format!("{stem}.out"))).unwrap();
    let mut cases: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
    assert_eq!(cases.pop(), Some(""), "{stem}.inp ends with the marker");
    let expected: Vec<&str> = out.lines().collect();
    assert_eq!(cases.len(), expected.len(), "{stem}: cases vs. id lines");
    assert!(cases.len() >= 40, "{stem}: only {} cases", cases.len());

    let mut failures = Vec::new();
    for (text, line) in cases.iter().zip(&expected) {
        let want: Vec<u32> = line
            .split_whitespace()
            .map(|t| t.parse().unwrap())
            .collect();
        let got = tokenizer.encode(text, false, false).unwrap();
        if got != want {
            failures.push(format!("{text:?}\n  want {want:?}\n  got  {got:?}"));
        }
    }
    assert!(failures.is_empty(), "{stem}:\n{}", failures.join("\n"));
    cases.len()
}

#[test]
fn phi3_vocab_matches_llama_cpp() {
    let tokenizer = gguf_tokenizer("phi3-vocab.gguf");
    assert_eq!(check_vocab_cases(&tokenizer, "phi3-vocab.llamacpp"), 46);
}

#[test]
fn gpt2_vocab_matches_llama_cpp() {
    let tokenizer = gguf_tokenizer("gpt2-vocab.gguf");
    assert_eq!(check_vocab_cases(&tokenizer, "gpt2-vocab.llamacpp"), 46);
}

/// Every rendered prompt of the model fixtures, with BOS and special tokens parsed, gives
/// llama.cpp's `prompt_ids`; and the stop tokens are llama.cpp's.
#[test]
fn model_prompts_match_llama_cpp() {
    for stem in [
        "tiny-phi3-haiku-q4_k_m",
        "tiny-phi35-longrope-q4_k_m",
        "tiny-phi4mini-gqa-partial-tied-q4_k_m",
    ] {
        let tokenizer = gguf_tokenizer(&format!("{stem}.gguf"));
        let json = std::fs::read(fixture(&format!("{stem}.llamacpp.json"))).unwrap();
        let reference: serde_json::Value = serde_json::from_slice(&json).unwrap();
        let ids = |v: &serde_json::Value| -> Vec<u32> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        };
        let stop = ids(&reference["stop_ids"]);
        assert!(
            stop.iter().all(|id| tokenizer.stop_ids().contains(id)),
            "{stem}: llama.cpp stops on {stop:?}, phi3 on {:?}",
            tokenizer.stop_ids()
        );
        let mut checked = 0;
        for case in reference["cases"].as_array().unwrap() {
            let name = case["name"].as_str().unwrap();
            let Some(prompt) = case["prompt_text"].as_str() else {
                // The `ids` case gives ids, not text.
                continue;
            };
            assert!(tokenizer.add_bos_default(), "{stem}");
            let got = tokenizer.encode(prompt, true, true).unwrap();
            assert_eq!(got, ids(&case["prompt_ids"]), "{stem} {name}: {prompt:?}");
            checked += 1;
        }
        assert_eq!(checked, 6, "{stem}");
    }
}

#[test]
fn phi3_special_tokens_strip_the_whitespace_after_them() {
    let t = gguf_tokenizer("phi3-vocab.gguf");
    let user = t.token_to_id("<|user|>").unwrap();
    let end = t.token_to_id("<|end|>").unwrap();
    let hello = t.encode("Hello", false, false).unwrap();
    assert_eq!(
        t.encode("<|user|>\n Hello<|end|>\n", false, true).unwrap(),
        [&[user][..], &hello, &[end]].concat()
    );
    // `<s>` keeps what follows; without parse_special the markers are plain text.
    let bos = t.bos_id().unwrap();
    let with_newline = t.encode("<s>\nHi", false, true).unwrap();
    assert_eq!(with_newline[0], bos);
    assert!(with_newline.contains(&t.token_to_id("<0x0A>").unwrap()));
    assert!(!t.encode("<|user|>", false, false).unwrap().contains(&user));
}

#[test]
fn accessors_on_phi3() {
    let t = gguf_tokenizer("phi3-vocab.gguf");
    assert_eq!(t.vocab_size(), 32064);
    assert_eq!((t.bos_id(), t.eos_id()), (Some(1), Some(32000)));
    assert_eq!(t.stop_ids(), [32000, 32007]);
    assert!(t.add_bos_default() && t.strips_leading_space());
    assert_eq!(t.id_to_token(32007), Some("<|end|>"));
    assert_eq!(t.token_to_id("<|end|>"), Some(32007));
    assert!(t.is_control(32007) && t.is_control(1) && !t.is_control(29871));
    assert_eq!(t.token_bytes(13), Some(&b"\n"[..]));
    assert_eq!(t.token_bytes(29871), Some(&b" "[..]));
    assert_eq!(t.token_bytes(32007), Some(&b"<|end|>"[..]));
    assert_eq!(t.token_bytes(32064), None);
    assert!(t.decode(&[32064], false).is_err());

    let g = gguf_tokenizer("gpt2-vocab.gguf");
    assert!(!g.add_bos_default() && !g.strips_leading_space());
    assert_eq!(g.stop_ids(), [50256]);
    let space_hello = g.token_to_id("Ġhello").unwrap();
    assert_eq!(g.token_bytes(space_hello), Some(&b" hello"[..]));
}

const ROUND_TRIP_TEXTS: [&str; 6] = [
    "Hello world",
    "  two  spaces\n\nand\ttabs ",
    "Äpfel, нещо на Български, 我想在apple工作1314151天～",
    "🦙 emoji 😶‍🌫️ (ZWJ) ✅",
    "<|user|> is text here",
    "x",
];

#[test]
fn decode_inverts_encode() {
    let spm = gguf_tokenizer("phi3-vocab.gguf");
    let bpe = gguf_tokenizer("gpt2-vocab.gguf");
    for text in ROUND_TRIP_TEXTS {
        // SentencePiece gives back its dummy-prefix space.
        let ids = spm.encode(text, true, false).unwrap();
        assert_eq!(spm.decode(&ids, true).unwrap(), format!(" {text}"));
        assert_eq!(spm.decode(&ids, false).unwrap(), format!("<s> {text}"));
        let ids = bpe.encode(text, false, false).unwrap();
        assert_eq!(bpe.decode(&ids, false).unwrap(), text);
    }
    // Special tokens parsed and decoded back.
    let ids = spm
        .encode("<|user|>\nHi<|end|>\n<|assistant|>", true, true)
        .unwrap();
    assert_eq!(
        spm.decode(&ids, false).unwrap(),
        "<s><|user|> Hi<|end|><|assistant|>"
    );
    assert_eq!(spm.decode(&ids, true).unwrap(), " Hi");
}

/// Streams `ids` and checks the pieces against `decode`.
fn stream_pieces(t: &Arc<Tokenizer>, ids: &[u32], skip_special: bool) -> Vec<Option<String>> {
    let mut stream = DecodeStream::new(t.clone(), skip_special);
    let mut pieces: Vec<Option<String>> = ids.iter().map(|&id| stream.push(id)).collect();
    pieces.push(stream.finish());
    let streamed: String = pieces.iter().flatten().map(String::as_str).collect();
    let mut decoded = t.decode(ids, skip_special).unwrap();
    if t.strips_leading_space() && decoded.starts_with(' ') {
        decoded.remove(0);
    }
    assert_eq!(streamed, decoded, "{ids:?}");
    pieces
}

#[test]
fn decode_stream_matches_decode() {
    let spm = Arc::new(gguf_tokenizer("phi3-vocab.gguf"));
    let bpe = Arc::new(gguf_tokenizer("gpt2-vocab.gguf"));
    for text in ROUND_TRIP_TEXTS {
        for skip in [false, true] {
            stream_pieces(&spm, &spm.encode(text, true, true).unwrap(), skip);
            stream_pieces(&bpe, &bpe.encode(text, false, true).unwrap(), skip);
        }
    }

    // 🏒 is four byte-fallback tokens: nothing comes out until the fourth.
    let ids = spm.encode("a 🏒 冰", false, false).unwrap();
    let hockey: Vec<u32> = [0xF0, 0x9F, 0x8F, 0x92]
        .iter()
        .map(|b| spm.token_to_id(&format!("<0x{b:02X}>")).unwrap())
        .collect();
    let at = ids.windows(4).position(|w| w == hockey).unwrap();
    let pieces = stream_pieces(&spm, &ids, true);
    assert_eq!(
        pieces[0].as_deref(),
        Some("a"),
        "the dummy-prefix space is dropped"
    );
    assert_eq!(&pieces[at..at + 4], &[None, None, None, Some("🏒".into())]);

    // Bytes that never form a character come out as U+FFFD, as decode renders them.
    let lone = [
        spm.token_to_id("<0xF0>").unwrap(),
        spm.token_to_id("<0x9F>").unwrap(),
    ];
    let pieces = stream_pieces(&spm, &[lone[0], lone[1], 29874], false);
    assert_eq!(pieces.last().unwrap(), &None);
    let pieces = stream_pieces(&spm, &lone, false);
    assert_eq!(pieces.last().unwrap().as_deref(), Some("\u{FFFD}"));
}

/// Long inputs of one repeated character stay fast (no quadratic blowup).
#[test]
fn long_inputs_tokenize_in_linear_time() {
    let spm = gguf_tokenizer("phi3-vocab.gguf");
    let bpe = gguf_tokenizer("gpt2-vocab.gguf");
    for unit in ["a", " ", "\n", "9", "🦙", "<|end|>"] {
        let text = unit.repeat(100_000 / unit.chars().count());
        for t in [&spm, &bpe] {
            let start = Instant::now();
            let ids = t.encode(&text, false, true).unwrap();
            let elapsed = start.elapsed();
            assert!(!ids.is_empty());
            // Debug build on a shared 2-core machine: linear runs take well under a second.
            assert!(elapsed < Duration::from_secs(10), "{unit:?}: {elapsed:?}");
        }
    }
}

#[test]
fn tokenizer_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Tokenizer>();
    check::<DecodeStream>();
}

// --- tokenizer.json -----------------------------------------------------------------------

fn added(id: u32, content: &str) -> serde_json::Value {
    serde_json::json!({
        "id": id, "content": content, "single_word": false, "lstrip": false,
        "rstrip": false, "normalized": false, "special": true
    })
}

/// A SentencePiece-style tokenizer.json (Phi-3's layout): `▁` prefix, byte fallback.
#[test]
fn tokenizer_json_sentencepiece_style() {
    let vocab = serde_json::json!({
        "<unk>": 0, "<s>": 1, "</s>": 2, "<0x0A>": 3, "<0xF0>": 4, "<0x9F>": 5, "<0xA6>": 6,
        "<0x99>": 7, "▁": 8, "h": 9, "e": 10, "l": 11, "o": 12, "▁h": 13, "▁he": 14, "ll": 15,
        "▁hell": 16, "▁hello": 17, "<|user|>": 18
    });
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [added(0, "<unk>"), added(1, "<s>"), added(2, "</s>"), added(18, "<|user|>")],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
        ]},
        "pre_tokenizer": null, "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}
        ]},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>",
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": true,
            "byte_fallback": true, "vocab": vocab,
            "merges": ["▁ h", "▁h e", "l l", "▁he ll", "▁hell o"]}
    });
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    std::fs::write(&path, json.to_string()).unwrap();
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"add_bos_token": true, "bos_token": "<s>", "eos_token": {"content": "</s>"}}"#,
    )
    .unwrap();
    let t = Arc::new(Tokenizer::from_tokenizer_json(&path).unwrap());
    dir.close().unwrap();

    assert_eq!(t.vocab_size(), 19);
    assert_eq!((t.bos_id(), t.eos_id()), (Some(1), Some(2)));
    assert!(t.add_bos_default() && t.strips_leading_space());
    assert_eq!(t.stop_ids(), [2]);
    let ids = t.encode("hello hello\n🦙", true, true).unwrap();
    assert_eq!(ids, [1, 17, 17, 3, 4, 5, 6, 7]);
    assert_eq!(t.token_bytes(17), Some(&b" hello"[..]));
    assert_eq!(t.token_bytes(8), Some(&b" "[..]));
    assert_eq!(t.token_bytes(3), Some(&b"\n"[..]));
    assert_eq!(t.token_bytes(1), Some(&b"<s>"[..]));
    assert!(t.is_control(1) && t.is_control(18) && !t.is_control(17));
    assert_eq!(t.decode(&ids, true).unwrap(), " hello hello\n🦙");
    let pieces = stream_pieces(&t, &ids, true);
    assert_eq!(pieces[1].as_deref(), Some("hello"));
    assert_eq!(&pieces[4..8], &[None, None, None, Some("🦙".into())]);

    assert_eq!(t.encode("<|user|>hello", false, true).unwrap(), [18, 17]);
    assert!(!t
        .encode("<|user|>hello", false, false)
        .unwrap()
        .contains(&18));
}

/// A byte-level BPE tokenizer.json (GPT-2/Phi-4 layout), with no config beside it.
#[test]
fn tokenizer_json_byte_level() {
    let vocab = serde_json::json!({
        "h": 0, "e": 1, "l": 2, "o": 3, "Ġ": 4, "Ċ": 5, "he": 6, "ll": 7, "hell": 8,
        "hello": 9, "Ġhello": 10, "Ġh": 11, "Ġhe": 12, "Ġhell": 13, "<|endoftext|>": 14
    });
    let byte_level = serde_json::json!({
        "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true
    });
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [added(14, "<|endoftext|>")],
        "normalizer": null, "pre_tokenizer": byte_level, "post_processor": null,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
            "byte_fallback": false, "vocab": vocab,
            "merges": ["Ġ h", "h e", "Ġh e", "l l", "he ll", "Ġhe ll", "hell o", "Ġhell o"]}
    });
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    std::fs::write(&path, json.to_string()).unwrap();
    let t = Arc::new(Tokenizer::from_tokenizer_json(&path).unwrap());
    dir.close().unwrap();

    assert!(!t.add_bos_default() && !t.strips_leading_space());
    assert_eq!((t.bos_id(), t.eos_id()), (Some(14), Some(14)));
    let ids = t
        .encode("hello hello\nhello<|endoftext|>", false, true)
        .unwrap();
    assert_eq!(ids, [9, 10, 5, 9, 14]);
    assert_eq!(t.token_bytes(10), Some(&b" hello"[..]));
    assert_eq!(t.token_bytes(5), Some(&b"\n"[..]));
    assert_eq!(t.token_bytes(14), Some(&b"<|endoftext|>"[..]));
    assert_eq!(t.decode(&ids, true).unwrap(), "hello hello\nhello");
    stream_pieces(&t, &ids, false);
}

#[test]
fn tokenizer_json_errors() {
    let missing = std::env::temp_dir().join("phi3-no-such-dir/tokenizer.json");
    assert!(matches!(
        Tokenizer::from_tokenizer_json(&missing),
        Err(Error::FileNotFound(_))
    ));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    std::fs::write(&path, r#"{"model": 3}"#).unwrap();
    let err = Tokenizer::from_tokenizer_json(&path)
        .err()
        .unwrap()
        .to_string();
    dir.close().unwrap();
    assert!(err.contains("tokenizer.json"), "{err}");
}

// --- hostile metadata ---------------------------------------------------------------------

fn strings(items: &[&str]) -> Value {
    Value::Array(items.iter().map(|s| Value::String(s.to_string())).collect())
}

/// A small, valid SentencePiece vocabulary.
fn spm_metadata() -> BTreeMap<String, Value> {
    let tokens = [
        "<unk>", "<s>", "</s>", "<0x0A>", "▁", "a", "b", "▁a", "ab", "▁ab",
    ];
    let types = [3, 3, 3, 6, 1, 1, 1, 1, 1, 1];
    let scores = [0.0, 0.0, 0.0, 0.0, -1.0, -2.0, -2.0, -3.0, -1.0, -0.5];
    BTreeMap::from([
        (keys::MODEL.into(), Value::String("llama".into())),
        (keys::TOKENS.into(), strings(&tokens)),
        (
            keys::TOKEN_TYPE.into(),
            Value::Array(types.iter().map(|&t| Value::I32(t)).collect()),
        ),
        (
            keys::SCORES.into(),
            Value::Array(scores.iter().map(|&s| Value::F32(s)).collect()),
        ),
        (keys::BOS_ID.into(), Value::U32(1)),
        (keys::EOS_ID.into(), Value::U32(2)),
    ])
}

fn bpe_metadata() -> BTreeMap<String, Value> {
    BTreeMap::from([
        (keys::MODEL.into(), Value::String("gpt2".into())),
        (keys::PRE.into(), Value::String("gpt-4o".into())),
        (keys::TOKENS.into(), strings(&["a", "b", "ab", "Ġ"])),
        (keys::MERGES.into(), strings(&["a b"])),
    ])
}

#[test]
fn hand_built_vocabularies_encode() {
    let t = Tokenizer::from_gguf(&Metadata::new(spm_metadata())).unwrap();
    // "▁ab" (score -0.5) beats the path through "▁a"; "\n" and unknown "c" fall back to bytes
    // (no <0x63> token here: the unknown token).
    assert_eq!(t.encode("ab", true, false).unwrap(), [1, 9]);
    assert_eq!(t.encode("ab\nc", false, false).unwrap(), [9, 3, 0]);
    let t = Tokenizer::from_gguf(&Metadata::new(bpe_metadata())).unwrap();
    assert_eq!(t.encode("abab a", false, false).unwrap(), [2, 2, 3, 0]);
    assert_eq!(t.bos_id(), None);
    assert!(t.encode("a", true, false).is_err());
}

/// Each corruption of valid metadata is an error naming the key at fault.
#[test]
fn hostile_metadata_errors_name_the_key() {
    type Edit = Box<dyn Fn(&mut BTreeMap<String, Value>)>;
    let set = |key: &'static str, value: Value| -> Edit {
        Box::new(move |m| {
            m.insert(key.into(), value.clone());
        })
    };
    let remove = |key: &'static str| -> Edit {
        Box::new(move |m| {
            m.remove(key);
        })
    };
    let spm_cases: Vec<(Edit, &str)> = vec![
        (set(keys::MODEL, Value::String("bert".into())), keys::MODEL),
        (set(keys::MODEL, Value::U32(1)), keys::MODEL),
        (remove(keys::TOKENS), keys::TOKENS),
        (set(keys::TOKENS, strings(&[])), keys::TOKENS),
        (
            set(keys::TOKENS, Value::Array(vec![Value::U8(1)])),
            keys::TOKENS,
        ),
        (
            set(
                keys::TOKENS,
                strings(&["<unk>", "<s>", "</s>", "", "▁", "a", "b", "▁a", "ab", "▁ab"]),
            ),
            keys::TOKENS,
        ),
        (
            set(
                keys::TOKENS,
                strings(&[
                    "<unk>", "<s>", "</s>", "<0x0A>", "a", "a", "b", "▁a", "ab", "▁ab",
                ]),
            ),
            keys::TOKENS,
        ),
        (
            set(keys::TOKEN_TYPE, Value::Array(vec![Value::I32(1)])),
            keys::TOKEN_TYPE,
        ),
        (
            set(keys::TOKEN_TYPE, Value::Array(vec![Value::I32(9); 10])),
            keys::TOKEN_TYPE,
        ),
        (
            set(keys::TOKEN_TYPE, Value::Array(vec![Value::I32(-1); 10])),
            keys::TOKEN_TYPE,
        ),
        // "<unk>" typed as a byte token.
        (
            set(keys::TOKEN_TYPE, Value::Array(vec![Value::I32(6); 10])),
            keys::TOKEN_TYPE,
        ),
        (
            set(keys::SCORES, Value::Array(vec![Value::F32(0.0); 3])),
            keys::SCORES,
        ),
        (
            set(keys::SCORES, Value::Array(vec![Value::F32(f32::NAN); 10])),
            keys::SCORES,
        ),
        (
            set(
                keys::SCORES,
                Value::Array(vec![Value::String("x".into()); 10]),
            ),
            keys::SCORES,
        ),
        (set(keys::BOS_ID, Value::U32(10)), keys::BOS_ID),
        (set(keys::BOS_ID, Value::U64(u64::MAX)), keys::BOS_ID),
        (set(keys::BOS_ID, Value::I32(-1)), keys::BOS_ID),
        (set(keys::EOS_ID, Value::U32(1 << 31)), keys::EOS_ID),
        (set(keys::UNK_ID, Value::U32(99)), keys::UNK_ID),
        (set(keys::ADD_BOS, Value::U8(1)), keys::ADD_BOS),
        (
            set(keys::ADD_SPACE_PREFIX, Value::String("yes".into())),
            keys::ADD_SPACE_PREFIX,
        ),
        (
            Box::new(|m: &mut BTreeMap<String, Value>| {
                m.insert(keys::TOKENS.into(), strings(&["a"]));
                m.insert(keys::TOKEN_TYPE.into(), Value::Array(vec![Value::I32(1)]));
                m.insert(keys::SCORES.into(), Value::Array(vec![Value::F32(0.0)]));
                m.remove(keys::BOS_ID);
                m.remove(keys::EOS_ID);
                m.insert(keys::ADD_BOS.into(), Value::Bool(true));
            }),
            keys::BOS_ID,
        ),
    ];
    let bpe_cases: Vec<(Edit, &str)> = vec![
        (remove(keys::MERGES), keys::MERGES),
        (set(keys::MERGES, strings(&["ab"])), keys::MERGES),
        (set(keys::MERGES, strings(&["a "])), keys::MERGES),
        (set(keys::MERGES, Value::String("a b".into())), keys::MERGES),
        (set(keys::PRE, Value::String("llama3".into())), keys::PRE),
        (set(keys::BOS_ID, Value::U32(4)), keys::BOS_ID),
    ];
    for (base, cases) in [(spm_metadata(), spm_cases), (bpe_metadata(), bpe_cases)] {
        assert!(Tokenizer::from_gguf(&Metadata::new(base.clone())).is_ok());
        for (i, (edit, key)) in cases.iter().enumerate() {
            let mut entries = base.clone();
            edit(&mut entries);
            match Tokenizer::from_gguf(&Metadata::new(entries)) {
                Ok(_) => panic!("case {i} ({key}) was accepted"),
                Err(e) => assert!(e.to_string().contains(key), "case {i}: {e}"),
            }
        }
    }
}

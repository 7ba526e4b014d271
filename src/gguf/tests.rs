//! Hostile GGUF files: hand-built ones for each way a header can lie, every truncation of a
//! real model, and seeded random corruption of it run through the parser, the tokenizer, model
//! loading and one forward step. Each must end in an error that names the problem (and the key
//! or tensor at fault), never a panic, and never a large allocation.
//!
//! Files are built in memory by a small test-only GGUF writer ([`Gguf`], in `test_writer.rs`);
//! the corrupted models
//! derive from the shared tiny fixture at test time (nothing binary is committed).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::Arc;

use super::names::{self, hparams, tensors as tn, tokenizer as tk};
use super::reader::{
    parse, GgufFile, MAX_ARRAY_DEPTH, MAX_DIMS, MAX_KV, MAX_METADATA_ITEMS, MAX_STRING_BYTES,
    MAX_TENSORS,
};
use super::test_writer::{s, Gguf, F16, F32, Q4_0, Q8_0, T_ARRAY, T_STRING, T_U32, T_U64, T_U8, V};
use super::{TensorType, Value};
use crate::error::{Error, Result};
use crate::model::weights::WeightLoader;
use crate::model::Phi3Model;
use crate::test_support::{allocations, fixture};
use crate::tokenizer::Tokenizer;

const TINY_FIXTURE: &str = "tiny-phi3-haiku-q4_k_m.gguf";

// ---------------------------------------------------------------------------------------------
// Helpers.

/// Largest allocation a hand-built hostile file may cause while parsed.
const SMALL_ALLOCATION: usize = 64 << 10;

/// Parses `bytes`, which must fail without a large allocation; returns the message.
fn parse_err(bytes: &[u8]) -> String {
    let (result, largest, total) = allocations(|| parse(bytes));
    let err = match result {
        Ok(_) => panic!("a hostile file parsed"),
        Err(e) => e,
    };
    assert!(
        matches!(
            err,
            Error::InvalidGguf { .. } | Error::UnsupportedModel { .. }
        ),
        "{err:?}"
    );
    assert!(
        largest <= SMALL_ALLOCATION && total <= 4 * SMALL_ALLOCATION,
        "parsing a {}-byte file allocated {largest} bytes at once, {total} in all: {err}",
        bytes.len()
    );
    err.to_string()
}

/// Asserts that `bytes` fails to parse with a message containing every one of `needles`.
#[track_caller]
fn assert_rejected(bytes: &[u8], needles: &[&str]) {
    let message = parse_err(bytes);
    for needle in needles {
        assert!(
            message.contains(needle),
            "message {message:?} does not contain {needle:?}"
        );
    }
}

/// A temp file path, removed on drop.
fn temp_gguf() -> tempfile::TempPath {
    tempfile::Builder::new()
        .prefix("phi3-gguf-test-")
        .suffix(".gguf")
        .tempfile()
        .unwrap()
        .into_temp_path()
}

fn open_bytes(bytes: &[u8], path: &Path) -> Result<GgufFile> {
    std::fs::write(path, bytes).unwrap();
    GgufFile::open(path)
}

/// Writes `bytes` to a temp file, opens it and loads the model for `context` positions.
fn load(bytes: &[u8], context: Option<usize>) -> Result<Phi3Model> {
    let path = temp_gguf();
    let file = open_bytes(bytes, &path)?;
    Phi3Model::load(&Arc::new(file), context)
}

#[track_caller]
fn assert_load_fails(model: &Gguf, needles: &[&str]) {
    let err = match load(&model.build(), None) {
        Ok(_) => panic!("a hostile model loaded (expected {needles:?})"),
        Err(e) => e.to_string(),
    };
    for needle in needles {
        assert!(
            err.contains(needle),
            "message {err:?} does not contain {needle:?}"
        );
    }
}

/// splitmix64: a tiny, good-enough seeded generator (no dependency).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0; the modulo bias is irrelevant here).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(non-string panic)".into())
}

// ---------------------------------------------------------------------------------------------
// A tiny, valid phi3 model in F32 (block size 1: any shape is representable).

const E: u64 = 16; // embedding
const HEADS: u64 = 2;
const HEAD_DIM: u64 = E / HEADS;
const FF: u64 = 16;
const VOCAB: u64 = 8;

fn values(n: u64, seed: u64) -> Vec<f32> {
    let mut rng = Rng(seed);
    (0..n)
        .map(|_| (rng.below(2001) as f32 - 1000.0) / 4000.0)
        .collect()
}

fn tiny_model() -> Gguf {
    let qkv = (HEADS + 2 * HEADS) * HEAD_DIM;
    let tokens = [
        "<unk>",
        "<s>",
        "</s>",
        "\u{2581}a",
        "a",
        "b",
        "<|end|>",
        "\u{2581}",
    ];
    let types = [2, 3, 3, 1, 1, 1, 3, 1];
    Gguf::new()
        .push(names::GENERAL_ARCHITECTURE, s("phi3"))
        .push(names::GENERAL_NAME, s("hostile-phi3"))
        .push("phi3.context_length", V::U32(64))
        .push("phi3.embedding_length", V::U32(E as u32))
        .push("phi3.feed_forward_length", V::U32(FF as u32))
        .push("phi3.block_count", V::U32(1))
        .push("phi3.attention.head_count", V::U32(HEADS as u32))
        .push("phi3.attention.head_count_kv", V::U32(HEADS as u32))
        .push("phi3.attention.layer_norm_rms_epsilon", V::F32(1e-5))
        .push("phi3.rope.dimension_count", V::U32(HEAD_DIM as u32))
        .push("phi3.rope.freq_base", V::F32(10_000.0))
        .push(tk::MODEL, s("llama"))
        .push(
            tk::TOKENS,
            V::Arr(T_STRING, tokens.into_iter().map(s).collect()),
        )
        .push(
            tk::SCORES,
            V::Arr(6, (0..8).map(|i| V::F32(-(i as f32))).collect()),
        )
        .push(
            tk::TOKEN_TYPE,
            V::Arr(5, types.iter().map(|&t| V::I32(t)).collect()),
        )
        .push(tk::BOS_ID, V::U32(1))
        .push(tk::EOS_ID, V::U32(2))
        .f32_tensor(tn::TOKEN_EMBD, &[E, VOCAB], &values(E * VOCAB, 1))
        .f32_tensor(tn::OUTPUT_NORM, &[E], &[1.0; E as usize])
        .f32_tensor(tn::OUTPUT, &[E, VOCAB], &values(E * VOCAB, 2))
        .f32_tensor("blk.0.attn_norm.weight", &[E], &[1.0; E as usize])
        .f32_tensor("blk.0.attn_qkv.weight", &[E, qkv], &values(E * qkv, 3))
        .f32_tensor("blk.0.attn_output.weight", &[E, E], &values(E * E, 4))
        .f32_tensor("blk.0.ffn_norm.weight", &[E], &[1.0; E as usize])
        .f32_tensor("blk.0.ffn_up.weight", &[E, 2 * FF], &values(2 * E * FF, 5))
        .f32_tensor("blk.0.ffn_down.weight", &[FF, E], &values(E * FF, 6))
}

/// Loads, runs two tokens, tokenizes: what every accepted file must survive.
fn exercise_model(model: &Phi3Model) -> Result<()> {
    let last = (model.vocab_size() - 1) as u32;
    let mut cache = model.new_cache();
    model.forward(&[0, last], &mut cache)?;
    model.forward(&[last], &mut cache)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The tiny fixture with its vocabulary cut to `MINI_VOCAB` tokens (embedding and output rows
// too): the same structure and tensor types, a 10 KB header and 1 MB file, so that every byte of
// its header can be cut and thousands of corruptions loaded within a debug build's test time.

const MINI_VOCAB: usize = 512;

fn fixture_bytes() -> Vec<u8> {
    std::fs::read(fixture(TINY_FIXTURE)).expect("the tiny fixture is readable")
}

fn mini_fixture() -> Gguf {
    let bytes = fixture_bytes();
    let header = parse(&bytes).unwrap();
    let mut out = Gguf::new();
    for (key, value) in header.metadata.iter() {
        let value = match (key.as_str(), value) {
            (tk::TOKENS | tk::SCORES | tk::TOKEN_TYPE, Value::Array(items)) => {
                V::from_value(&Value::Array(items[..MINI_VOCAB].to_vec()))
            }
            (tk::EOS_ID | tk::PAD_ID, _) => V::U32(2),
            (_, v) => V::from_value(v),
        };
        out = out.push(key, value);
    }
    for t in &header.tensors {
        let data = &bytes[t.offset..t.offset + t.size_bytes];
        let mut dims: Vec<u64> = t.dims.iter().map(|&d| d as u64).collect();
        let data = if t.name == tn::TOKEN_EMBD || t.name == tn::OUTPUT {
            let row_bytes = t.size_bytes / t.dims[1];
            dims[1] = MINI_VOCAB as u64;
            &data[..row_bytes * MINI_VOCAB]
        } else {
            data
        };
        out = out.tensor(&t.name, &dims, t.dtype.id(), data);
    }
    out
}

/// End of the tensor data of the file `bytes` (the last byte any tensor uses).
fn data_end(bytes: &[u8]) -> usize {
    let header = parse(bytes).unwrap();
    header
        .tensors
        .iter()
        .map(|t| t.offset + t.size_bytes)
        .max()
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// The writer and the valid files.

#[test]
fn writer_round_trips_every_value_type() {
    let bytes = Gguf::new()
        .push("u8", V::U8(200))
        .push("i8", V::I8(-100))
        .push("u16", V::U16(60_000))
        .push("i16", V::I16(-30_000))
        .push("u32", V::U32(4_000_000_000))
        .push("i32", V::I32(-2_000_000_000))
        .push("f32", V::F32(1.5))
        .push("bool", V::Bool(true))
        .push("string", s("héllo"))
        .push("array", V::Arr(T_U32, vec![V::U32(1), V::U32(2)]))
        .push(
            "nested",
            V::Arr(
                T_ARRAY,
                vec![V::Arr(T_STRING, vec![s("a"), s("b")]), V::Arr(T_U8, vec![])],
            ),
        )
        .push("u64", V::U64(u64::MAX))
        .push("i64", V::I64(i64::MIN))
        .push("f64", V::F64(-2.25))
        .tensor("t", &[2, 3], F32, &[0; 24])
        .tensor("u", &[32], Q8_0, &[0; 34])
        .build();
    let header = parse(&bytes).unwrap();
    let md = &header.metadata;
    assert_eq!(md.get("u8"), Some(&Value::U8(200)));
    assert_eq!(md.get("i8"), Some(&Value::I8(-100)));
    assert_eq!(md.get("u16"), Some(&Value::U16(60_000)));
    assert_eq!(md.get("i16"), Some(&Value::I16(-30_000)));
    assert_eq!(md.get("u32"), Some(&Value::U32(4_000_000_000)));
    assert_eq!(md.get("i32"), Some(&Value::I32(-2_000_000_000)));
    assert_eq!(md.get("f32"), Some(&Value::F32(1.5)));
    assert_eq!(md.get("bool"), Some(&Value::Bool(true)));
    assert_eq!(md.str("string").unwrap(), "héllo");
    assert_eq!(
        md.get("array"),
        Some(&Value::Array(vec![Value::U32(1), Value::U32(2)]))
    );
    assert_eq!(
        md.get("nested"),
        Some(&Value::Array(vec![
            Value::Array(vec![Value::String("a".into()), Value::String("b".into())]),
            Value::Array(vec![]),
        ]))
    );
    assert_eq!(md.get("u64"), Some(&Value::U64(u64::MAX)));
    assert_eq!(md.get("i64"), Some(&Value::I64(i64::MIN)));
    assert_eq!(md.get("f64"), Some(&Value::F64(-2.25)));
    assert_eq!(header.tensors.len(), 2);
    assert_eq!(header.tensors[1].dtype, TensorType::Q8_0);
    assert_eq!(header.tensors[1].size_bytes, 34);
    assert_eq!(header.tensors[1].offset % 32, 0);
}

#[test]
fn writer_reproduces_the_fixture_layout() {
    // Same keys, values, tensors and data offsets as the real file (the key order is the
    // parser's, so compare what the order does not change).
    let bytes = fixture_bytes();
    let original = parse(&bytes).unwrap();
    let mut copy = Gguf::new();
    for (k, v) in original.metadata.iter() {
        copy = copy.push(k, V::from_value(v));
    }
    for t in &original.tensors {
        let dims: Vec<u64> = t.dims.iter().map(|&d| d as u64).collect();
        copy = copy.tensor(
            &t.name,
            &dims,
            t.dtype.id(),
            &bytes[t.offset..t.offset + t.size_bytes],
        );
    }
    let rebuilt = copy.build();
    assert_eq!(rebuilt.len(), bytes.len());
    let reparsed = parse(&rebuilt).unwrap();
    assert_eq!(
        reparsed.metadata.iter().collect::<Vec<_>>(),
        original.metadata.iter().collect::<Vec<_>>()
    );
    for (a, b) in reparsed.tensors.iter().zip(&original.tensors) {
        assert_eq!((&a.name, &a.dims, a.dtype), (&b.name, &b.dims, b.dtype));
        assert_eq!(
            rebuilt[a.offset..a.offset + a.size_bytes],
            bytes[b.offset..b.offset + b.size_bytes]
        );
    }
}

#[test]
fn tiny_and_mini_models_load_run_and_tokenize() {
    for (what, gguf) in [("tiny", tiny_model()), ("mini", mini_fixture())] {
        let bytes = gguf.build();
        let header = parse(&bytes).unwrap();
        Tokenizer::from_gguf(&header.metadata).unwrap_or_else(|e| panic!("{what}: {e}"));
        let model = load(&bytes, None).unwrap_or_else(|e| panic!("{what}: {e}"));
        exercise_model(&model).unwrap();
    }
    // Tied embeddings: no output.weight.
    let model = load(&tiny_model().without_tensor(tn::OUTPUT).build(), None).unwrap();
    exercise_model(&model).unwrap();
}

// ---------------------------------------------------------------------------------------------
// The fixed header.

#[test]
fn empty_bad_magic_and_unknown_versions_are_rejected() {
    assert_rejected(&[], &["file ends inside magic", "truncated"]);
    assert_rejected(b"GGU", &["file ends inside magic"]);
    let mut ggml = Gguf::new();
    ggml.magic = *b"GGML";
    assert_rejected(&ggml.build(), &["bad magic"]);
    assert_rejected(&[0xff; 64], &["bad magic"]);
    for version in [0, 1, 4, u32::MAX] {
        let mut file = Gguf::new();
        file.version = version;
        assert_rejected(
            &file.build(),
            &[&format!("GGUF version {version} is not supported")],
        );
    }
    assert_rejected(b"GGUF", &["file ends inside version"]);
    assert_rejected(b"GGUF\x03\0\0\0", &["file ends inside tensor count"]);
    assert_rejected(
        b"GGUF\x03\0\0\0\0\0\0\0\0\0\0\0",
        &["file ends inside key/value count"],
    );
    // Version 2 is read like 3.
    let mut v2 = Gguf::new();
    v2.version = 2;
    assert!(parse(&v2.build()).is_ok());
}

#[test]
fn header_only_files() {
    // No keys, no tensors: a well-formed but empty file, refused by everything that reads it.
    let empty = Gguf::new().build();
    assert_eq!(empty.len(), 24);
    let header = parse(&empty).unwrap();
    assert!(header.tensors.is_empty());
    let err = Tokenizer::from_gguf(&header.metadata)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains(tk::MODEL), "{err}");
    let err = load(&empty, None).err().unwrap().to_string();
    assert!(
        err.contains("missing metadata key 'general.architecture'"),
        "{err}"
    );

    // Counts that promise what is not there.
    let mut claims = Gguf::new();
    claims.kv_count = Some(1);
    assert_rejected(&claims.build(), &["key/value count 1", "truncated"]);
    let mut claims = Gguf::new();
    claims.tensor_count = Some(1);
    assert_rejected(&claims.build(), &["tensor count 1", "truncated"]);
    // Files shorter than a header are refused before mapping.
    let path = temp_gguf();
    for len in [0, 1, 23] {
        let err = open_bytes(&empty[..len], &path).err().unwrap().to_string();
        assert!(err.contains("too short for a GGUF header"), "{err}");
    }
}

#[test]
fn absurd_counts_are_rejected_before_allocating() {
    for count in [u64::MAX, 1 << 40, MAX_TENSORS + 1] {
        let mut file = Gguf::new();
        file.tensor_count = Some(count);
        assert_rejected(
            &file.build(),
            &[&format!("tensor count {count} is over the limit")],
        );
    }
    for count in [u64::MAX, 1 << 40, MAX_KV + 1] {
        let mut file = Gguf::new();
        file.kv_count = Some(count);
        assert_rejected(
            &file.build(),
            &[&format!("key/value count {count} is over the limit")],
        );
    }
    // At the limits, but in a file that cannot hold them.
    let mut file = tiny_model();
    file.tensor_count = Some(MAX_TENSORS);
    assert_rejected(
        &file.build(),
        &[&format!("tensor count {MAX_TENSORS} needs")],
    );
    let mut file = Gguf::new();
    file.kv_count = Some(MAX_KV);
    assert_rejected(&file.build(), &[&format!("key/value count {MAX_KV} needs")]);
}

// ---------------------------------------------------------------------------------------------
// Metadata.

fn array_claiming(item_type: u32, count: u64, payload_len: usize) -> Vec<u8> {
    let mut payload = item_type.to_le_bytes().to_vec();
    payload.extend(count.to_le_bytes());
    payload.resize(payload.len() + payload_len, 0);
    Gguf::new().push("big", V::Raw(T_ARRAY, payload)).build()
}

#[test]
fn absurd_array_lengths_are_rejected_before_allocating() {
    for count in [u64::MAX, 1 << 40, 1 << 30, MAX_METADATA_ITEMS + 1] {
        for item_type in [T_U8, T_STRING, T_ARRAY, T_U64] {
            assert_rejected(
                &array_claiming(item_type, count, 64),
                &["'big'", &format!("claims {count} items"), "truncated"],
            );
        }
    }
    // 2^30 strings in a 100-byte file: refused at once, nothing allocated for them.
    let file = array_claiming(T_STRING, 1 << 30, 40);
    assert!(file.len() <= 100);
    assert_rejected(&file, &["claims 1073741824 items"]);
    // A count the file could hold but over the limit on metadata items.
    let file = array_claiming(
        T_U8,
        MAX_METADATA_ITEMS + 1,
        MAX_METADATA_ITEMS as usize + 1,
    );
    assert_rejected(&file, &["'big'", "limit of 8388608 array items"]);
    // The limit counts the items of all arrays together.
    let half = MAX_METADATA_ITEMS / 2 + 1;
    let mut payload = T_U8.to_le_bytes().to_vec();
    payload.extend(half.to_le_bytes());
    payload.resize(payload.len() + half as usize, 0);
    let file = Gguf::new()
        .push("a", V::Raw(T_ARRAY, payload.clone()))
        .push("b", V::Raw(T_ARRAY, payload))
        .build();
    let (result, _, _) = allocations(|| parse(&file));
    let err = result.err().unwrap().to_string();
    assert!(err.contains("'b'") && err.contains("array items"), "{err}");
}

#[test]
fn absurd_string_lengths_are_rejected_before_allocating() {
    for len in [u64::MAX, 1 << 40, MAX_STRING_BYTES + 1] {
        let mut key = len.to_le_bytes().to_vec();
        key.extend([b'k'; 16]);
        let mut file = Gguf::new().build();
        file[16..24].copy_from_slice(&1u64.to_le_bytes());
        file.extend(&key);
        assert_rejected(
            &file,
            &["key #0", &format!("{len} bytes long, over the limit")],
        );

        let file = Gguf::new()
            .push("str", V::Raw(T_STRING, len.to_le_bytes().to_vec()))
            .build();
        assert_rejected(&file, &["value of 'str'", "over the limit"]);

        let mut payload = T_STRING.to_le_bytes().to_vec();
        payload.extend(1u64.to_le_bytes());
        payload.extend(len.to_le_bytes());
        let file = Gguf::new().push("strs", V::Raw(T_ARRAY, payload)).build();
        assert_rejected(&file, &["value of 'strs'", "over the limit"]);

        let mut name = len.to_le_bytes().to_vec();
        name.extend([0; 40]);
        let mut file = Gguf::new().build();
        file[8..16].copy_from_slice(&1u64.to_le_bytes());
        file.extend(&name);
        assert_rejected(&file, &["name of tensor #0", "over the limit"]);
    }
    // Within the limit but past the end of the file.
    let file = Gguf::new()
        .push("str", V::Raw(T_STRING, 1000u64.to_le_bytes().to_vec()))
        .build();
    assert_rejected(
        &file,
        &["file ends inside value of 'str'", "1000 bytes needed"],
    );
}

#[test]
fn nested_arrays_deeper_than_allowed_are_rejected() {
    assert_eq!(MAX_ARRAY_DEPTH, 2);
    let two = V::Arr(T_ARRAY, vec![V::Arr(T_U8, vec![V::U8(1)])]);
    assert!(parse(&Gguf::new().push("two", two.clone()).build()).is_ok());
    let three = V::Arr(T_ARRAY, vec![two]);
    assert_rejected(
        &Gguf::new().push("deep", three).build(),
        &["'deep' nests arrays deeper than 2"],
    );
    // A chain of a million nested array headers: refused at depth 3, no recursion blow-up.
    let mut payload = Vec::new();
    for _ in 0..100_000 {
        payload.extend(T_ARRAY.to_le_bytes());
        payload.extend(1u64.to_le_bytes());
    }
    assert_rejected(
        &Gguf::new().push("chain", V::Raw(T_ARRAY, payload)).build(),
        &["'chain' nests arrays deeper"],
    );
}

#[test]
fn unknown_value_and_item_types_are_rejected() {
    for t in [13, 100, u32::MAX] {
        assert_rejected(
            &Gguf::new().push("odd", V::Raw(t, vec![0; 16])).build(),
            &[&format!("'odd' has unknown value type {t}")],
        );
        let mut payload = t.to_le_bytes().to_vec();
        payload.extend(0u64.to_le_bytes());
        assert_rejected(
            &Gguf::new().push("odd", V::Raw(T_ARRAY, payload)).build(),
            &[&format!("'odd' is an array of unknown type {t}")],
        );
    }
    assert_rejected(
        &Gguf::new().push("flag", V::Raw(7, vec![2])).build(),
        &["'flag' holds 2, which is not a bool"],
    );
}

#[test]
fn invalid_utf8_and_duplicates_are_rejected() {
    assert_rejected(
        &Gguf::new()
            .push("ok", V::U8(1))
            .push(b"bad\xff", V::U8(1))
            .build(),
        &["key #1 is not valid UTF-8"],
    );
    assert_rejected(
        &Gguf::new()
            .push("k", V::Bytes(b"\xc3\x28".to_vec()))
            .build(),
        &["value of 'k' is not valid UTF-8"],
    );
    assert_rejected(
        &Gguf::new()
            .push("k", V::Arr(T_STRING, vec![s("fine"), V::Bytes(vec![0x80])]))
            .build(),
        &["value of 'k' is not valid UTF-8"],
    );
    assert_rejected(
        &Gguf::new().tensor_info(b"t\xfe", &[1], F32, 0).build(),
        &["name of tensor #0 is not valid UTF-8"],
    );
    assert_rejected(
        &Gguf::new().push("k", V::U8(1)).push("k", V::U32(2)).build(),
        &["metadata key 'k' appears twice"],
    );
    assert_rejected(
        &Gguf::new()
            .tensor("w", &[4], F32, &[0; 16])
            .tensor_info("w", &[4], F32, 32)
            .build(),
        &["tensor 'w' appears twice"],
    );
}

#[test]
fn bad_alignment_is_rejected() {
    let with = |v: V| {
        Gguf::new()
            .push("general.alignment", v)
            .tensor("w", &[4], F32, &[0; 16])
            .build()
    };
    for (value, shown) in [
        (V::U32(0), "0"),
        (V::U32(3), "3"),
        (V::U32(4), "4"),
        (V::U32(48), "48"),
        (V::U64(1 << 40), "1099511627776"),
        (V::I32(-32), "-32"),
        (s("32"), "(a string)"),
        (V::F32(32.0), "(a f32)"),
        (V::Arr(T_U8, vec![V::U8(32); 1000]), "(a array)"),
    ] {
        assert_rejected(
            &with(value),
            &[&format!("general.alignment {shown} is not a power of two")],
        );
    }
    // A valid non-default alignment is honoured.
    let mut file = Gguf::new().push("general.alignment", V::U32(64));
    file.alignment = 64;
    let file = file
        .tensor("a", &[3], F32, &[0; 12])
        .tensor("b", &[3], F32, &[0; 12]);
    let header = parse(&file.build()).unwrap();
    assert!(header.tensors.iter().all(|t| t.offset % 64 == 0));
    // ... and an offset aligned to 32 but not 64 is then refused.
    assert_rejected(
        &Gguf::new()
            .push("general.alignment", V::U32(64))
            .tensor_info("w", &[4], F32, 32)
            .build(),
        &["tensor 'w' offset 32 is not a multiple of the alignment 64"],
    );
}

// ---------------------------------------------------------------------------------------------
// Tensor infos.

#[test]
fn bad_dimensions_are_rejected() {
    let one = |dims: &[u64], type_id: u32| Gguf::new().tensor_info("w", dims, type_id, 0).build();
    assert_rejected(&one(&[], F32), &["tensor 'w' has 0 dimensions"]);
    assert_rejected(&one(&[1; 5], F32), &["tensor 'w' has 5 dimensions"]);
    let mut claims = Gguf::new().tensor_info("w", &[1], F32, 0).header();
    let at = claims.len() - 24; // n_dims
    claims[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_rejected(&claims, &["tensor 'w' has 4294967295 dimensions"]);
    assert_eq!(MAX_DIMS, 4);
    assert_rejected(&one(&[4, 0], F32), &["tensor 'w' has a zero dimension"]);
    assert_rejected(&one(&[0], Q8_0), &["tensor 'w' has a zero dimension"]);
    for dims in [
        &[1 << 32, 1 << 32, 2][..],
        &[u64::MAX, 2],
        &[1 << 62],
        &[1 << 63],
        &[u64::MAX],
    ] {
        assert_rejected(&one(dims, F32), &["tensor 'w' dimensions", "overflow"]);
    }
    // Fits in u64 elements, overflows in bytes for a 2-byte type.
    assert_rejected(&one(&[1 << 32, 1 << 31], F16), &["overflow"]);
    // Row lengths that are no whole number of blocks.
    for (dims, type_id, block) in [
        (&[33u64, 2][..], Q4_0, "32"),
        (&[16, 1], Q8_0, "32"),
        (&[255], TensorType::Q4K.id(), "256"),
        (&[16, 16], TensorType::Q6K.id(), "256"),
    ] {
        assert_rejected(
            &one(dims, type_id),
            &["tensor 'w' row length", &format!("block size {block}")],
        );
    }
    // Sizes that fit in a u64 but not in this file.
    assert_rejected(
        &one(&[1 << 20, 1 << 20], F32),
        &["tensor 'w' (4398046511104 bytes", "past the end"],
    );
}

#[test]
fn unknown_tensor_types_are_rejected() {
    for id in [4, 5, 16, 20, 29, 31, 39, u32::MAX] {
        assert_rejected(
            &Gguf::new().tensor_info("w", &[256], id, 0).build(),
            &[&format!("tensor 'w' has quantization type {id}")],
        );
    }
}

#[test]
fn misplaced_tensor_data_is_rejected() {
    assert_rejected(
        &Gguf::new().tensor_info("w", &[4], F32, 4).build(),
        &["tensor 'w' offset 4 is not a multiple of the alignment 32"],
    );
    // Data past the end: by one byte, by an offset, by an offset that overflows.
    let mut short = Gguf::new().tensor("w", &[4], F32, &[0; 16]).build();
    short.pop();
    assert_rejected(
        &short,
        &["tensor 'w' (16 bytes at data offset 0) runs past the end"],
    );
    for offset in [32, 1 << 40, u64::MAX - 31] {
        assert_rejected(
            &Gguf::new()
                .tensor("v", &[4], F32, &[0; 16])
                .tensor_info("w", &[4], F32, offset)
                .build(),
            &[&format!(
                "tensor 'w' (16 bytes at data offset {offset}) runs past the end"
            )],
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Truncation.

/// Cuts `bytes` at each of `cuts`: below `data_end` it must fail naming a truncation (without
/// a large allocation), at or past it parse.
fn check_cuts(bytes: &[u8], cuts: impl IntoIterator<Item = usize>) -> usize {
    let end = data_end(bytes);
    let mut checked = 0;
    for cut in cuts {
        let prefix = &bytes[..cut];
        let (result, largest, _) = allocations(|| parse(prefix));
        match result {
            Ok(_) => assert!(cut >= end, "a cut at {cut} (data ends at {end}) parsed"),
            Err(e) => {
                assert!(
                    cut < end,
                    "a cut at {cut} past the data ({end}) failed: {e}"
                );
                let message = e.to_string();
                assert!(message.contains("truncated"), "cut at {cut}: {message}");
            }
        }
        // The parser's own allocations: the metadata read so far (32 bytes per array item).
        assert!(
            largest <= 32 * cut.max(1 << 15),
            "cut at {cut}: {largest} bytes at once"
        );
        checked += 1;
    }
    checked
}

#[test]
fn every_truncation_of_the_mini_model_is_rejected() {
    let file = mini_fixture();
    let header_len = file.header().len();
    let bytes = file.build();
    let end = data_end(&bytes);
    assert_eq!(end, bytes.len());
    // Every prefix up to the end of the tensor infos, and the padding after them.
    let mut checked = check_cuts(&bytes, 0..header_len + 32);
    // Cuts into the data.
    let mut rng = Rng(0x5eed_0001);
    checked += check_cuts(
        &bytes,
        (0..300).map(|_| header_len + rng.below(bytes.len() - header_len)),
    );
    checked += check_cuts(&bytes, [end - 1, end]);
    assert!(checked > header_len + 300, "{checked}");
}

#[test]
fn truncations_of_the_tiny_fixture_are_rejected() {
    // Parsing the real header takes tens of milliseconds in a debug build, so not all of its
    // 727,000 prefixes: every prefix of its first 2 KB, cuts spread over the rest of the
    // metadata, every byte of the tensor infos' tail, and cuts into the data.
    let bytes = fixture_bytes();
    let header = parse(&bytes).unwrap();
    let data_start = header.tensors.iter().map(|t| t.offset).min().unwrap();
    // The same keys and tensor infos written again take as many bytes (in another order).
    let mut same = Gguf::new();
    for (k, v) in header.metadata.iter() {
        same = same.push(k, V::from_value(v));
    }
    for t in &header.tensors {
        let dims: Vec<u64> = t.dims.iter().map(|&d| d as u64).collect();
        same = same.tensor_info(&t.name, &dims, t.dtype.id(), 0);
    }
    let infos_end = same.header().len();
    assert_eq!(infos_end.next_multiple_of(32), data_start);
    let mut checked = check_cuts(&bytes, 0..2048);
    checked += check_cuts(&bytes, (2048..infos_end).step_by((infos_end - 2048) / 40));
    checked += check_cuts(&bytes, infos_end - 24..data_start + 1);
    let mut rng = Rng(0x5eed_0002);
    checked += check_cuts(
        &bytes,
        (0..24).map(|_| data_start + rng.below(bytes.len() - data_start)),
    );
    checked += check_cuts(&bytes, [bytes.len() - 1, bytes.len()]);
    assert!(checked > 2100, "{checked}");
}

// ---------------------------------------------------------------------------------------------
// Hyper-parameters and tensors that parse but make no model.

#[test]
fn hostile_hyper_parameters_are_rejected() {
    let m = tiny_model();
    let key = |suffix: &str| hparams::key("phi3", suffix);
    let cases: Vec<(&str, V, &[&str])> = vec![
        (
            hparams::HEAD_COUNT,
            V::U32(0),
            &["phi3.attention.head_count is 0"],
        ),
        (
            hparams::HEAD_COUNT,
            V::U32(32),
            &["phi3.embedding_length = 16 is not a multiple"],
        ),
        (
            hparams::HEAD_COUNT,
            V::U32(1 << 20),
            &["phi3.attention.head_count", "over the limit"],
        ),
        (
            hparams::HEAD_COUNT_KV,
            V::U32(0),
            &["phi3.attention.head_count_kv = 0 does not divide"],
        ),
        (
            hparams::HEAD_COUNT_KV,
            V::U32(4),
            &["phi3.attention.head_count_kv = 4 does not divide"],
        ),
        (
            hparams::ROPE_DIMENSION_COUNT,
            V::U32(7),
            &["phi3.rope.dimension_count = 7 must be even"],
        ),
        (
            hparams::ROPE_DIMENSION_COUNT,
            V::U32(0),
            &["phi3.rope.dimension_count = 0"],
        ),
        (
            hparams::ROPE_DIMENSION_COUNT,
            V::U32(16),
            &["phi3.rope.dimension_count = 16"],
        ),
        (
            hparams::CONTEXT_LENGTH,
            V::U64(1 << 40),
            &["phi3.context_length", "over the limit"],
        ),
        (
            hparams::CONTEXT_LENGTH,
            V::U64(u64::MAX),
            &["phi3.context_length", "over the limit"],
        ),
        (
            hparams::CONTEXT_LENGTH,
            V::I32(-1),
            &["'phi3.context_length' should be a non-negative"],
        ),
        (
            hparams::CONTEXT_LENGTH,
            V::U32(0),
            &["phi3.context_length is 0"],
        ),
        (
            hparams::EMBEDDING_LENGTH,
            s("16"),
            &["'phi3.embedding_length' should be", "string"],
        ),
        (
            hparams::EMBEDDING_LENGTH,
            V::U64(u64::MAX),
            &["phi3.embedding_length", "over the limit"],
        ),
        (
            hparams::FEED_FORWARD_LENGTH,
            V::U64(1 << 40),
            &["phi3.feed_forward_length", "over the limit"],
        ),
        (
            hparams::BLOCK_COUNT,
            V::U32(1 << 20),
            &["phi3.block_count", "over the limit"],
        ),
        (hparams::BLOCK_COUNT, V::U32(2), &["tensor 'blk.1."]),
        (
            hparams::RMS_EPSILON,
            V::F32(0.0),
            &["phi3.attention.layer_norm_rms_epsilon = 0"],
        ),
        (
            hparams::RMS_EPSILON,
            V::F32(f32::NAN),
            &["layer_norm_rms_epsilon = NaN"],
        ),
        (
            hparams::RMS_EPSILON,
            V::F32(f32::INFINITY),
            &["layer_norm_rms_epsilon = inf"],
        ),
        (
            hparams::RMS_EPSILON,
            V::F64(-1e-5),
            &["layer_norm_rms_epsilon = -0.00001"],
        ),
        // Finite in f64, not in the f32 the model computes with.
        (
            hparams::RMS_EPSILON,
            V::F64(1e300),
            &["layer_norm_rms_epsilon", "f32"],
        ),
        (
            hparams::RMS_EPSILON,
            V::F64(1e-300),
            &["layer_norm_rms_epsilon", "f32"],
        ),
        (
            hparams::ROPE_FREQ_BASE,
            V::F64(1e40),
            &["phi3.rope.freq_base", "f32"],
        ),
        (
            hparams::ROPE_ATTN_FACTOR,
            V::F64(-1.0),
            &["phi3.rope.scaling.attn_factor"],
        ),
        (
            hparams::ROPE_ATTN_FACTOR,
            s("1"),
            &["'phi3.rope.scaling.attn_factor' should be a number"],
        ),
        (
            hparams::ROPE_ORIGINAL_CONTEXT,
            V::U64(1 << 40),
            &["original_context_length", "over the limit"],
        ),
        (
            hparams::SLIDING_WINDOW,
            V::I64(-1),
            &["'phi3.attention.sliding_window' should be"],
        ),
    ];
    for (suffix, value, needles) in cases {
        assert_load_fails(&m.clone().set(&key(suffix), value), needles);
    }
    assert_load_fails(
        &m.clone().set(names::GENERAL_ARCHITECTURE, s("llama")),
        &["general.architecture is 'llama'"],
    );
    assert_load_fails(
        &m.clone().set(names::GENERAL_ARCHITECTURE, V::U32(3)),
        &["'general.architecture' should be a string"],
    );
    for suffix in [
        hparams::CONTEXT_LENGTH,
        hparams::EMBEDDING_LENGTH,
        hparams::FEED_FORWARD_LENGTH,
        hparams::BLOCK_COUNT,
        hparams::HEAD_COUNT,
        hparams::RMS_EPSILON,
    ] {
        assert_load_fails(
            &m.clone().without(&key(suffix)),
            &[&format!("missing metadata key '{}'", key(suffix))],
        );
    }
    // Accepted oddities: a sliding window of 0 or past the context means none.
    for w in [0, 64, u64::MAX] {
        let model = load(
            &m.clone()
                .set(&key(hparams::SLIDING_WINDOW), V::U64(w))
                .build(),
            None,
        )
        .unwrap();
        assert_eq!(model.config().sliding_window, None);
        exercise_model(&model).unwrap();
    }
}

#[test]
fn huge_rope_tables_are_refused() {
    // The mini fixture's qkv matrix is 768 wide: with one head of 256 (rotated in full) it still
    // fits, and a million-position context would call for 2^27-entry cos/sin tables (1 GiB,
    // and minutes of debug-build trigonometry) from a few edited keys.
    let file = mini_fixture()
        .set("phi3.attention.head_count", V::U32(1))
        .set("phi3.attention.head_count_kv", V::U32(1))
        .set("phi3.rope.dimension_count", V::U32(256))
        .set("phi3.context_length", V::U32(1 << 20))
        .set("phi3.rope.scaling.original_context_length", V::U32(1 << 20));
    let bytes = file.build();
    let (result, largest, _) = allocations(|| load(&bytes, None));
    let err = result.err().expect("refused").to_string();
    assert!(
        err.contains("RoPE") && err.contains("context_length"),
        "{err}"
    );
    assert!(largest < 64 << 20, "{largest}");
    // The same model for a context the tables fit is fine.
    let model = load(&bytes, Some(4096)).unwrap();
    exercise_model(&model).unwrap();
}

#[test]
fn hostile_tensors_are_rejected() {
    let m = tiny_model();
    let qkv = (HEADS + 2 * HEADS) * HEAD_DIM;
    assert_load_fails(
        &m.clone().without_tensor(tn::TOKEN_EMBD),
        &["tensor 'token_embd.weight' is missing"],
    );
    assert_load_fails(
        &m.clone().without_tensor("blk.0.ffn_down.weight"),
        &["tensor 'blk.0.ffn_down.weight' is missing"],
    );
    assert_load_fails(
        &m.clone()
            .f32_tensor(tn::TOKEN_EMBD, &[E + 1, VOCAB], &values((E + 1) * VOCAB, 9)),
        &["tensor 'token_embd.weight' has shape [17, 8], expected [16, vocab]"],
    );
    assert_load_fails(
        &m.clone()
            .f32_tensor(tn::TOKEN_EMBD, &[E, VOCAB, 1], &values(E * VOCAB, 9)),
        &["tensor 'token_embd.weight' has shape [16, 8, 1]"],
    );
    assert_load_fails(
        &m.clone()
            .f32_tensor(tn::OUTPUT, &[E, VOCAB + 1], &values(E * (VOCAB + 1), 9)),
        &["tensor 'output.weight' has shape [16, 9], the hyper-parameters call for [16, 8]"],
    );
    assert_load_fails(
        &m.clone().f32_tensor(
            "blk.0.attn_qkv.weight",
            &[E, qkv - 8],
            &values(E * (qkv - 8), 9),
        ),
        &[
            "tensor 'blk.0.attn_qkv.weight' has shape [16, 40]",
            "[16, 48]",
        ],
    );
    assert_load_fails(
        &m.clone()
            .f32_tensor("blk.0.ffn_up.weight", &[E, FF], &values(E * FF, 9)),
        &[
            "tensor 'blk.0.ffn_up.weight' has shape [16, 16]",
            "[16, 32]",
        ],
    );
    assert_load_fails(
        &m.clone().f32_tensor(tn::OUTPUT_NORM, &[E - 1], &[1.0; 15]),
        &["tensor 'output_norm.weight' has shape [15]"],
    );
    // Non-finite norm weights.
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut norm = vec![1.0; E as usize];
        norm[5] = bad;
        assert_load_fails(
            &m.clone().f32_tensor("blk.0.ffn_norm.weight", &[E], &norm),
            &["tensor 'blk.0.ffn_norm.weight' holds a non-finite value at index 5"],
        );
    }
    // A norm stored quantized (with a row length its blocks divide).
    let big = tiny_model_with_embedding(32);
    assert_load_fails(
        &big.tensor(tn::OUTPUT_NORM, &[32], Q8_0, &[0; 34]),
        &["tensor 'output_norm.weight' is Q8_0; a float type"],
    );
    // Quantized matrices whose rows are no whole number of blocks: refused by the reader
    // before candle's `QStorage::from_data` could assert on them.
    let err = load(
        &m.clone()
            .tensor(tn::TOKEN_EMBD, &[E, VOCAB], Q8_0, &[0; 8 * 34])
            .build(),
        None,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("'token_embd.weight' row length 16 is not a multiple"),
        "{err}"
    );
    // A vocabulary of 2^40 rows in a small file.
    let err = load(
        &m.clone()
            .tensor(tn::TOKEN_EMBD, &[E, 1 << 40], F32, &[0; 64])
            .build(),
        None,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("'token_embd.weight'") && err.contains("past the end"),
        "{err}"
    );
}

/// `tiny_model` with another embedding width (two heads, rotated in full).
fn tiny_model_with_embedding(e: u64) -> Gguf {
    let qkv = 3 * e;
    tiny_model()
        .set("phi3.embedding_length", V::U32(e as u32))
        .set("phi3.rope.dimension_count", V::U32((e / HEADS) as u32))
        .f32_tensor(tn::TOKEN_EMBD, &[e, VOCAB], &values(e * VOCAB, 1))
        .f32_tensor(tn::OUTPUT_NORM, &[e], &vec![1.0; e as usize])
        .f32_tensor(tn::OUTPUT, &[e, VOCAB], &values(e * VOCAB, 2))
        .f32_tensor("blk.0.attn_norm.weight", &[e], &vec![1.0; e as usize])
        .f32_tensor("blk.0.attn_qkv.weight", &[e, qkv], &values(e * qkv, 3))
        .f32_tensor("blk.0.attn_output.weight", &[e, e], &values(e * e, 4))
        .f32_tensor("blk.0.ffn_norm.weight", &[e], &vec![1.0; e as usize])
        .f32_tensor("blk.0.ffn_up.weight", &[e, 2 * FF], &values(2 * e * FF, 5))
        .f32_tensor("blk.0.ffn_down.weight", &[FF, e], &values(e * FF, 6))
}

#[test]
fn rope_factors_are_checked() {
    let m = tiny_model();
    let half = HEAD_DIM / 2;
    let model = load(
        &m.clone()
            .f32_tensor(tn::ROPE_FACTORS_SHORT, &[half], &[1.0, 1.5, 2.0, 4.0])
            .build(),
        None,
    )
    .unwrap();
    exercise_model(&model).unwrap();
    assert_load_fails(
        &m.clone()
            .f32_tensor(tn::ROPE_FACTORS_SHORT, &[half + 1], &[1.0; 5]),
        &["tensor 'rope_factors_short.weight' has shape [5], the hyper-parameters call for [4]"],
    );
    assert_load_fails(
        &m.clone()
            .f32_tensor(tn::ROPE_FACTORS_SHORT, &[half, 2], &[1.0; 8]),
        &["tensor 'rope_factors_short.weight' has shape [4, 2]"],
    );
    for bad in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        assert_load_fails(
            &m.clone()
                .f32_tensor(tn::ROPE_FACTORS_SHORT, &[half], &[1.0, bad, 1.0, 1.0]),
            &["tensor 'rope_factors_short.weight'", "index 1"],
        );
    }
    // The long factors are read (and checked) only for a context past the original one.
    let long = m
        .clone()
        .set("phi3.rope.scaling.original_context_length", V::U32(16))
        .f32_tensor(tn::ROPE_FACTORS_LONG, &[half], &[1.0, 0.0, 1.0, 1.0]);
    assert!(load(&long.build(), Some(16)).is_ok());
    let err = load(&long.build(), Some(32)).err().unwrap().to_string();
    assert!(err.contains("'rope_factors_long.weight'"), "{err}");
}

#[test]
fn float_tensors_of_odd_sizes_load() {
    // F16/BF16/F32 tensors of odd lengths: the reader's sizes are whole elements and its
    // offsets aligned, so our kernels and candle's `QStorage::from_data` (which asserts both)
    // never see less.
    let half_ones: Vec<u8> = (0..3)
        .flat_map(|_| half::f16::from_f32(1.0).to_le_bytes())
        .collect();
    let bytes = Gguf::new()
        .tensor("h", &[3], F16, &half_ones)
        .tensor("b", &[3, 1], 30, &[0x80, 0x3f, 0x80, 0x3f, 0x80, 0x3f])
        .tensor("f", &[1, 3], F32, &[0; 12])
        .tensor("q", &[32, 3], Q8_0, &[0; 3 * 34])
        .build();
    let path = temp_gguf();
    let file = Arc::new(open_bytes(&bytes, &path).unwrap());
    for t in file.tensors() {
        assert_eq!(t.offset % 32, 0, "{}", t.name);
        assert_eq!(file.tensor_data(t).len(), t.size_bytes);
    }
    let w = WeightLoader::new(&file, true);
    assert_eq!(w.vector("h", 3).unwrap(), vec![1.0; 3]);
    assert!(w.matmul("b", 3, 1).is_ok());
    assert!(w.matmul("f", 1, 3).is_ok());
    assert!(w.matmul("q", 32, 3).is_ok());
    let err = w.vector("q", 32).err().unwrap().to_string();
    assert!(err.contains("tensor 'q' has shape [32, 3]"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Seeded random corruption.

#[derive(Debug, Clone)]
enum Mutation {
    Xor { at: usize, mask: u8 },
    PutU64 { at: usize, value: u64 },
    PutU32 { at: usize, value: u32 },
    Truncate { len: usize },
    Insert { at: usize, bytes: Vec<u8> },
    Remove { at: usize, len: usize },
}

/// Values that make counts, lengths, sizes and offsets interesting.
const INTERESTING: [u64; 30] = [
    0,
    1,
    2,
    3,
    4,
    7,
    8,
    13,
    31,
    32,
    33,
    255,
    256,
    4096,
    1 << 16,
    (1 << 16) + 1,
    1 << 20,
    (1 << 20) + 1,
    1 << 23,
    (1 << 23) + 1,
    (16 << 20) + 1,
    u32::MAX as u64,
    1 << 32,
    1 << 40,
    1 << 62,
    i64::MAX as u64,
    u64::MAX,
    u64::MAX - 31,
    0x7fc0_0000,           // f32 NaN
    0x7ff0_0000_0000_0000, // f64 inf
];

/// One random mutation of a `len`-byte file whose header is `header_len` bytes long, with
/// numeric fields at `fields` (may be empty).
fn random_mutation(rng: &mut Rng, len: usize, header_len: usize, fields: &[usize]) -> Mutation {
    let in_header = |rng: &mut Rng| rng.below(header_len.max(1));
    let interesting = |rng: &mut Rng| {
        if rng.below(3) == 0 {
            rng.next()
        } else {
            INTERESTING[rng.below(INTERESTING.len())]
        }
    };
    if !fields.is_empty() && rng.below(3) == 0 {
        // A numeric field of the header, set to a number near a limit or a random one.
        let at = fields[rng.below(fields.len())];
        return match rng.below(3) {
            0 => Mutation::PutU64 {
                at,
                value: interesting(rng),
            },
            1 => Mutation::PutU32 {
                at,
                value: interesting(rng) as u32,
            },
            _ => Mutation::PutU32 {
                at,
                value: rng.below(64) as u32,
            },
        };
    }
    match rng.below(20) {
        0..=7 => Mutation::Xor {
            at: in_header(rng),
            mask: match rng.below(3) {
                0 => 1 << rng.below(8),
                _ => rng.below(255) as u8 + 1,
            },
        },
        8..=12 => {
            let at = if rng.below(4) == 0 {
                rng.below(len.max(8) - 7)
            } else {
                in_header(rng).min(len.saturating_sub(8))
            };
            Mutation::PutU64 {
                at,
                value: interesting(rng),
            }
        }
        13..=14 => Mutation::Truncate {
            len: if rng.below(2) == 0 {
                in_header(rng)
            } else {
                rng.below(len + 1)
            },
        },
        15..=16 => Mutation::Insert {
            at: in_header(rng),
            bytes: (0..1 + rng.below(16)).map(|_| rng.next() as u8).collect(),
        },
        17 => Mutation::Remove {
            at: in_header(rng),
            len: 1 + rng.below(16),
        },
        _ => Mutation::Xor {
            at: rng.below(len.max(1)),
            mask: rng.below(255) as u8 + 1,
        },
    }
}

fn apply(bytes: &mut Vec<u8>, mutation: &Mutation) {
    match *mutation {
        Mutation::Xor { at, mask } => {
            if let Some(b) = bytes.get_mut(at) {
                *b ^= mask;
            }
        }
        Mutation::PutU64 { at, value } => {
            if at + 8 <= bytes.len() {
                bytes[at..at + 8].copy_from_slice(&value.to_le_bytes());
            }
        }
        Mutation::PutU32 { at, value } => {
            if at + 4 <= bytes.len() {
                bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
            }
        }
        Mutation::Truncate { len } => bytes.truncate(len),
        Mutation::Insert {
            at,
            bytes: ref inserted,
        } => {
            let at = at.min(bytes.len());
            bytes.splice(at..at, inserted.iter().copied());
        }
        Mutation::Remove { at, len } => {
            let at = at.min(bytes.len());
            let end = (at + len).min(bytes.len());
            bytes.drain(at..end);
        }
    }
}

#[derive(Default, Debug)]
struct FuzzStats {
    cases: usize,
    parsed: usize,
    tokenizers: usize,
    loaded: usize,
    ran: usize,
}

/// One corrupted file through everything that reads a GGUF file. Errors are fine; panics are
/// caught by the caller.
fn run_case(bytes: &[u8], path: &Path, stats: &mut FuzzStats) {
    let (parsed, largest, _) = allocations(|| parse(bytes));
    // Every array item is at least one byte of the file and a `Value` in memory.
    assert!(
        largest <= std::mem::size_of::<Value>() * bytes.len() + (1 << 20),
        "parsing {} bytes allocated {largest} at once",
        bytes.len()
    );
    let Ok(header) = parsed else { return };
    stats.parsed += 1;
    if let Ok(tokenizer) = Tokenizer::from_gguf(&header.metadata) {
        stats.tokenizers += 1;
        let ids = tokenizer
            .encode(
                "<|user|>\nWrite a haiku about ice, hockey! <s>\u{e9}\u{1F3D2}",
                true,
                true,
            )
            .unwrap_or_default();
        let _ = tokenizer.decode(&ids, false);
        let _ = tokenizer.decode(&[0, 1, 2, u32::MAX], true);
    }
    let file = open_bytes(bytes, path).expect("a file that parses in memory opens");
    if let Ok(model) = Phi3Model::load(&Arc::new(file), None) {
        stats.loaded += 1;
        if exercise_model(&model).is_ok() {
            stats.ran += 1;
        }
    }
}

/// `cases` seeded corruptions of `base`; returns the statistics, panics with every seed and
/// mutation list that panicked.
fn fuzz(
    base: &[u8],
    header_len: usize,
    fields: &[usize],
    first_seed: u64,
    cases: usize,
) -> FuzzStats {
    let path = temp_gguf();
    let mut stats = FuzzStats::default();
    let mut failures = Vec::new();
    for seed in first_seed..first_seed + cases as u64 {
        let mut rng = Rng(seed);
        let mutations: Vec<Mutation> = (0..1 + rng.below(3))
            .map(|_| random_mutation(&mut rng, base.len(), header_len, fields))
            .collect();
        let mut bytes = base.to_vec();
        for m in &mutations {
            apply(&mut bytes, m);
        }
        stats.cases += 1;
        if let Err(payload) = catch_unwind(AssertUnwindSafe(|| run_case(&bytes, &path, &mut stats)))
        {
            failures.push(format!(
                "seed {seed}: {mutations:?}: {}",
                panic_message(payload.as_ref())
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {cases} corrupted files panicked:\n{}",
        failures.len(),
        failures.join("\n")
    );
    stats
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Thousands of seeded corruptions of the (cut-vocabulary) tiny model: parse, tokenizer, load,
/// two forward steps. `PHI3_FUZZ_SEED` and `PHI3_FUZZ_CASES` change the run.
#[test]
fn fuzz_corrupted_mini_models() {
    let file = mini_fixture();
    let (header, fields) = file.header_and_fields();
    let base = file.build();
    let seed = env_or("PHI3_FUZZ_SEED", 1);
    let cases = env_or("PHI3_FUZZ_CASES", 3000) as usize;
    let stats = fuzz(&base, header.len(), &fields, seed, cases);
    eprintln!("mini model fuzz: {stats:?}");
    // The corruptions reach every stage.
    assert!(stats.parsed > cases / 10, "{stats:?}");
    assert!(stats.tokenizers > cases / 20, "{stats:?}");
    assert!(stats.loaded > cases / 20, "{stats:?}");
}

/// A few corruptions of the real tiny fixture (32,064-token vocabulary), which takes about
/// 100 ms per file in a debug build.
#[test]
fn fuzz_corrupted_tiny_fixture() {
    let bytes = fixture_bytes();
    let header = parse(&bytes).unwrap();
    let data_start = header.tensors.iter().map(|t| t.offset).min().unwrap();
    let cases = env_or("PHI3_FUZZ_FIXTURE_CASES", 24) as usize;
    let stats = fuzz(
        &bytes,
        data_start,
        &[],
        env_or("PHI3_FUZZ_SEED", 1) << 32,
        cases,
    );
    eprintln!("tiny fixture fuzz: {stats:?}");
}

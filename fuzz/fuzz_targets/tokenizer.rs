//! Text and token ids through the two kinds of GGUF tokenizer (SentencePiece and byte-level
//! BPE), from the shared fixtures' vocabularies.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use phi3::fuzzing::FuzzTokenizer;

fn tokenizers() -> &'static [FuzzTokenizer] {
    static TOKENIZERS: OnceLock<Vec<FuzzTokenizer>> = OnceLock::new();
    TOKENIZERS.get_or_init(|| {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures");
        ["phi3-vocab.gguf", "gpt2-vocab.gguf"]
            .iter()
            .map(|f| FuzzTokenizer::open(&fixtures.join(f)).expect("a fixture vocabulary"))
            .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let ids: Vec<u32> = data
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) % 250_000)
        .collect();
    for tokenizer in tokenizers() {
        tokenizer.round_trip(&text, &ids);
    }
});

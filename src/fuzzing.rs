//! Entry points for the fuzz targets (`fuzz/`), compiled only with the `fuzzing` feature. Each
//! takes what a hostile file, vocabulary or template may hold; an error is a fine answer, a
//! panic or an abort is a bug.

use std::path::Path;
use std::sync::Arc;

use crate::chat_template::{ChatTemplate, Message};
use crate::engine::{Engine, EngineOptions, Prompt};
use crate::error::Result;
use crate::generate::GenerationParams;
use crate::gguf::GgufFile;
use crate::tokenizer::{DecodeStream, Tokenizer};

/// Loads the GGUF file at `path` as a model and, if that works, renders a chat, tokenizes it
/// and runs two tokens through the model.
pub fn load_and_run(path: &Path) -> Result<()> {
    let options = EngineOptions {
        threads: Some(1),
        ..EngineOptions::default()
    };
    let engine = Engine::load(path, &options)?;
    let prompt = Prompt::Messages(vec![Message::new("user", "Write a haiku about snow")]);
    let params = GenerationParams {
        max_tokens: 2,
        ..GenerationParams::default()
    };
    let mut generation = engine.generate(&prompt, params)?;
    for _ in 0..4 {
        generation.step()?;
    }
    Ok(())
}

/// A tokenizer read from a GGUF file's metadata (the vocabularies the targets fix once).
pub struct FuzzTokenizer(Arc<Tokenizer>);

impl FuzzTokenizer {
    pub fn open(path: &Path) -> Result<Self> {
        let file = GgufFile::open(path)?;
        Ok(Self(Arc::new(Tokenizer::from_gguf(file.metadata())?)))
    }

    /// Encodes `text` both ways (special tokens recognised or not) and decodes the ids, whole
    /// and streamed; then decodes `ids` as given (ids out of the vocabulary included).
    pub fn round_trip(&self, text: &str, ids: &[u32]) {
        for special in [false, true] {
            if let Ok(encoded) = self.0.encode(text, true, special) {
                let _ = self.0.decode(&encoded, false);
                let mut stream = DecodeStream::new(self.0.clone(), true);
                for &id in &encoded {
                    let _ = stream.push(id);
                }
                let _ = stream.finish();
            }
        }
        let _ = self.0.decode(ids, true);
        let mut stream = DecodeStream::new(self.0.clone(), false);
        for &id in ids {
            let _ = stream.push(id);
        }
    }
}

/// Compiles `source` as a chat template and renders `messages` with it.
pub fn render_template(source: &str, messages: &[(String, String)]) -> Result<String> {
    let template = ChatTemplate::new(source, "<s>", "</s>")?;
    let messages: Vec<Message> = messages
        .iter()
        .map(|(role, content)| Message::new(role.as_str(), content.as_str()))
        .collect();
    template.render(&messages, true)
}

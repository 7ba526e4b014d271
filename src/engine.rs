//! A loaded model: weights, tokenizer, chat template and the thread pool its work runs on.
//! Immutable once built, so one `Engine` serves any number of concurrent generations.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::chat_template::{ChatTemplate, Message};
use crate::constraint::Grammars;
use crate::error::{Error, Result};
use crate::generate::conversation::Conversation;
use crate::generate::prefix_pool::DEFAULT_CACHE_BYTES;
use crate::generate::runtime::Runtime;
use crate::generate::scheduler::DEFAULT_MAX_BATCH;
use crate::generate::{Generation, GenerationParams, PrefixPool, Scheduler, StreamHandle};
use crate::gguf::names;
use crate::gguf::{GgufFile, Value};
use crate::model::kv_cache::KvType;
use crate::model::{Phi3Model, Runner};
use crate::tokenizer::Tokenizer;

/// Most worker threads a caller may ask for.
pub const MAX_THREADS: usize = 1024;

#[derive(Debug, Clone, Default)]
pub struct EngineOptions {
    /// A `tokenizer.json` to use instead of the GGUF file's own vocabulary.
    pub tokenizer: Option<PathBuf>,
    /// Worker threads (default: the cores this process may run on).
    pub threads: Option<usize>,
    /// Context length in use (default: the model's original training context).
    pub context_length: Option<usize>,
    /// Bound of the prefix pool, which keeps finished generations' KV caches for later
    /// prompts that start the same way (default [`DEFAULT_CACHE_BYTES`]; 0 turns it off).
    pub cache_bytes: Option<usize>,
    /// Streams that share one forward pass (default [`DEFAULT_MAX_BATCH`]); more wait.
    pub max_batch: Option<usize>,
    /// How KV caches store keys and values (default f16).
    pub kv_cache: KvType,
    /// Leave the weights in the file's memory map, not repacked for the kernels (default:
    /// repacked where that is faster).
    pub mapped_weights: bool,
}

/// What a generation starts from.
#[derive(Debug, Clone)]
pub enum Prompt {
    /// One user message, rendered through the chat template.
    Text(String),
    /// A conversation, rendered through the chat template.
    Messages(Vec<Message>),
    /// Token ids, used as they are.
    Ids(Vec<u32>),
    /// Text tokenized as it is: BOS added, special tokens recognised.
    Raw(String),
}

pub struct Engine {
    path: PathBuf,
    runtime: Arc<Runtime>,
    template: ChatTemplate,
    /// The GGUF key/values that are not arrays, for callers to inspect.
    metadata: Vec<(String, Value)>,
    scheduler: Scheduler,
}

impl Engine {
    pub fn load(path: &Path, options: &EngineOptions) -> Result<Self> {
        let threads = match options.threads {
            Some(0) => return Err(Error::invalid_argument("threads must be at least 1")),
            Some(n) if n > MAX_THREADS => {
                return Err(Error::invalid_argument(format!(
                    "threads must be at most {MAX_THREADS}, got {n}"
                )))
            }
            Some(n) => n,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("phi3-worker-{i}"))
            .build()
            .map_err(|e| Error::invalid_argument(format!("threads: {e}")))?;

        let file = Arc::new(GgufFile::open(path)?);
        let md = file.metadata();
        let tokenizer = match &options.tokenizer {
            Some(json) => Tokenizer::from_tokenizer_json(json)?,
            None => Tokenizer::from_gguf(md)?,
        };
        let token_text = |id: Option<u32>| {
            id.and_then(|id| tokenizer.id_to_token(id))
                .unwrap_or_default()
                .to_string()
        };
        let (bos, eos) = (
            token_text(tokenizer.bos_id()),
            token_text(tokenizer.eos_id()),
        );
        let template = match md.optional_str(names::tokenizer::CHAT_TEMPLATE)? {
            Some(source) => ChatTemplate::new(source, &bos, &eos)?,
            None => ChatTemplate::phi3_default(&bos, &eos),
        };
        // Matrices the kernels run faster on interleaved (Q4_K, Q6_K at avx512vnni) are copied
        // so at load; the rest stay in the file's memory map, faulted in by the first prompt: a plain
        // copy (on huge pages) measured no faster per token on Phi-3-mini, and populating the
        // map, here or on a thread of its own, no faster to the first token. Loaded on the
        // calling thread, so what is copied (norms, RoPE tables, weights of types without a
        // kernel of ours) lives in its malloc arena, which `ReleaseMemoryOnDrop` trims when the
        // model goes (the repacked matrices are maps of their own, returned when dropped).
        let model = Phi3Model::load_with(&file, options.context_length, !options.mapped_weights)?
            .with_kv_type(options.kv_cache)?;
        if tokenizer.vocab_size() > model.vocab_size() {
            return Err(Error::unsupported(format!(
                "the tokenizer has {} tokens but '{}' only {} rows",
                tokenizer.vocab_size(),
                names::tensors::TOKEN_EMBD,
                model.vocab_size()
            )));
        }
        let metadata = md
            .iter()
            .filter(|(_, v)| !matches!(v, Value::Array(_)))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let runtime = Runtime::new(
            Runner::new(model, pool),
            Arc::new(tokenizer),
            options.cache_bytes.unwrap_or(DEFAULT_CACHE_BYTES),
        );
        Ok(Self {
            path: path.to_path_buf(),
            runtime: Arc::new(runtime),
            template,
            metadata,
            scheduler: Scheduler::new(options.max_batch.unwrap_or(DEFAULT_MAX_BATCH))?,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn model(&self) -> &Phi3Model {
        self.runtime.runner.model()
    }

    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.runtime.tokenizer
    }

    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }

    pub fn context_length(&self) -> usize {
        self.runtime.runner.context_length()
    }

    pub fn vocab_size(&self) -> usize {
        self.runtime.runner.vocab_size()
    }

    pub fn prefix_pool(&self) -> &PrefixPool {
        &self.runtime.prefix_pool
    }

    /// Compiles and keeps the constraints of structured output.
    pub fn grammars(&self) -> &Grammars {
        &self.runtime.grammars
    }

    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }

    /// Runs `generation` on the scheduler, batched with the other streams of this engine.
    pub fn submit(&self, generation: Generation) -> StreamHandle {
        self.scheduler.submit(generation)
    }

    pub fn threads(&self) -> usize {
        self.runtime.runner.threads()
    }

    pub fn apply_chat_template(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String> {
        self.template.render(messages, add_generation_prompt)
    }

    pub fn tokenize(&self, text: &str, add_bos: bool, special: bool) -> Result<Vec<u32>> {
        self.tokenizer().encode(text, add_bos, special)
    }

    /// The text of `ids`, as `tokenize` would have read it: a leading BOS (which tokenize adds)
    /// and SentencePiece's leading space are not part of it.
    pub fn detokenize(&self, ids: &[u32]) -> Result<String> {
        self.runtime.runner.check_token_ids("ids", ids)?;
        let tokenizer = self.tokenizer();
        let ids = match (ids.first(), tokenizer.bos_id()) {
            (Some(first), Some(bos)) if *first == bos => &ids[1..],
            _ => ids,
        };
        let text = tokenizer.decode(ids, false)?;
        Ok(match text.strip_prefix(' ') {
            Some(rest) if tokenizer.strips_leading_space() => rest.to_string(),
            _ => text,
        })
    }

    /// The prompt's token ids, with exactly one BOS where the model wants one. Ids given as
    /// they are are checked where a generation starts from them.
    pub fn encode_prompt(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        let add_bos = self.tokenizer().add_bos_default();
        let ids = match prompt {
            Prompt::Ids(ids) => ids.clone(),
            Prompt::Raw(text) => self.tokenizer().encode(text, add_bos, true)?,
            Prompt::Text(text) => {
                let message = Message {
                    role: "user".into(),
                    content: text.clone(),
                };
                self.encode_chat(&[message], add_bos)?
            }
            Prompt::Messages(messages) => self.encode_chat(messages, add_bos)?,
        };
        if ids.is_empty() {
            return Err(Error::invalid_argument("prompt: it encodes to no tokens"));
        }
        Ok(ids)
    }

    fn encode_chat(&self, messages: &[Message], add_bos: bool) -> Result<Vec<u32>> {
        let text = self.template.render(messages, true)?;
        let mut ids = self.tokenizer().encode(&text, add_bos, true)?;
        // Templates that print the BOS themselves would give two.
        if let Some(bos) = self.tokenizer().bos_id() {
            if ids.len() >= 2 && ids[0] == bos && ids[1] == bos {
                ids.remove(0);
            }
        }
        Ok(ids)
    }

    pub fn generate(&self, prompt: &Prompt, params: GenerationParams) -> Result<Generation> {
        // Arguments first (Generation::new checks them again, cheaply): no tokenizing for a
        // call that is going to fail.
        params.validate()?;
        let ids = self.encode_prompt(prompt)?;
        Generation::new(self.runtime.clone(), ids, params, None, None)
    }

    /// Appends the user message `text` to `conversation` and starts generating the answer.
    pub fn turn(
        &self,
        conversation: &Arc<Conversation>,
        text: &str,
        params: GenerationParams,
    ) -> Result<Generation> {
        conversation.turn(&self.runtime, text, params, |messages| {
            self.encode_prompt(&Prompt::Messages(messages.to_vec()))
        })
    }
}

//! Structured output: a JSON schema, a regular expression or a Lark grammar that the generated
//! text must match, enforced token by token with llguidance over phi3's own tokenizer.
//!
//! Constraints are untrusted input, as chat templates are. Before llguidance sees one it is
//! bounded in size and nesting (the compilers recurse); compiling runs on a thread with a stack
//! of its own and under llguidance's fuel limits ([`limits`]); a panic inside becomes an error.
//! Each generation gets a [`ConstraintState`]; compiled grammars are kept per engine (a few,
//! most recently used), since a server sees the same schema request after request.

mod tok_env;
mod watchdog;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::Duration;

use llguidance::api::{ParserLimits, TopLevelGrammar};
use llguidance::{CancellationHandle, Matcher, ParserFactory, TokenParser};
use toktrie::{InferenceCapabilities, SimpleVob};

use crate::error::{panic_message, Error, Result};
use crate::tokenizer::Tokenizer;
use tok_env::GuidanceTokenizer;

/// The longest constraint accepted, in bytes of its text (a schema as JSON).
pub const MAX_CONSTRAINT_BYTES: usize = 1 << 20;
/// The deepest nesting of brackets (JSON arrays and objects; a regex's or grammar's groups).
pub const MAX_NESTING: usize = 100;
/// Whitespace between JSON tokens, unless the schema's own `x-guidance` options say otherwise:
/// one space, or a line break and up to 20 spaces or tabs (llama.cpp's JSON grammar allows the
/// same). Unbounded runs would let a model spin on blank lines until `max_tokens`.
pub const JSON_WHITESPACE: &str = r"(?: |\n[ \t]{0,20})";
/// Compiled grammars kept per engine.
const COMPILED_KEPT: usize = 16;
/// The compile thread's stack: llguidance's compilers recurse over the schema or grammar.
const COMPILE_STACK_BYTES: usize = 256 << 20;
/// The longest a constraint may take to compile (its first mask included).
pub const COMPILE_TIME_LIMIT: Duration = Duration::from_secs(2);
/// The longest one step may take: a token's mask, or moving past a token. A mask takes about a
/// millisecond on a 32k vocabulary; a step over the limit ends its stream with an error, so a
/// hostile constraint cannot stall the batch it shares.
pub const STEP_TIME_LIMIT: Duration = Duration::from_millis(200);
/// Compiles running at once, those past their time limit included (they finish in the
/// background, bounded by llguidance's fuel); more are refused rather than queued.
const MAX_COMPILES: usize = 4;
static COMPILES: AtomicUsize = AtomicUsize::new(0);

/// What the generated text must match.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Constraint {
    /// A JSON schema, as JSON text.
    JsonSchema(String),
    /// A regular expression (Rust `regex` syntax) the whole answer matches.
    Regex(String),
    /// A grammar in llguidance's Lark syntax.
    Lark(String),
}

impl Constraint {
    /// Any JSON object.
    pub fn json_object() -> Self {
        Self::JsonSchema(r#"{"type":"object"}"#.to_string())
    }

    fn kind(&self) -> &'static str {
        match self {
            Self::JsonSchema(_) => "json_schema",
            Self::Regex(_) => "regex",
            Self::Lark(_) => "grammar",
        }
    }

    fn text(&self) -> &str {
        match self {
            Self::JsonSchema(t) | Self::Regex(t) | Self::Lark(t) => t,
        }
    }

    /// Size and nesting checks, then llguidance's form of it.
    fn grammar(&self) -> Result<TopLevelGrammar> {
        let kind = self.kind();
        let text = self.text();
        if text.len() > MAX_CONSTRAINT_BYTES {
            return Err(Error::Grammar(format!(
                "{kind} is {} bytes, over the limit of {MAX_CONSTRAINT_BYTES}",
                text.len()
            )));
        }
        let depth = nesting(text);
        if depth > MAX_NESTING {
            return Err(Error::Grammar(format!(
                "{kind} nests {depth} levels deep, over the limit of {MAX_NESTING}"
            )));
        }
        Ok(match self {
            Self::JsonSchema(text) => {
                let mut schema: serde_json::Value = serde_json::from_str(text)
                    .map_err(|e| Error::Grammar(format!("json_schema is not valid JSON: {e}")))?;
                if let Some(object) = schema.as_object_mut() {
                    object.entry("x-guidance").or_insert_with(
                        || serde_json::json!({ "whitespace_pattern": JSON_WHITESPACE }),
                    );
                }
                if !(schema.is_object() || schema.is_boolean()) {
                    return Err(Error::Grammar(
                        "json_schema must be a JSON object (or true)".into(),
                    ));
                }
                TopLevelGrammar::from_json_schema(schema)
            }
            Self::Regex(rx) => TopLevelGrammar::from_regex(rx),
            Self::Lark(lark) => TopLevelGrammar::from_lark(lark.clone()),
        })
    }
}

/// The deepest nesting of `(`, `[` and `{` in `text`, escapes and quotes not considered: an
/// upper bound on how deep any of llguidance's parsers will recurse.
fn nesting(text: &str) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    for b in text.bytes() {
        match b {
            b'(' | b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b')' | b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// llguidance's limits, the defaults tightened where they bound memory rather than time.
/// Compile: 1M units of lexer fuel (about 20 ms), 100k grammar symbols, 50k lexer states;
/// per token: 200k units of lexer fuel (about 15 ms) and 50k Earley items (about 3 ms).
pub fn limits() -> ParserLimits {
    ParserLimits {
        max_items_in_row: 2_000,
        initial_lexer_fuel: 1_000_000,
        step_lexer_fuel: 200_000,
        step_max_items: 50_000,
        max_lexer_states: 50_000,
        max_grammar_size: 100_000,
        precompute_large_lexemes: true,
        verbose_errors: false,
    }
}

/// Compiles constraints for one tokenizer; the trie and llguidance's factory are built on the
/// first constraint, since most engines never see one.
pub struct Grammars {
    tokenizer: Arc<Tokenizer>,
    factory: OnceLock<std::result::Result<Arc<ParserFactory>, String>>,
    /// Most recently used last.
    compiled: Mutex<VecDeque<(Constraint, TokenParser)>>,
}

impl Grammars {
    pub fn new(tokenizer: Arc<Tokenizer>) -> Self {
        Self {
            tokenizer,
            factory: OnceLock::new(),
            compiled: Mutex::new(VecDeque::new()),
        }
    }

    fn factory(&self) -> Result<Arc<ParserFactory>> {
        self.factory
            .get_or_init(|| {
                let end = self
                    .tokenizer
                    .eos_id()
                    .or_else(|| self.tokenizer.stop_ids().first().copied())
                    .ok_or("the vocabulary has no end-of-text token to end a constraint")?;
                let env = GuidanceTokenizer::new(self.tokenizer.clone(), end);
                let mut factory = ParserFactory::new_simple(&(Arc::new(env) as toktrie::TokEnv))
                    .map_err(|e| e.to_string())?;
                factory.quiet();
                *factory.limits_mut() = limits();
                Ok(Arc::new(factory))
            })
            .clone()
            .map_err(Error::Grammar)
    }

    /// A fresh state for one generation under `constraint`; every error is
    /// [`Error::Grammar`], before any token.
    pub fn start(&self, constraint: &Constraint) -> Result<ConstraintState> {
        let parser = match self.cached(constraint) {
            Some(parser) => parser,
            None => {
                let parser = self.compile(constraint)?;
                let mut compiled = self.compiled.lock().unwrap_or_else(|e| e.into_inner());
                if compiled.len() >= COMPILED_KEPT {
                    compiled.pop_front();
                }
                compiled.push_back((constraint.clone(), parser.deep_clone()));
                parser
            }
        };
        Ok(ConstraintState::new(
            parser,
            self.tokenizer.stop_ids(),
            self.tokenizer.vocab_size(),
        ))
    }

    fn cached(&self, constraint: &Constraint) -> Option<TokenParser> {
        let mut compiled = self.compiled.lock().unwrap_or_else(|e| e.into_inner());
        let at = compiled.iter().position(|(c, _)| c == constraint)?;
        let entry = compiled.remove(at)?;
        let parser = entry.1.deep_clone();
        compiled.push_back(entry);
        Some(parser)
    }

    /// Compiles on a thread of its own (a deep stack, a panic caught at the join), waiting
    /// at most [`COMPILE_TIME_LIMIT`].
    fn compile(&self, constraint: &Constraint) -> Result<TokenParser> {
        let grammar = constraint.grammar()?;
        let factory = self.factory()?;
        let kind = constraint.kind();
        let limit_error = || {
            Error::Grammar(format!(
                "{kind} took longer than {} s to compile",
                COMPILE_TIME_LIMIT.as_secs_f32()
            ))
        };
        if COMPILES.fetch_add(1, Ordering::SeqCst) >= MAX_COMPILES {
            COMPILES.fetch_sub(1, Ordering::SeqCst);
            return Err(Error::Grammar(format!(
                "{kind}: {MAX_COMPILES} constraints are compiling already; try again later"
            )));
        }
        let (sender, receiver) = mpsc::channel();
        let work = move || {
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                compile_and_probe(&factory, grammar, kind)
            }))
            .unwrap_or_else(|panic| {
                Err(Error::Grammar(format!(
                    "{kind} could not be compiled: {}",
                    panic_message(&*panic)
                )))
            });
            COMPILES.fetch_sub(1, Ordering::SeqCst);
            // The caller may have stopped waiting.
            let _ = sender.send(outcome);
        };
        if let Err(e) = std::thread::Builder::new()
            .name("phi3-grammar".into())
            .stack_size(COMPILE_STACK_BYTES)
            .spawn(work)
        {
            COMPILES.fetch_sub(1, Ordering::SeqCst);
            return Err(Error::Internal(format!(
                "cannot start the grammar compiler: {e}"
            )));
        }
        match receiver.recv_timeout(COMPILE_TIME_LIMIT) {
            Ok(outcome) => outcome,
            Err(_) => Err(limit_error()),
        }
    }
}

fn compile_and_probe(
    factory: &ParserFactory,
    grammar: TopLevelGrammar,
    kind: &str,
) -> Result<TokenParser> {
    let parser = factory
        .create_parser_from_init_ext(
            llguidance::api::GrammarInit::Serialized(grammar),
            llguidance::Logger::new(0, 0),
            InferenceCapabilities::default(),
            limits(),
        )
        .map_err(|e| Error::Grammar(format!("{kind}: {}", llguidance_message(&e.to_string()))))?;
    // The first mask proves the constraint can produce something, and makes a lexer that
    // blows its budget fail here rather than at the first token.
    let mut probe = ConstraintState::new(parser.deep_clone(), Vec::new(), usize::MAX);
    let mask = probe.mask().map_err(|e| match e {
        Error::Grammar(message) => Error::Grammar(format!("{kind}: {message}")),
        other => other,
    })?;
    if mask.bits.is_zero() && !mask.accepting {
        return Err(Error::Grammar(format!("{kind} accepts no text")));
    }
    Ok(parser)
}

/// One generation's progress through its constraint.
pub struct ConstraintState {
    matcher: Matcher,
    cancel: CancellationHandle,
    /// The tokenizer's stop tokens: allowed exactly when the constraint is complete.
    ends: Vec<u32>,
    /// Ids from here on (the model's padding rows) are never allowed.
    vocab: usize,
}

impl ConstraintState {
    fn new(parser: TokenParser, ends: Vec<u32>, vocab: usize) -> Self {
        Self::new_from(Matcher::new(Ok(parser)), ends, vocab)
    }

    fn new_from(matcher: Matcher, ends: Vec<u32>, vocab: usize) -> Self {
        let matcher = matcher.into_cancellable();
        let cancel = matcher.cancellation_handle().unwrap_or_default();
        Self {
            matcher,
            cancel,
            ends,
            vocab,
        }
    }

    /// One step of llguidance's work, under [`STEP_TIME_LIMIT`].
    fn step<T, E: std::fmt::Display>(
        &mut self,
        work: impl FnOnce(&mut Matcher) -> std::result::Result<T, E>,
    ) -> Result<T> {
        let matcher = &mut self.matcher;
        watchdog::within(&self.cancel, STEP_TIME_LIMIT, || work(matcher)).map_err(|e| {
            if self.cancel.is_cancelled() {
                Error::Grammar(format!(
                    "a step took longer than {} ms",
                    STEP_TIME_LIMIT.as_millis()
                ))
            } else {
                Error::Grammar(llguidance_message(&e.to_string()))
            }
        })
    }

    /// Whether `id` may come next, without the cost of a whole mask.
    pub fn allows(&mut self, id: u32) -> Result<bool> {
        if self.ends.contains(&id) {
            return self.step(|m| m.is_accepting());
        }
        if id as usize >= self.vocab {
            return Ok(false);
        }
        Ok(self.step(|m| m.validate_tokens(&[id]))? == 1)
    }

    /// Every token that may come next.
    pub fn mask(&mut self) -> Result<Mask> {
        let (bits, accepting) = self.step(|m| {
            m.compute_mask()
                .and_then(|bits| Ok((bits, m.is_accepting()?)))
        })?;
        Ok(Mask {
            bits,
            accepting,
            ends: self.ends.clone(),
            vocab: self.vocab,
        })
    }

    /// `id` was sampled: the constraint moves past it. A stop token ends the text.
    pub fn advance(&mut self, id: u32) -> Result<()> {
        if self.ends.contains(&id) {
            return Ok(());
        }
        self.step(|m| m.consume_token(id))
    }

    /// Nothing more can follow: the generation ends here.
    pub fn is_complete(&self) -> bool {
        self.matcher.is_stopped()
    }

    /// An independent copy, for tests that look ahead.
    #[cfg(test)]
    fn fork(&self) -> Self {
        Self::new_from(self.matcher.deep_clone(), self.ends.clone(), self.vocab)
    }
}

/// llguidance's error text, less its marker for the details it was told to leave out, and
/// with its name for "no token can follow" said in words.
fn llguidance_message(message: &str) -> String {
    let message = message.replace("<non-verbose/>", "");
    let message = message.trim();
    if message == "NoExtensionBias" {
        return "no text can be generated from here (nothing the constraint allows follows)".into();
    }
    message.to_string()
}

/// The tokens allowed at one step.
pub struct Mask {
    bits: SimpleVob,
    accepting: bool,
    ends: Vec<u32>,
    vocab: usize,
}

impl Mask {
    pub fn allows(&self, id: u32) -> bool {
        if self.ends.contains(&id) {
            return self.accepting;
        }
        (id as usize) < self.vocab && self.bits.is_allowed(id)
    }
}

#[cfg(test)]
mod tests;

//! The engine's one error type. Each variant maps to one Python exception class
//! (see `python/errors.rs`), and every message names the key, tensor, argument or limit at fault.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no such file: {}", .0.display())]
    FileNotFound(PathBuf),

    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The file is not a well-formed GGUF file (truncated, corrupt, over a limit).
    #[error("invalid GGUF file: {message}")]
    InvalidGguf {
        message: String,
        at: Option<Culprit>,
    },

    /// A well-formed GGUF file that is not a model phi3 can run.
    #[error("unsupported model: {message}")]
    UnsupportedModel {
        message: String,
        at: Option<Culprit>,
    },

    #[error("tokenizer error: {0}")]
    Tokenizer(String),

    #[error("chat template error: {0}")]
    ChatTemplate(String),

    #[error("the prompt has {prompt_tokens} tokens but the context holds {context_length}")]
    ContextOverflow {
        prompt_tokens: usize,
        context_length: usize,
    },

    /// A caller's argument out of its domain; the message starts with the argument's name.
    #[error("{0}")]
    InvalidArgument(String),

    /// A JSON schema, regular expression or grammar that is invalid, unsupported, over a limit,
    /// or that ran out of its budget while generating.
    #[error("constraint error: {0}")]
    Grammar(String),

    #[error("download failed: {0}")]
    Hub(String),

    #[error("model computation failed: {0}")]
    Compute(#[from] candle_core::Error),

    /// A bug in phi3 (a caught panic, a broken invariant): the call fails, the process goes on.
    #[error("internal error: {0}")]
    Internal(String),
}

/// The part of a model file at fault, where one is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Culprit {
    /// A metadata key.
    Key(String),
    /// A tensor, by name.
    Tensor(String),
}

/// What a caught panic says.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown cause".to_string())
}

impl Error {
    pub fn invalid_gguf(msg: impl Into<String>) -> Self {
        Self::InvalidGguf {
            message: msg.into(),
            at: None,
        }
    }

    pub fn unsupported(msg: impl Into<String>) -> Self {
        Self::UnsupportedModel {
            message: msg.into(),
            at: None,
        }
    }

    /// This error, naming the metadata key at fault (model-file errors only; others are
    /// returned as they are).
    pub fn at_key(self, key: &str) -> Self {
        self.at(Culprit::Key(key.to_string()))
    }

    /// This error, naming the tensor at fault (model-file errors only).
    pub fn at_tensor(self, name: &str) -> Self {
        self.at(Culprit::Tensor(name.to_string()))
    }

    fn at(self, culprit: Culprit) -> Self {
        match self {
            Self::InvalidGguf { message, .. } => Self::InvalidGguf {
                message,
                at: Some(culprit),
            },
            Self::UnsupportedModel { message, .. } => Self::UnsupportedModel {
                message,
                at: Some(culprit),
            },
            other => other,
        }
    }

    /// The key or tensor at fault, for a model-file error that names one.
    pub fn culprit(&self) -> Option<&Culprit> {
        match self {
            Self::InvalidGguf { at, .. } | Self::UnsupportedModel { at, .. } => at.as_ref(),
            _ => None,
        }
    }

    pub fn invalid_argument(msg: impl Into<String>) -> Self {
        Self::InvalidArgument(msg.into())
    }
}

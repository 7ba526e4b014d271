//! What every generation of one model shares: the runner that evaluates tokens, the tokenizer
//! that turns them into text, the prefix pool their caches return to, and the compiled
//! constraints of structured output. A generation holds it, not the engine, so that the
//! generation loop depends on nothing above it.

use std::sync::Arc;

use super::PrefixPool;
use crate::constraint::Grammars;
use crate::model::Runner;
use crate::tokenizer::Tokenizer;

pub struct Runtime {
    pub runner: Runner,
    pub tokenizer: Arc<Tokenizer>,
    pub prefix_pool: PrefixPool,
    pub grammars: Grammars,
    /// Last, so that it drops after the weights.
    _release: ReleaseMemoryOnDrop,
}

impl Runtime {
    pub fn new(runner: Runner, tokenizer: Arc<Tokenizer>, cache_bytes: usize) -> Self {
        Self {
            runner,
            grammars: Grammars::new(tokenizer.clone()),
            tokenizer,
            prefix_pool: PrefixPool::new(cache_bytes),
            _release: ReleaseMemoryOnDrop,
        }
    }
}

/// Hands the pages of a dropped model back to the OS. glibc keeps freed heap memory for reuse,
/// so without this a deleted model can seem to stay in the process's memory.
struct ReleaseMemoryOnDrop;

impl Drop for ReleaseMemoryOnDrop {
    fn drop(&mut self) {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: malloc_trim only returns free memory to the OS; it has no preconditions.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

//! The model as the generation loop drives it: the weights and the thread pool their work runs
//! on. Knows nothing of prompts, tokenizers or streams.

use crate::error::Result;
use crate::model::{KvCache, Phi3Model, SeqInput, Workspace};

pub struct Runner {
    model: Phi3Model,
    pool: rayon::ThreadPool,
}

impl Runner {
    pub fn new(model: Phi3Model, pool: rayon::ThreadPool) -> Self {
        Self { model, pool }
    }

    pub fn model(&self) -> &Phi3Model {
        &self.model
    }

    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    pub fn context_length(&self) -> usize {
        self.model.context_length()
    }

    pub fn vocab_size(&self) -> usize {
        self.model.vocab_size()
    }

    pub fn new_cache(&self) -> KvCache {
        self.model.new_cache()
    }

    /// Refuses ids the model has no embedding for, naming `argument` and the first bad index.
    pub fn check_token_ids(&self, argument: &str, ids: &[u32]) -> Result<()> {
        self.model.check_token_ids(argument, ids)
    }

    /// Runs `tokens` through the model on this runner's threads; the logits of the last one.
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
        self.pool.install(|| self.model.forward(tokens, cache))
    }

    /// Runs several sequences through one pass of the model; the logits of each one's last
    /// token, in order.
    pub fn forward_batch(
        &self,
        seqs: &mut [SeqInput<'_>],
        workspace: &mut Workspace,
    ) -> Result<Vec<f32>> {
        self.pool
            .install(|| self.model.forward_batch(seqs, workspace))
    }
}

//! The KV caches of finished generations, kept so that a new generation whose prompt starts
//! the same way (the next turn of a conversation, a shared system prompt) evaluates only the
//! rest. Bounded in bytes, least recently used first out.
//!
//! An entry handed to a generation stays in the pool: the generation gets a cache sharing the
//! entry's blocks (nothing copied; the last, partly filled block is copied only when written,
//! see [`KvCache`]), so any number of generations may start from one entry at once.

use std::collections::HashSet;
use std::sync::Mutex;

use crate::model::KvCache;

/// Default bound of a model's pool.
pub const DEFAULT_CACHE_BYTES: usize = 1 << 30;

struct Entry {
    /// The tokens whose keys and values `cache` holds, one per position.
    tokens: Vec<u32>,
    cache: KvCache,
    last_used: u64,
}

#[derive(Default)]
struct State {
    entries: Vec<Entry>,
    clock: u64,
}

pub struct PrefixPool {
    capacity_bytes: usize,
    state: Mutex<State>,
}

/// The length of the common prefix of two token sequences.
pub fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl PrefixPool {
    pub fn new(capacity_bytes: usize) -> Self {
        Self {
            capacity_bytes,
            state: Mutex::new(State::default()),
        }
    }

    pub fn capacity_bytes(&self) -> usize {
        self.capacity_bytes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is consistent after every statement, so a panic elsewhere cannot leave it
        // half-updated: take it back rather than poison every later generation.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A cache for the longest prefix of `tokens`, at most `limit` positions long, that an
    /// entry holds, sharing the entry's blocks; `None` when no entry shares a first token.
    pub fn lookup(&self, tokens: &[u32], limit: usize) -> Option<KvCache> {
        let mut state = self.lock();
        state.clock += 1;
        let clock = state.clock;
        let (len, entry) = state
            .entries
            .iter_mut()
            .map(|e| (common_prefix(&e.tokens, tokens).min(limit), e))
            .max_by_key(|(len, e)| (*len, e.last_used))?;
        if len == 0 {
            return None;
        }
        entry.last_used = clock;
        Some(entry.cache.prefix(len))
    }

    /// Keeps `cache`, which holds the keys and values of `tokens` (at least its first
    /// `cache.len()`), then evicts the least recently used entries until the pool is within
    /// its bound. Entries that the new one extends are dropped: it holds all they hold.
    pub fn insert(&self, tokens: &[u32], cache: KvCache) {
        if self.capacity_bytes == 0 || cache.is_empty() {
            return;
        }
        let tokens = &tokens[..cache.len().min(tokens.len())];
        let mut cache = cache;
        cache.truncate(tokens.len());
        let mut state = self.lock();
        state.clock += 1;
        let clock = state.clock;
        if let Some(covering) = state
            .entries
            .iter_mut()
            .find(|e| e.tokens.starts_with(tokens))
        {
            covering.last_used = clock;
            return;
        }
        state.entries.retain(|e| !tokens.starts_with(&e.tokens));
        state.entries.push(Entry {
            tokens: tokens.to_vec(),
            cache,
            last_used: clock,
        });
        while Self::bytes_of(&state.entries) > self.capacity_bytes {
            let oldest = (0..state.entries.len())
                .min_by_key(|&i| state.entries[i].last_used)
                .expect("over the bound, so not empty");
            state.entries.swap_remove(oldest);
        }
    }

    /// Bytes the pool holds, each block counted once however many entries share it.
    pub fn bytes(&self) -> usize {
        Self::bytes_of(&self.lock().entries)
    }

    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn bytes_of(entries: &[Entry]) -> usize {
        let Some(first) = entries.first() else {
            return 0;
        };
        let blocks: HashSet<usize> = entries.iter().flat_map(|e| e.cache.block_ids()).collect();
        blocks.len() * first.cache.shape().block_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kv_cache::BLOCK_POSITIONS;
    use crate::model::kv_cache::{KvShape, KvType};

    const SHAPE: KvShape = KvShape {
        layers: 1,
        kv_heads: 1,
        head_dim: 2,
        kv_type: KvType::F16,
    };

    fn cache_of(tokens: &[u32]) -> KvCache {
        let mut cache = KvCache::new(SHAPE, 100_000);
        cache.reserve(tokens.len()).unwrap();
        let rows: Vec<f32> = tokens.iter().flat_map(|&t| [t as f32; 4]).collect();
        cache.write(0, &rows, 4, 0, 2);
        cache.advance(tokens.len());
        cache
    }

    fn ids(range: std::ops::Range<u32>) -> Vec<u32> {
        range.collect()
    }

    #[test]
    fn the_longest_common_prefix_is_found_and_shared() {
        let pool = PrefixPool::new(1 << 30);
        pool.insert(&ids(0..100), cache_of(&ids(0..100)));
        pool.insert(&[7, 8, 9], cache_of(&[7, 8, 9]));
        let mut prompt = ids(0..70);
        prompt.push(5000);
        let hit = pool.lookup(&prompt, prompt.len() - 1).unwrap();
        assert_eq!(hit.len(), 70);
        // At most `limit`: the last prompt token is always evaluated, for fresh logits.
        assert_eq!(pool.lookup(&ids(0..50), 49).unwrap().len(), 49);
        assert!(pool.lookup(&[9, 9], 1).is_none());
        // Nothing was copied: the hit holds the entry's blocks.
        assert_eq!(pool.bytes(), 3 * SHAPE.block_bytes());
    }

    #[test]
    fn an_extending_entry_replaces_the_one_it_extends() {
        let pool = PrefixPool::new(1 << 30);
        pool.insert(&ids(0..10), cache_of(&ids(0..10)));
        pool.insert(&ids(0..20), cache_of(&ids(0..20)));
        assert_eq!(pool.len(), 1);
        // A prefix of an entry adds nothing.
        pool.insert(&ids(0..5), cache_of(&ids(0..5)));
        assert_eq!(pool.len(), 1);
        assert_eq!(pool.lookup(&ids(0..30), 29).unwrap().len(), 20);
    }

    #[test]
    fn the_pool_stays_within_its_bound_least_recently_used_out() {
        let block = SHAPE.block_bytes();
        let pool = PrefixPool::new(3 * block);
        for first in 0..10u32 {
            let tokens: Vec<u32> = (0..BLOCK_POSITIONS as u32)
                .map(|t| first * 1000 + t)
                .collect();
            pool.insert(&tokens, cache_of(&tokens));
            assert!(pool.bytes() <= 3 * block);
            // Keep the first entry in use: it outlives the others.
            assert!(pool.lookup(&ids(0..10), 9).is_some());
        }
        assert_eq!(pool.len(), 3);
        assert_eq!(pool.lookup(&[9000, 9001], 2).unwrap().len(), 2);
        assert!(pool.lookup(&[5000], 1).is_none());
    }

    #[test]
    fn a_zero_bound_keeps_nothing() {
        let pool = PrefixPool::new(0);
        pool.insert(&[1, 2, 3], cache_of(&[1, 2, 3]));
        assert!(pool.is_empty());
    }
}

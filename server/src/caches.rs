//! What the batch keeps between requests: the prompts of finished requests
//! ([`PromptCaches`], for a conversation's next turn) and encoded images
//! ([`ImageCache`], so a conversation's image runs through the tower once), each
//! under a byte budget, evicted least recently used first.
//!
//! The store is shared by every client: one that guesses another's conversation can
//! tell from its time to first token (or the cached-tokens metric) whether it is
//! cached. Serve untrusting tenants with `--prompt-cache-mib 0`.

use q3vl_engine::{EncodedImage, PromptCache};
use std::sync::Arc;

/// Cached prompts under a byte budget.
pub struct PromptCaches {
    /// Least recently used first.
    entries: Vec<PromptCache>,
    budget: usize,
}

impl PromptCaches {
    /// An empty store holding at most `budget` bytes.
    pub fn new(budget: usize) -> PromptCaches {
        PromptCaches {
            entries: vec![],
            budget,
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.entries.iter().map(PromptCache::bytes).sum()
    }

    /// The entry sharing the longest prefix with a prompt (`reusable` gives each
    /// entry's shared positions), if any shares one, made the most recently used. It
    /// stays in the store: a request copies what it takes, and other conversations
    /// with the same prefix (a shared system prompt) can take it too.
    pub fn best(&mut self, reusable: impl Fn(&PromptCache) -> usize) -> Option<&PromptCache> {
        let (i, n) = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (i, reusable(e)))
            .max_by_key(|&(i, n)| (n, i))?;
        if n == 0 {
            return None;
        }
        let hit = self.entries.remove(i);
        self.entries.push(hit);
        self.entries.last()
    }

    /// Keeps `entry` as the most recently used, evicting the least recently used
    /// until the store fits its budget (an entry larger than the budget is dropped).
    pub fn put(&mut self, entry: PromptCache) {
        if entry.bytes() > self.budget {
            return;
        }
        self.entries.push(entry);
        let mut total = self.bytes();
        while total > self.budget {
            total -= self.entries.remove(0).bytes();
        }
    }
}

/// Encoded images by key, under a byte budget.
pub struct ImageCache {
    /// Least recently used first.
    entries: Vec<([u8; 32], Arc<EncodedImage>)>,
    budget: usize,
}

/// Bytes an encoded image holds (its embeddings and DeepStack features, f32).
fn image_bytes(f: &EncodedImage) -> usize {
    4 * (f.embeds.len() + f.deepstack.iter().map(Vec::len).sum::<usize>())
}

impl ImageCache {
    /// An empty cache holding at most `budget` bytes of images.
    pub fn new(budget: usize) -> ImageCache {
        ImageCache {
            entries: vec![],
            budget,
        }
    }

    /// The image under `key`, computing it with `encode` when absent.
    pub fn get_or_encode<E>(
        &mut self,
        key: [u8; 32],
        encode: impl FnOnce() -> Result<EncodedImage, E>,
    ) -> Result<Arc<EncodedImage>, E> {
        if let Some(i) = self.entries.iter().position(|(k, _)| *k == key) {
            let hit = self.entries.remove(i);
            let f = hit.1.clone();
            self.entries.push(hit);
            return Ok(f);
        }
        let f = Arc::new(encode()?);
        if image_bytes(&f) <= self.budget {
            self.entries.push((key, f.clone()));
            let mut total: usize = self.entries.iter().map(|(_, e)| image_bytes(e)).sum();
            while total > self.budget {
                total -= image_bytes(&self.entries.remove(0).1);
            }
        }
        Ok(f)
    }
}

//! What the batch keeps between requests: the prompts of finished requests
//! ([`PromptCaches`], for a conversation's next turn) and encoded images
//! ([`ImageCache`], so a conversation's image runs through the tower once), each
//! evicted least recently used first.

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

    /// Takes out the entry sharing the longest prefix with a prompt (`reusable` gives
    /// each entry's shared positions), if any shares one.
    pub fn take_best(&mut self, reusable: impl Fn(&PromptCache) -> usize) -> Option<PromptCache> {
        let (i, n) = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (i, reusable(e)))
            .max_by_key(|&(i, n)| (n, i))?;
        (n > 0).then(|| self.entries.remove(i))
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

/// Encoded images by key, at most a fixed number.
pub struct ImageCache {
    /// Least recently used first.
    entries: Vec<([u8; 32], Arc<EncodedImage>)>,
    capacity: usize,
}

impl ImageCache {
    /// An empty cache of at most `capacity` images.
    pub fn new(capacity: usize) -> ImageCache {
        ImageCache {
            entries: vec![],
            capacity,
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
        if self.capacity > 0 {
            if self.entries.len() >= self.capacity {
                self.entries.remove(0);
            }
            self.entries.push((key, f.clone()));
        }
        Ok(f)
    }
}

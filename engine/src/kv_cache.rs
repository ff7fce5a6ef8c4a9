//! The KV cache, sized to the conversation (prompt + max new tokens), not to the
//! model's 262144-position maximum.

/// Rotated keys and values of every layer, `[layer][kv_head][position][head_dim]`.
pub struct KvCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    heads: usize,
    head_dim: usize,
    capacity: usize,
    len: usize,
}

impl KvCache {
    /// An empty cache for `capacity` positions.
    pub fn new(layers: usize, heads: usize, head_dim: usize, capacity: usize) -> KvCache {
        let n = heads * capacity * head_dim;
        KvCache {
            k: (0..layers).map(|_| vec![0f32; n]).collect(),
            v: (0..layers).map(|_| vec![0f32; n]).collect(),
            heads,
            head_dim,
            capacity,
            len: 0,
        }
    }

    /// Positions filled (by every layer).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes one position holds over every layer, keys and values in f32 (what a
    /// decode step reads per cached position, for the bandwidth bound).
    pub fn bytes_per_position(layers: usize, heads: usize, head_dim: usize) -> usize {
        2 * layers * heads * head_dim * 4
    }

    /// Writes `t` new positions of layer `layer` (`k`, `v`: `[t, heads·head_dim]`)
    /// after the current length. Call [`KvCache::advance`] once all layers wrote.
    pub fn write(&mut self, layer: usize, k: &[f32], v: &[f32], t: usize) {
        assert!(self.len + t <= self.capacity, "KV cache overflow");
        let hd = self.head_dim;
        for tok in 0..t {
            for h in 0..self.heads {
                let dst = (h * self.capacity + self.len + tok) * hd;
                let src = (tok * self.heads + h) * hd;
                self.k[layer][dst..dst + hd].copy_from_slice(&k[src..src + hd]);
                self.v[layer][dst..dst + hd].copy_from_slice(&v[src..src + hd]);
            }
        }
    }

    /// Positions the cache can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes the cache holds allocated (keys and values of every position it can hold).
    pub fn allocated_bytes(&self) -> usize {
        2 * self.k.len() * self.heads * self.capacity * self.head_dim * 4
    }

    /// The first `len` positions (at most those filled) in a cache of `capacity`
    /// positions (at least `len`): a cached prompt cut to what a new prompt shares
    /// with it, or grown to hold that prompt's conversation.
    pub fn resized(&self, len: usize, capacity: usize) -> KvCache {
        let len = len.min(self.len);
        let capacity = capacity.max(len);
        let hd = self.head_dim;
        let copy = |src: &Vec<f32>| {
            let mut dst = vec![0f32; self.heads * capacity * hd];
            for h in 0..self.heads {
                let from = h * self.capacity * hd;
                let to = h * capacity * hd;
                dst[to..to + len * hd].copy_from_slice(&src[from..from + len * hd]);
            }
            dst
        };
        KvCache {
            k: self.k.iter().map(copy).collect(),
            v: self.v.iter().map(copy).collect(),
            heads: self.heads,
            head_dim: hd,
            capacity,
            len,
        }
    }

    /// Commits `t` positions written to every layer.
    pub fn advance(&mut self, t: usize) {
        self.len += t;
    }

    /// Keys and values of one head of one layer, positions `0..n`.
    pub fn head(&self, layer: usize, head: usize, n: usize) -> (&[f32], &[f32]) {
        let o = head * self.capacity * self.head_dim;
        let e = o + n * self.head_dim;
        (&self.k[layer][o..e], &self.v[layer][o..e])
    }
}

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

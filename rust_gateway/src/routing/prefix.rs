//! Approximate per-worker prefix cache index.
//!
//! The gateway cannot see a worker's radix cache, so it remembers what it sent where: a request's
//! token ids are cut into page-aligned chunks (128 tokens = SGLang's page = M3's MSA block) and each
//! chunk gets a hash that chains in everything before it. A worker that was sent chunk hash `h_k`
//! very likely still holds the first k chunks of that prompt in its radix cache. Entries are bounded
//! per worker and the least recently used ones are evicted first.

use std::collections::HashMap;
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Chained hashes of the full chunks of `ids`; a trailing partial chunk is not cacheable on the
/// worker (it caches whole pages) and is left out. `image_salts` are (token offset, content hash)
/// pairs: image placeholder tokens are identical for every image, so the image content is mixed
/// into the chunk where its placeholder starts.
pub fn chunk_hashes(ids: &[u32], chunk_tokens: usize, image_salts: &[(usize, u64)]) -> Vec<u64> {
    let n_chunks = ids.len() / chunk_tokens.max(1);
    let mut out = Vec::with_capacity(n_chunks);
    let mut prev: u64 = 0x6d33_7365_7276_6521; // any fixed seed: "m3serve!"
    let mut buf = Vec::with_capacity(chunk_tokens * 4 + 16);
    for c in 0..n_chunks {
        let (start, end) = (c * chunk_tokens, (c + 1) * chunk_tokens);
        buf.clear();
        for id in &ids[start..end] {
            buf.extend_from_slice(&id.to_le_bytes());
        }
        for (offset, salt) in image_salts {
            if (start..end).contains(offset) {
                buf.extend_from_slice(&salt.to_le_bytes());
            }
        }
        prev = xxh3_64_with_seed(&buf, prev);
        out.push(prev);
    }
    out
}

/// The chunks one worker was sent, with a logical clock for LRU eviction.
#[derive(Debug)]
pub struct PrefixIndex {
    last_used: HashMap<u64, u64>,
    clock: u64,
    max_entries: usize,
}

impl PrefixIndex {
    pub fn new(max_entries: usize) -> Self {
        Self { last_used: HashMap::new(), clock: 0, max_entries: max_entries.max(1) }
    }

    pub fn len(&self) -> usize {
        self.last_used.len()
    }

    pub fn is_empty(&self) -> bool {
        self.last_used.is_empty()
    }

    /// Number of leading chunks of `hashes` this worker was sent (the chain makes a hit on chunk k
    /// imply the whole prefix up to k).
    pub fn matched_chunks(&self, hashes: &[u64]) -> usize {
        hashes.iter().take_while(|h| self.last_used.contains_key(h)).count()
    }

    /// Record that this worker now holds these chunks.
    pub fn insert(&mut self, hashes: &[u64]) {
        self.clock += 1;
        for h in hashes {
            self.last_used.insert(*h, self.clock);
        }
        if self.last_used.len() > self.max_entries {
            self.evict_to(self.max_entries - self.max_entries / 8);
        }
    }

    /// Drop least recently used entries until at most `target` remain. O(n log n), but it runs
    /// once per max/8 insertions.
    fn evict_to(&mut self, target: usize) {
        let mut ticks: Vec<u64> = self.last_used.values().copied().collect();
        ticks.sort_unstable();
        let excess = self.last_used.len().saturating_sub(target);
        if excess == 0 {
            return;
        }
        let cutoff = ticks[excess - 1];
        self.last_used.retain(|_, t| *t > cutoff);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize, seed: u32) -> Vec<u32> {
        (0..n as u32).map(|i| i.wrapping_mul(2_654_435_761).wrapping_add(seed)).collect()
    }

    #[test]
    fn hashes_cover_full_chunks_and_chain() {
        let a = ids(300, 0);
        let h = chunk_hashes(&a, 128, &[]);
        assert_eq!(h.len(), 2, "300 tokens = 2 full chunks of 128");
        let mut b = a.clone();
        b[5] ^= 1; // change inside chunk 0: every later hash changes too
        let hb = chunk_hashes(&b, 128, &[]);
        assert_ne!(h[0], hb[0]);
        assert_ne!(h[1], hb[1]);
        let mut c = a.clone();
        c[200] ^= 1; // change inside chunk 1 only
        let hc = chunk_hashes(&c, 128, &[]);
        assert_eq!(h[0], hc[0]);
        assert_ne!(h[1], hc[1]);
    }

    #[test]
    fn image_content_separates_identical_placeholders() {
        let a = ids(256, 7);
        let h1 = chunk_hashes(&a, 128, &[(130, 111)]);
        let h2 = chunk_hashes(&a, 128, &[(130, 222)]);
        assert_eq!(h1[0], h2[0], "the image starts in chunk 1");
        assert_ne!(h1[1], h2[1]);
    }

    #[test]
    fn match_is_the_leading_run() {
        let conv = ids(128 * 5, 1);
        let mut idx = PrefixIndex::new(1000);
        idx.insert(&chunk_hashes(&conv[..128 * 3], 128, &[]));
        assert_eq!(idx.matched_chunks(&chunk_hashes(&conv, 128, &[])), 3);
        assert_eq!(idx.matched_chunks(&chunk_hashes(&ids(128 * 5, 2), 128, &[])), 0);
    }

    #[test]
    fn eviction_keeps_recent_entries_and_bounds_size() {
        let mut idx = PrefixIndex::new(16);
        let old = chunk_hashes(&ids(128 * 10, 1), 128, &[]);
        idx.insert(&old);
        let new = chunk_hashes(&ids(128 * 10, 2), 128, &[]);
        idx.insert(&new);
        assert!(idx.len() <= 16);
        assert_eq!(idx.matched_chunks(&new), 10, "most recent request survives");
        assert_eq!(idx.matched_chunks(&old), 0, "oldest entries went first");
    }
}

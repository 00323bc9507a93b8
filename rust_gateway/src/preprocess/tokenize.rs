//! Tokenization with a segment cache, so an agent's 60k-token history is not encoded again on
//! every turn.
//!
//! Why it is exact: the Hugging Face tokenizer first cuts the text at added tokens and encodes every
//! piece between them on its own. So `encode(A + S + B) == encode(A + S) ++ encode(B)` whenever `S`
//! is an added special token that (1) the tokenizer really matched at that spot, (2) does not strip
//! whitespace to its right, and (3) is not a proper prefix of another added token. We find the
//! special tokens with the same leftmost-longest matching the tokenizer uses, cut the rendered
//! prompt right after each eligible one, and cache the ids of every segment by a 128-bit hash of
//! its text. A new turn re-encodes only the segments it has not seen (normally the last message).
//! Tests compare against a full encode on many conversations.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use aho_corasick::{AhoCorasick, MatchKind};
use tokenizers::Tokenizer;
use xxhash_rust::xxh3::xxh3_128;

use super::error::PreprocessError;

/// Segments shorter than this are encoded directly: hashing and locking would cost more.
const MIN_CACHED_SEGMENT_BYTES: usize = 64;

/// The checkpoint's tokenizer plus the segment cache.
pub struct CachedTokenizer {
    tokenizer: Tokenizer,
    /// All added tokens, matched leftmost-longest like the tokenizer's own splitter.
    added: Option<AhoCorasick>,
    /// Per pattern of `added`: may a segment end right after it?
    boundary: Vec<bool>,
    cache: Mutex<SegmentCache>,
}

impl std::fmt::Debug for CachedTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedTokenizer").field("boundaries", &self.boundary.iter().filter(|b| **b).count()).finish()
    }
}

/// Counters, for metrics and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    pub hit_tokens: u64,
    pub miss_tokens: u64,
    pub cached_tokens: u64,
}

struct SegmentCache {
    map: HashMap<u128, (Arc<[u32]>, u64)>,
    clock: u64,
    tokens: usize,
    max_tokens: usize,
    stats: CacheStats,
}

impl SegmentCache {
    fn get(&mut self, key: u128) -> Option<Arc<[u32]>> {
        self.clock += 1;
        let clock = self.clock;
        let (ids, used) = self.map.get_mut(&key)?;
        *used = clock;
        self.stats.hit_tokens += ids.len() as u64;
        Some(ids.clone())
    }

    fn insert(&mut self, key: u128, ids: Arc<[u32]>) {
        self.stats.miss_tokens += ids.len() as u64;
        if self.max_tokens == 0 || ids.len() > self.max_tokens {
            return;
        }
        self.clock += 1;
        self.tokens += ids.len();
        if let Some((old, _)) = self.map.insert(key, (ids, self.clock)) {
            self.tokens -= old.len();
        }
        if self.tokens > self.max_tokens {
            // Evict the least recently used half (by tokens): amortized O(1) per insert.
            let mut by_age: Vec<(u64, u128, usize)> = self.map.iter().map(|(k, (v, t))| (*t, *k, v.len())).collect();
            by_age.sort_unstable();
            let target = self.max_tokens / 2;
            for (_, k, len) in by_age {
                if self.tokens <= target {
                    break;
                }
                self.map.remove(&k);
                self.tokens -= len;
            }
        }
        self.stats.cached_tokens = self.tokens as u64;
    }
}

impl CachedTokenizer {
    /// Load `tokenizer.json` from the checkpoint. `cache_max_tokens` bounds the cache (0 disables it).
    pub fn load(model_dir: &Path, cache_max_tokens: usize) -> Result<Self, PreprocessError> {
        let path = model_dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&path)
            .map_err(|e| PreprocessError::Internal(format!("loading {}: {e}", path.display())))?;
        Ok(Self::new(tokenizer, cache_max_tokens))
    }

    pub fn new(tokenizer: Tokenizer, cache_max_tokens: usize) -> Self {
        // The tokenizer matches non-normalized added tokens on the raw text first; mirror that set.
        let added: Vec<tokenizers::AddedToken> =
            tokenizer.get_added_tokens_decoder().into_values().filter(|t| !t.normalized).collect();
        let contents: Vec<&str> = added.iter().map(|t| t.content.as_str()).collect();
        let boundary: Vec<bool> = added
            .iter()
            .map(|t| {
                t.special
                    && !t.rstrip
                    && !t.single_word
                    && !contents.iter().any(|o| o.len() > t.content.len() && o.starts_with(t.content.as_str()))
            })
            .collect();
        let added_ac = (!contents.is_empty()).then(|| {
            AhoCorasick::builder()
                .match_kind(MatchKind::LeftmostLongest)
                .build(&contents)
                .expect("added tokens form a valid automaton")
        });
        Self {
            tokenizer,
            added: added_ac,
            boundary,
            cache: Mutex::new(SegmentCache {
                map: HashMap::new(),
                clock: 0,
                tokens: 0,
                max_tokens: cache_max_tokens,
                stats: CacheStats::default(),
            }),
        }
    }

    pub fn inner(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Id of a token string (e.g. a special token), if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    pub fn stats(&self) -> CacheStats {
        self.cache.lock().map(|c| c.stats).unwrap_or_default()
    }

    /// Encode without the tokenizer's own special-token additions (the template already wrote
    /// them), exactly like `tokenizer(text, add_special_tokens=False)`, without the cache.
    pub fn encode_uncached(&self, text: &str) -> Result<Vec<u32>, PreprocessError> {
        self.tokenizer
            .encode_fast(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| PreprocessError::Internal(format!("tokenizer failed: {e}")))
    }

    /// Same result as [`Self::encode_uncached`], reusing cached segments.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, PreprocessError> {
        let mut ids = Vec::with_capacity(text.len() / 3);
        self.encode_into(text, &mut ids)?;
        Ok(ids)
    }

    /// Append the ids of `text` to `out`.
    pub fn encode_into(&self, text: &str, out: &mut Vec<u32>) -> Result<(), PreprocessError> {
        let cache_on = self.cache.lock().map(|c| c.max_tokens > 0).unwrap_or(false);
        let Some(ac) = self.added.as_ref().filter(|_| cache_on) else {
            out.extend(self.encode_uncached(text)?);
            return Ok(());
        };
        let mut start = 0;
        for m in ac.find_iter(text) {
            if self.boundary[m.pattern().as_usize()] {
                self.encode_segment(&text[start..m.end()], out)?;
                start = m.end();
            }
        }
        if start < text.len() {
            self.encode_segment(&text[start..], out)?;
        }
        Ok(())
    }

    fn encode_segment(&self, segment: &str, out: &mut Vec<u32>) -> Result<(), PreprocessError> {
        if segment.len() < MIN_CACHED_SEGMENT_BYTES {
            out.extend(self.encode_uncached(segment)?);
            return Ok(());
        }
        let key = xxh3_128(segment.as_bytes());
        if let Some(ids) = self.cache.lock().ok().and_then(|mut c| c.get(key)) {
            out.extend_from_slice(&ids);
            return Ok(());
        }
        let ids: Arc<[u32]> = self.encode_uncached(segment)?.into();
        out.extend_from_slice(&ids);
        if let Ok(mut c) = self.cache.lock() {
            c.insert(key, ids);
        }
        Ok(())
    }
}

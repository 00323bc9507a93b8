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
//!
//! Single flight: agent sessions often start together on one long system prompt and tool list. The
//! first request to miss a segment encodes it and the others that miss it meanwhile wait for those
//! ids, instead of each spending the same ~70 ms of CPU on a 60k-token prefix.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

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
    /// Tokens a request took from another's encoding of the same segment, in flight at the time.
    pub coalesced_tokens: u64,
}

struct SegmentCache {
    map: HashMap<u128, (Arc<[u32]>, u64)>,
    clock: u64,
    tokens: usize,
    max_tokens: usize,
    stats: CacheStats,
    /// Segments being encoded now, with the slot their ids go to.
    in_flight: HashMap<u128, Arc<Flight>>,
}

/// One segment being encoded: its encoder publishes the ids (None if it failed), waiters block for them.
type Flight = super::flight::Flight<Option<Arc<[u32]>>>;

/// Held by the thread encoding a segment: when dropped (after the encode, or while a panic unwinds) it
/// caches a success, ends the flight and wakes the waiters; on failure they encode the segment themselves.
struct Encoder<'a> {
    cache: &'a Mutex<SegmentCache>,
    key: u128,
    flight: Arc<Flight>,
    ids: Option<Arc<[u32]>>,
}

impl Drop for Encoder<'_> {
    fn drop(&mut self) {
        {
            let mut c = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(ids) = &self.ids {
                c.insert(self.key, ids.clone());
            }
            c.in_flight.remove(&self.key);
        }
        self.flight.publish(self.ids.take());
    }
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
                in_flight: HashMap::new(),
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
        enum Role {
            Hit(Arc<[u32]>),
            Wait(Arc<Flight>),
            Encode(Arc<Flight>),
            Uncached,
        }
        let role = match self.cache.lock() {
            Ok(mut c) => match c.get(key) {
                Some(ids) => Role::Hit(ids),
                None => match c.in_flight.get(&key) {
                    Some(flight) => Role::Wait(flight.clone()),
                    None => {
                        let flight = Arc::new(Flight::default());
                        c.in_flight.insert(key, flight.clone());
                        Role::Encode(flight)
                    }
                },
            },
            // Poisoned by a panic under the lock: work uncached rather than trust its state.
            Err(_) => Role::Uncached,
        };
        let ids = match role {
            Role::Hit(ids) => ids,
            Role::Uncached => self.encode_uncached(segment)?.into(),
            Role::Wait(flight) => match flight.wait() {
                Some(ids) => {
                    if let Ok(mut c) = self.cache.lock() {
                        c.stats.coalesced_tokens += ids.len() as u64;
                    }
                    ids
                }
                // The encoder failed: its error is not ours to report, so try the segment ourselves.
                None => self.encode_uncached(segment)?.into(),
            },
            Role::Encode(flight) => {
                let mut encoder = Encoder { cache: &self.cache, key, flight, ids: None };
                let ids: Arc<[u32]> = self.encode_uncached(segment)?.into();
                encoder.ids = Some(ids.clone());
                ids
            }
        };
        out.extend_from_slice(&ids);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Barrier;
    use tokenizers::models::wordlevel::WordLevel;
    use tokenizers::pre_tokenizers::whitespace::Whitespace;
    use tokenizers::AddedToken;

    /// A word-level tokenizer with one special token that ends segments.
    fn tokenizer(cache_max_tokens: usize) -> CachedTokenizer {
        let vocab: HashMap<String, u32> =
            [("[UNK]", 0), ("a", 1), ("b", 2), ("c", 3)].iter().map(|(w, i)| (w.to_string(), *i)).collect();
        let model = WordLevel::builder().vocab(vocab.into_iter().collect()).unk_token("[UNK]".into()).build().unwrap();
        let mut t = Tokenizer::new(model);
        t.with_pre_tokenizer(Some(Whitespace {}));
        let _ = t.add_special_tokens(vec![AddedToken::from("<end>", true)]);
        CachedTokenizer::new(t, cache_max_tokens)
    }

    fn long_text(n: usize) -> String {
        (0..n).map(|i| ["a", "b", "c"][i % 3]).collect::<Vec<_>>().join(" ")
    }

    #[test]
    fn concurrent_misses_of_one_segment_encode_it_once() {
        const N: usize = 8;
        let t = Arc::new(tokenizer(1 << 20));
        let text = format!("{}<end>{}", long_text(200_000), long_text(50));
        let want = t.encode_uncached(&text).unwrap();
        let barrier = Arc::new(Barrier::new(N));
        let handles: Vec<_> = (0..N)
            .map(|_| {
                let (t, text, barrier) = (t.clone(), text.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    t.encode(&text).unwrap()
                })
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap(), want);
        }
        let s = t.stats();
        let segment_tokens = t.encode_uncached(&format!("{}<end>", long_text(200_000))).unwrap().len() as u64;
        // Every thread got the long segment: one encoded it, the rest hit or waited for it.
        assert_eq!(s.miss_tokens, segment_tokens + 50, "{s:?}");
        assert_eq!(s.hit_tokens + s.coalesced_tokens, (N as u64 - 1) * (segment_tokens + 50), "{s:?}");
        assert!(t.cache.lock().unwrap().in_flight.is_empty());
    }

    #[test]
    fn a_waiter_encodes_itself_when_the_encoder_fails() {
        let t = tokenizer(1 << 20);
        let text = long_text(100);
        let key = xxh3_128(text.as_bytes());
        // A flight whose encoder gave up: the waiter must not hang or return nothing.
        let flight = Arc::new(Flight::default());
        t.cache.lock().unwrap().in_flight.insert(key, flight.clone());
        let t = Arc::new(t);
        let waiter = {
            let (t, text) = (t.clone(), text.clone());
            std::thread::spawn(move || t.encode(&text).unwrap())
        };
        std::thread::sleep(std::time::Duration::from_millis(50));
        t.cache.lock().unwrap().in_flight.remove(&key);
        flight.publish(None);
        assert_eq!(waiter.join().unwrap(), t.encode_uncached(&text).unwrap());
    }

    #[test]
    fn a_panicking_encoder_releases_its_waiters() {
        let t = tokenizer(1 << 20);
        let key = 7u128;
        let flight = Arc::new(Flight::default());
        t.cache.lock().unwrap().in_flight.insert(key, flight.clone());
        let waiter = {
            let flight = flight.clone();
            std::thread::spawn(move || flight.wait())
        };
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _encoder = Encoder { cache: &t.cache, key, flight: flight.clone(), ids: None };
            panic!("tokenizer bug");
        }));
        assert!(result.is_err());
        assert_eq!(waiter.join().unwrap(), None);
        assert!(t.cache.lock().unwrap().in_flight.is_empty());
    }
}

//! A content-addressed cache of prepared images, so an agent's screenshots are not decoded,
//! resized, patchified and encoded again on every turn (agent frameworks resend the whole
//! conversation, images included).
//!
//! Key: BLAKE3 (256-bit) of the preprocessor's image settings (resize policy, min/max pixels,
//! patch/merge/temporal sizes, mean/std, rescale factor, decode limits, wire dtype, whether f32 rows
//! are kept) plus the image's source as received: the `data:` URL text (so a hit skips even the
//! base64 decode) or the body an http(s) URL returned (never the URL alone: what is behind a URL can
//! change). A cryptographic hash because the cache is shared by all clients: a crafted collision
//! would hand one client's pixels to another's prompt.
//!
//! Value: `Arc<PreparedImage>` (the encoded hand-off string, grid, pixel hash), the same object a
//! miss computes, so a hit gives identical ids and `image_data`. Only successes are stored.
//!
//! Bound: bytes held (`PreparedImage::size_bytes`), least recently used evicted first; an image
//! larger than the whole bound is not stored; 0 disables the cache (nothing is hashed or stored).
//! One mutex around a hash map and a recency index; it is held for a lookup or an insert only
//! (never while an image is processed), and evicted images are freed after it is released.
//!
//! Single flight ([`ImageCache::get_or_prepare`]): when several requests bring the same new image
//! at once (agent sessions started together, one screenshot each), the first prepares it and the
//! others wait for its result instead of each decoding it again. The images being prepared are
//! registered under the same mutex as the cached ones, so a request sees either the stored image
//! or the preparation in flight, never neither between the two.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use super::handoff::{PreparedImage, WireDtype};
use super::images::{ImageConfig, ResizePolicy};

/// 256-bit cache key.
pub type ImageKey = [u8; 32];

/// Where an image came from, as hashed into its key.
#[derive(Debug, Clone, Copy)]
pub enum ImageSource<'a> {
    /// The whole `data:` URL text.
    DataUrl(&'a str),
    /// Encoded image bytes (an http(s) body).
    Bytes(&'a [u8]),
}

/// Counters, for metrics and tests. Every image asked for is one of: a hit, a miss (it was
/// prepared: one decode each) or a coalesced wait (another request was preparing it).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ImageCacheStats {
    pub hits: u64,
    pub misses: u64,
    /// Requests that waited for another's preparation of the same image instead of decoding it.
    pub coalesced: u64,
    pub evictions: u64,
    /// Bytes held now.
    pub bytes: u64,
    /// Images held now.
    pub entries: u64,
    /// The bound (0: disabled).
    pub max_bytes: u64,
}

struct Entry {
    image: Arc<PreparedImage>,
    size: usize,
    /// Key of this entry in `Lru::order`.
    tick: u64,
}

/// Bookkeeping per image beyond `PreparedImage::size_bytes`: its map slot and recency slot.
const ENTRY_OVERHEAD: usize = std::mem::size_of::<(ImageKey, Entry)>() + std::mem::size_of::<(u64, ImageKey)>();

/// What an image's preparation gave, as its waiters receive it.
type Prepared = Result<Arc<PreparedImage>, String>;

/// One image being prepared: its leader publishes the result, its waiters block for it.
type Flight = super::flight::Flight<Prepared>;

#[derive(Default)]
struct Lru {
    map: HashMap<ImageKey, Entry>,
    /// Recency: tick -> key, oldest first.
    order: BTreeMap<u64, ImageKey>,
    tick: u64,
    bytes: usize,
    /// Images being prepared now (not in `map` yet), with the slot their result goes to.
    in_flight: HashMap<ImageKey, Arc<Flight>>,
}

impl Lru {
    /// The image under `key`, marked as the most recently used.
    fn touch(&mut self, key: &ImageKey) -> Option<Arc<PreparedImage>> {
        self.tick += 1;
        let entry = self.map.get_mut(key)?;
        self.order.remove(&entry.tick);
        entry.tick = self.tick;
        self.order.insert(self.tick, *key);
        Some(entry.image.clone())
    }
}

/// Held by the thread preparing an image: when dropped (after `prepare` returned, or while it
/// unwinds from a panic) it stores a success, ends the flight and wakes the waiters.
struct Leader<'a> {
    cache: &'a ImageCache,
    key: ImageKey,
    flight: Arc<Flight>,
    /// `None` while preparing; still `None` when dropped by a panic.
    result: Option<Prepared>,
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        // A panic in the decoder reaches the waiters as an error rather than a retry: the same
        // bytes under the same settings would most likely panic again, one waiter after another.
        let result = self.result.take().unwrap_or_else(|| Err("preparing the image failed unexpectedly".to_string()));
        let mut evicted = Vec::new();
        {
            let mut lru = self.cache.lru.lock().unwrap_or_else(PoisonError::into_inner);
            // Stored and out of `in_flight` under one lock: a request arriving now finds the image.
            if let Ok(image) = &result {
                self.cache.insert_locked(&mut lru, self.key, image.clone(), &mut evicted);
            }
            lru.in_flight.remove(&self.key);
        }
        // Evicted images are freed outside the lock, as in `insert`.
        drop(evicted);
        self.flight.publish(result);
    }
}

/// The cache; `Sync`, shared by all requests of a preprocessor.
pub struct ImageCache {
    max_bytes: usize,
    /// Hash of the settings that change a prepared image: part of every key.
    settings: [u8; 32],
    lru: Mutex<Lru>,
    hits: AtomicU64,
    misses: AtomicU64,
    coalesced: AtomicU64,
    evictions: AtomicU64,
}

impl std::fmt::Debug for ImageCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageCache").field("stats", &self.stats()).finish()
    }
}

/// Hash of everything in the settings that changes a [`PreparedImage`] (bumped `v` if its layout changes).
pub fn settings_fingerprint(cfg: &ImageConfig, dtype: WireDtype, keep_pixel_values: bool) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(b"m3serve image cache v1\0");
    match cfg.policy {
        ResizePolicy::HfArea => h.update(&[0]),
        ResizePolicy::LongSide(n) => h.update(&[1]).update(&n.to_le_bytes()),
    };
    for x in [cfg.min_pixels, cfg.max_pixels, cfg.limits.max_pixels] {
        h.update(&x.to_le_bytes());
    }
    h.update(&u64::from(cfg.limits.max_side).to_le_bytes());
    for x in [cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size] {
        h.update(&(x as u64).to_le_bytes());
    }
    for x in cfg.image_mean.iter().chain(&cfg.image_std).chain([&cfg.rescale_factor]) {
        h.update(&x.to_bits().to_le_bytes());
    }
    h.update(dtype.name().as_bytes()).update(&[0, u8::from(keep_pixel_values)]);
    *h.finalize().as_bytes()
}

impl ImageCache {
    /// A cache of at most `max_bytes` (0: disabled) for images prepared with settings `settings`
    /// (see [`settings_fingerprint`]).
    pub fn new(max_bytes: usize, settings: [u8; 32]) -> Self {
        Self {
            max_bytes,
            settings,
            lru: Mutex::new(Lru::default()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            coalesced: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
        }
    }

    pub fn enabled(&self) -> bool {
        self.max_bytes > 0
    }

    /// The key of an image from `source` under this cache's settings.
    pub fn key(&self, source: ImageSource<'_>) -> ImageKey {
        let mut h = blake3::Hasher::new();
        h.update(&self.settings);
        let (tag, data): (&[u8], &[u8]) = match source {
            ImageSource::DataUrl(url) => (b"data-url\0", url.as_bytes()),
            ImageSource::Bytes(bytes) => (b"bytes\0", bytes),
        };
        h.update(tag).update(&(data.len() as u64).to_le_bytes()).update(data);
        *h.finalize().as_bytes()
    }

    /// The image under `key`, counted as a hit or a miss (nothing is counted when disabled).
    pub fn get(&self, key: &ImageKey) -> Option<Arc<PreparedImage>> {
        if !self.enabled() {
            return None;
        }
        let found = self.lru.lock().ok().and_then(|mut lru| lru.touch(key));
        let counter = if found.is_some() { &self.hits } else { &self.misses };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// The image under `key` if it is cached, counted as a hit; a miss is not counted, because the
    /// caller goes on to [`Self::get_or_prepare`], which counts what happens next. For a lookup
    /// before work that a hit skips (the base64 decode of a `data:` URL).
    pub fn get_cached(&self, key: &ImageKey) -> Option<Arc<PreparedImage>> {
        if !self.enabled() {
            return None;
        }
        let found = self.lru.lock().ok().and_then(|mut lru| lru.touch(key));
        if found.is_some() {
            self.hits.fetch_add(1, Ordering::Relaxed);
        }
        found
    }

    /// The image under `key`: the cached one (a hit); else the one another thread is preparing now,
    /// waited for (coalesced: its error too, if it fails); else `prepare`'s, run here and stored on
    /// success (a miss; errors are not stored, so the next request tries again). Blocks, so call it
    /// off the async threads. When disabled it only runs `prepare` (nothing is stored to share).
    pub fn get_or_prepare(&self, key: ImageKey, prepare: impl FnOnce() -> Prepared) -> Prepared {
        if !self.enabled() {
            return prepare();
        }
        enum Role {
            Lead(Arc<Flight>),
            Wait(Arc<Flight>),
        }
        let role = {
            let Ok(mut lru) = self.lru.lock() else {
                // Poisoned by a panic under the lock: work uncached rather than trust its state.
                return prepare();
            };
            if let Some(hit) = lru.touch(&key) {
                drop(lru);
                self.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(hit);
            }
            match lru.in_flight.get(&key) {
                Some(flight) => Role::Wait(flight.clone()),
                None => {
                    let flight = Arc::new(Flight::default());
                    lru.in_flight.insert(key, flight.clone());
                    Role::Lead(flight)
                }
            }
        };
        match role {
            Role::Wait(theirs) => {
                self.coalesced.fetch_add(1, Ordering::Relaxed);
                theirs.wait()
            }
            Role::Lead(ours) => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                let mut leader = Leader { cache: self, key, flight: ours, result: None };
                let result = prepare();
                leader.result = Some(result.clone());
                drop(leader);
                result
            }
        }
    }

    /// Store a successfully prepared image (evicting the least recently used ones to stay within
    /// the bound); no-op when disabled or when the image alone exceeds the bound.
    pub fn insert(&self, key: ImageKey, image: Arc<PreparedImage>) {
        let mut evicted = Vec::new();
        if let Ok(mut lru) = self.lru.lock() {
            self.insert_locked(&mut lru, key, image, &mut evicted);
        }
        // `evicted` (possibly megabytes each) is freed here, after the lock is released.
        drop(evicted);
    }

    /// [`Self::insert`] under the caller's lock; the evicted images go to `evicted`, to be freed
    /// after the lock is released.
    fn insert_locked(
        &self,
        lru: &mut Lru,
        key: ImageKey,
        image: Arc<PreparedImage>,
        evicted: &mut Vec<Arc<PreparedImage>>,
    ) {
        let size = image.size_bytes() + ENTRY_OVERHEAD;
        if !self.enabled() || size > self.max_bytes {
            return;
        }
        lru.tick += 1;
        let tick = lru.tick;
        if let Some(old) = lru.map.insert(key, Entry { image, size, tick }) {
            lru.order.remove(&old.tick);
            lru.bytes -= old.size;
            evicted.push(old.image);
        }
        lru.order.insert(tick, key);
        lru.bytes += size;
        while lru.bytes > self.max_bytes {
            let Some((_, oldest)) = lru.order.pop_first() else { break };
            if let Some(e) = lru.map.remove(&oldest) {
                lru.bytes -= e.size;
                evicted.push(e.image);
                self.evictions.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub fn stats(&self) -> ImageCacheStats {
        let (bytes, entries) = self.lru.lock().map(|l| (l.bytes as u64, l.map.len() as u64)).unwrap_or_default();
        ImageCacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            coalesced: self.coalesced.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            bytes,
            entries,
            max_bytes: self.max_bytes as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preprocess::images::ImageProcessor;

    /// A PNG of `w` x `h` with pixels from `seed`.
    fn png(seed: u32, w: u32, h: u32) -> Vec<u8> {
        let data: Vec<u8> =
            (0..w * h * 3).map(|i| ((i.wrapping_mul(2654435761) ^ seed.wrapping_mul(40503)) >> 13) as u8).collect();
        let img = image::RgbImage::from_raw(w, h, data).unwrap();
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    fn prepare(cfg: &ImageConfig, bytes: &[u8], dtype: WireDtype) -> PreparedImage {
        let processed = ImageProcessor::new(cfg.clone()).process_bytes(bytes).unwrap();
        PreparedImage::new(processed, dtype, false)
    }

    fn cache(max_bytes: usize, cfg: &ImageConfig) -> ImageCache {
        ImageCache::new(max_bytes, settings_fingerprint(cfg, WireDtype::BFloat16, false))
    }

    #[test]
    fn hit_is_identical_to_a_fresh_computation() {
        let cfg = ImageConfig::default();
        let c = cache(64 << 20, &cfg);
        let bytes = png(1, 120, 90);
        let key = c.key(ImageSource::Bytes(&bytes));
        assert!(c.get(&key).is_none());
        c.insert(key, Arc::new(prepare(&cfg, &bytes, WireDtype::BFloat16)));
        let hit = c.get(&c.key(ImageSource::Bytes(&bytes))).expect("hit");
        let fresh = prepare(&cfg, &bytes, WireDtype::BFloat16);
        assert_eq!(*hit, fresh);
        assert_eq!(hit.num_tokens(), fresh.num_tokens());
        assert!(hit.data_url().starts_with("data:application/x-m3serve-pixels;v=1;dtype=bfloat16;grid=1x"));
        let s = c.stats();
        assert_eq!((s.hits, s.misses, s.entries), (1, 1, 1));
        assert_eq!(s.bytes as usize, hit.size_bytes() + ENTRY_OVERHEAD);
    }

    #[test]
    fn different_bytes_or_settings_miss() {
        let cfg = ImageConfig::default();
        let c = cache(64 << 20, &cfg);
        let (a, b) = (png(1, 120, 90), png(2, 120, 90));
        c.insert(c.key(ImageSource::Bytes(&a)), Arc::new(prepare(&cfg, &a, WireDtype::BFloat16)));
        assert!(c.get(&c.key(ImageSource::Bytes(&a))).is_some());
        assert!(c.get(&c.key(ImageSource::Bytes(&b))).is_none());
        // The same bytes as a data: URL text are another source.
        assert!(c.get(&c.key(ImageSource::DataUrl("data:image/png;base64,AAAA"))).is_none());

        // Every setting that changes the output changes the key.
        let key_under = |cfg: &ImageConfig, dtype: WireDtype, keep: bool| {
            ImageCache::new(1 << 20, settings_fingerprint(cfg, dtype, keep)).key(ImageSource::Bytes(&a))
        };
        let base = key_under(&cfg, WireDtype::BFloat16, false);
        assert_eq!(base, c.key(ImageSource::Bytes(&a)));
        let variants: Vec<ImageConfig> = vec![
            ImageConfig { policy: ResizePolicy::LongSide(2016), ..cfg.clone() },
            ImageConfig { min_pixels: cfg.min_pixels + 1, ..cfg.clone() },
            ImageConfig { max_pixels: 200_704, ..cfg.clone() },
            ImageConfig { patch_size: 16, ..cfg.clone() },
            ImageConfig { merge_size: 1, ..cfg.clone() },
            ImageConfig { temporal_patch_size: 1, ..cfg.clone() },
            ImageConfig { image_mean: [0.5; 3], ..cfg.clone() },
            ImageConfig { image_std: [0.5; 3], ..cfg.clone() },
            ImageConfig { rescale_factor: 1.0 / 256.0, ..cfg.clone() },
        ];
        for v in &variants {
            assert_ne!(key_under(v, WireDtype::BFloat16, false), base, "{v:?}");
        }
        assert_ne!(key_under(&cfg, WireDtype::Float32, false), base);
        assert_ne!(key_under(&cfg, WireDtype::BFloat16, true), base);
        // And the output does change for one of them, so sharing a key would be wrong.
        let small = ImageConfig { max_pixels: 56 * 56, ..cfg.clone() };
        assert_ne!(prepare(&small, &a, WireDtype::BFloat16).grid_thw, prepare(&cfg, &a, WireDtype::BFloat16).grid_thw);
    }

    #[test]
    fn byte_bound_evicts_least_recently_used() {
        let cfg = ImageConfig::default();
        let images: Vec<(Vec<u8>, Arc<PreparedImage>)> = (0..4)
            .map(|i| {
                let b = png(10 + i, 112, 112);
                let p = Arc::new(prepare(&cfg, &b, WireDtype::BFloat16));
                (b, p)
            })
            .collect();
        let one = images[0].1.size_bytes() + ENTRY_OVERHEAD;
        // Room for three of the four same-size images.
        let c = cache(3 * one + one / 2, &cfg);
        let key = |i: usize| c.key(ImageSource::Bytes(&images[i].0));
        for (i, (_, img)) in images.iter().enumerate().take(3) {
            c.insert(key(i), img.clone());
        }
        assert!(c.get(&key(0)).is_some()); // 0 is now the most recently used: 1 is the oldest
        c.insert(key(3), images[3].1.clone());
        let s = c.stats();
        assert_eq!((s.entries, s.evictions), (3, 1));
        assert!(s.bytes as usize <= 3 * one + one / 2);
        assert!(c.get(&key(1)).is_none(), "the least recently used image stays");
        for i in [0, 2, 3] {
            assert!(c.get(&key(i)).is_some(), "image {i} was evicted");
        }
        // An image larger than the whole bound is not stored (and evicts nothing).
        let tiny = cache(one / 2, &cfg);
        tiny.insert(key(0), images[0].1.clone());
        assert_eq!(tiny.stats().entries, 0);
    }

    #[test]
    fn disabled_cache_never_stores_or_counts() {
        let cfg = ImageConfig::default();
        let c = cache(0, &cfg);
        assert!(!c.enabled());
        let bytes = png(3, 64, 64);
        let key = c.key(ImageSource::Bytes(&bytes));
        c.insert(key, Arc::new(prepare(&cfg, &bytes, WireDtype::BFloat16)));
        assert!(c.get(&key).is_none());
        assert_eq!(c.stats(), ImageCacheStats::default());
    }

    #[test]
    fn concurrent_use_keeps_the_bound() {
        let cfg = ImageConfig::default();
        let imgs: Vec<(Vec<u8>, Arc<PreparedImage>)> = (0..6)
            .map(|i| {
                let b = png(20 + i, 84, 84);
                let p = Arc::new(prepare(&cfg, &b, WireDtype::BFloat16));
                (b, p)
            })
            .collect();
        let one = imgs[0].1.size_bytes() + ENTRY_OVERHEAD;
        let c = Arc::new(cache(2 * one + 1, &cfg));
        let imgs = Arc::new(imgs);
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let (c, imgs) = (c.clone(), imgs.clone());
                std::thread::spawn(move || {
                    for n in 0..500 {
                        let (bytes, img) = &imgs[(n * 7 + t) % imgs.len()];
                        let key = c.key(ImageSource::Bytes(bytes));
                        match c.get(&key) {
                            Some(hit) => assert!(Arc::ptr_eq(&hit, img) || *hit == **img),
                            None => c.insert(key, img.clone()),
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let s = c.stats();
        assert_eq!(s.hits + s.misses, 2000);
        assert!(s.bytes as usize <= 2 * one + 1 && s.entries <= 2, "{s:?}");
    }

    /// Waits (up to 10 s) until `n` threads wait on `c`'s preparation: a slow `prepare` that is
    /// still running when all the others have arrived, whatever the scheduler does.
    fn until_coalesced(c: &ImageCache, n: u64) {
        let start = std::time::Instant::now();
        while c.stats().coalesced < n && start.elapsed() < std::time::Duration::from_secs(10) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// Runs `f(i)` on `n` threads started together; their results in thread order, or a panic
    /// if one of them is not back within 20 s (a waiter nobody wakes).
    fn on_threads<T: Send + 'static>(n: usize, f: impl Fn(usize) -> T + Send + Sync + 'static) -> Vec<T> {
        let f = Arc::new(f);
        let barrier = Arc::new(std::sync::Barrier::new(n));
        let (tx, rx) = std::sync::mpsc::channel();
        for i in 0..n {
            let (f, barrier, tx) = (f.clone(), barrier.clone(), tx.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let _ = tx.send((i, f(i)));
            });
        }
        let mut out: Vec<Option<T>> = (0..n).map(|_| None).collect();
        for _ in 0..n {
            let (i, r) = rx.recv_timeout(std::time::Duration::from_secs(20)).expect("a thread never came back");
            out[i] = Some(r);
        }
        out.into_iter().map(Option::unwrap).collect()
    }

    #[test]
    fn concurrent_requests_for_a_new_image_prepare_it_once() {
        const N: usize = 8;
        let cfg = ImageConfig::default();
        let c = Arc::new(cache(64 << 20, &cfg));
        let bytes = png(30, 96, 64);
        let image = prepare(&cfg, &bytes, WireDtype::BFloat16);
        let key = c.key(ImageSource::Bytes(&bytes));
        // The fast lookup before a fetch counts a hit only: its miss is counted by what follows.
        assert!(c.get_cached(&key).is_none());
        assert_eq!(c.stats().misses, 0);
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let results = on_threads(N, {
            let (c, calls) = (c.clone(), calls.clone());
            move |_| {
                c.get_or_prepare(key, || {
                    calls.fetch_add(1, Ordering::SeqCst);
                    until_coalesced(&c, N as u64 - 1);
                    // A new allocation per call, so `ptr_eq` below tells whose result each got.
                    Ok(Arc::new(image.clone()))
                })
            }
        });
        assert_eq!(calls.load(Ordering::SeqCst), 1, "the image was prepared more than once");
        let first = results[0].as_ref().unwrap();
        for r in &results {
            assert!(Arc::ptr_eq(r.as_ref().unwrap(), first));
        }
        let s = c.stats();
        assert_eq!((s.misses, s.coalesced, s.hits, s.entries), (1, N as u64 - 1, 0, 1), "{s:?}");
        // Afterwards it is an ordinary hit, and nothing is left in flight.
        let hit = c.get_or_prepare(key, || panic!("prepared again")).unwrap();
        assert!(Arc::ptr_eq(&hit, first));
        assert!(Arc::ptr_eq(&c.get_cached(&key).unwrap(), first));
        assert_eq!(c.stats().hits, 2);
        assert!(c.lru.lock().unwrap().in_flight.is_empty());
    }

    #[test]
    fn a_failed_preparation_reaches_every_waiter_and_is_not_cached() {
        const N: usize = 8;
        let cfg = ImageConfig::default();
        let c = Arc::new(cache(64 << 20, &cfg));
        let key = c.key(ImageSource::DataUrl("data:image/png;base64,iVBORw0K"));
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let results = on_threads(N, {
            let (c, calls) = (c.clone(), calls.clone());
            move |_| {
                c.get_or_prepare(key, || {
                    calls.fetch_add(1, Ordering::SeqCst);
                    until_coalesced(&c, N as u64 - 1);
                    Err("truncated PNG".to_string())
                })
            }
        });
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        for r in &results {
            assert_eq!(r.as_ref().unwrap_err(), "truncated PNG");
        }
        let s = c.stats();
        assert_eq!((s.misses, s.coalesced, s.entries, s.bytes), (1, N as u64 - 1, 0, 0), "{s:?}");
        // The next request tries again (and may succeed: errors are never cached).
        let image = Arc::new(prepare(&cfg, &png(31, 64, 64), WireDtype::BFloat16));
        let again = c.get_or_prepare(key, || {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok(image.clone())
        });
        assert!(Arc::ptr_eq(&again.unwrap(), &image));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_panicking_leader_releases_its_waiters() {
        const N: usize = 6;
        let cfg = ImageConfig::default();
        let c = Arc::new(cache(64 << 20, &cfg));
        let key = c.key(ImageSource::Bytes(b"bytes that crash the decoder"));
        let results = on_threads(N, {
            let c = c.clone();
            move |_| {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    c.get_or_prepare(key, || {
                        until_coalesced(&c, N as u64 - 1);
                        panic!("decoder bug (expected by this test)")
                    })
                }))
            }
        });
        // One leader panicked; every waiter came back with an error (on_threads would have
        // timed out on one left waiting).
        assert_eq!(results.iter().filter(|r| r.is_err()).count(), 1);
        for r in results.iter().filter_map(|r| r.as_ref().ok()) {
            assert!(r.as_ref().unwrap_err().contains("failed unexpectedly"), "{r:?}");
        }
        assert_eq!(c.stats().coalesced, N as u64 - 1);
        assert!(c.lru.lock().unwrap().in_flight.is_empty());
        // The key is not stuck: the next request prepares it.
        let image = Arc::new(prepare(&cfg, &png(32, 64, 64), WireDtype::BFloat16));
        assert!(Arc::ptr_eq(&c.get_or_prepare(key, || Ok(image.clone())).unwrap(), &image));
        assert_eq!(c.stats().entries, 1);
    }

    #[test]
    fn different_images_are_prepared_in_parallel() {
        let cfg = ImageConfig::default();
        let c = Arc::new(cache(64 << 20, &cfg));
        let images: Arc<Vec<(ImageKey, Arc<PreparedImage>)>> = Arc::new(
            (0..2)
                .map(|i| {
                    let b = png(40 + i, 64, 64);
                    (c.key(ImageSource::Bytes(&b)), Arc::new(prepare(&cfg, &b, WireDtype::BFloat16)))
                })
                .collect(),
        );
        let inside = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let results = on_threads(2, {
            let (c, images, inside) = (c.clone(), images.clone(), inside.clone());
            move |i| {
                let mut overlapped = false;
                let image = c
                    .get_or_prepare(images[i].0, || {
                        // Each preparation waits (10 s at most) to see the other one running.
                        inside.fetch_add(1, Ordering::SeqCst);
                        let start = std::time::Instant::now();
                        while !overlapped && start.elapsed() < std::time::Duration::from_secs(10) {
                            overlapped = inside.load(Ordering::SeqCst) == 2;
                            std::thread::yield_now();
                        }
                        Ok(images[i].1.clone())
                    })
                    .unwrap();
                (overlapped, Arc::ptr_eq(&image, &images[i].1))
            }
        });
        assert_eq!(results, vec![(true, true); 2], "one image's preparation waited for the other's");
        let s = c.stats();
        assert_eq!((s.misses, s.coalesced, s.entries), (2, 0, 2), "{s:?}");
    }

    #[test]
    fn disabled_cache_runs_every_preparation() {
        let cfg = ImageConfig::default();
        let c = cache(0, &cfg);
        let key = c.key(ImageSource::Bytes(b"x"));
        let image = Arc::new(prepare(&cfg, &png(50, 64, 64), WireDtype::BFloat16));
        let mut calls = 0;
        for _ in 0..2 {
            let got = c.get_or_prepare(key, || {
                calls += 1;
                Ok(image.clone())
            });
            assert!(Arc::ptr_eq(&got.unwrap(), &image));
        }
        assert_eq!(calls, 2);
        assert_eq!(c.stats(), ImageCacheStats::default());
    }
}

#[cfg(test)]
mod timing {
    use super::*;
    use crate::preprocess::images::{best_of_15_ms, ImageProcessor};

    /// `M3_IMAGE=file cargo test --release -- --ignored --nocapture image_cache::timing`: where a
    /// miss and a hit of one image spend their time (best of 15, one thread).
    #[test]
    #[ignore]
    fn miss_and_hit_stages() {
        let Ok(path) = std::env::var("M3_IMAGE") else { return };
        let bytes = std::fs::read(path).unwrap();
        let url = format!(
            "data:image/jpeg;base64,{}",
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &bytes)
        );
        let cfg = ImageConfig::default();
        let p = ImageProcessor::new(cfg.clone());
        let c = ImageCache::new(256 << 20, settings_fingerprint(&cfg, WireDtype::BFloat16, false));
        let processed = p.process_bytes(&bytes).unwrap();
        let prepared = Arc::new(PreparedImage::new(processed.clone(), WireDtype::BFloat16, false));
        let key = c.key(ImageSource::DataUrl(&url));
        c.insert(key, prepared.clone());
        let t_b64 =
            best_of_15_ms(&mut || drop(crate::preprocess::images::fetch::decode_data_url(&url, 20 << 20).unwrap()));
        let t_proc = best_of_15_ms(&mut || drop(p.process_bytes(&bytes).unwrap()));
        let t_wire = best_of_15_ms(&mut || drop(PreparedImage::new(processed.clone(), WireDtype::BFloat16, false)));
        let t_clone = best_of_15_ms(&mut || drop(processed.clone()));
        let t_salt = best_of_15_ms(&mut || {
            std::hint::black_box(crate::preprocess::handoff::pixel_hash(&processed));
        });
        let t_key = best_of_15_ms(&mut || {
            std::hint::black_box(c.key(ImageSource::DataUrl(&url)));
        });
        let t_get = best_of_15_ms(&mut || drop(c.get(&key)));
        let t_json = best_of_15_ms(&mut || {
            let v = crate::preprocess::handoff::worker_image_data(std::slice::from_ref(&prepared)).unwrap();
            drop(serde_json::to_vec(&serde_json::json!({ "image_data": v })).unwrap())
        });
        // What the Python binding's `worker_image_data` costs now (the server copies nothing:
        // `server::generate::timing`).
        let t_json_now = best_of_15_ms(&mut || {
            drop(crate::preprocess::handoff::worker_image_data_json(std::slice::from_ref(&prepared)).unwrap())
        });
        eprintln!(
            "data URL {} B: base64 decode {t_b64:.2} ms, process {t_proc:.2} ms, hand-off encode {:.2} ms \
             (of which pixel hash {t_salt:.2}), key {t_key:.3} ms, lookup {t_get:.4} ms, \
             image_data into a JSON body via Value {t_json:.2} ms, as JSON text from the stored form {t_json_now:.2} ms",
            url.len(),
            t_wire - t_clone
        );
    }
}

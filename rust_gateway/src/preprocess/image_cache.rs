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

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

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

/// Counters, for metrics and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ImageCacheStats {
    pub hits: u64,
    pub misses: u64,
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

#[derive(Default)]
struct Lru {
    map: HashMap<ImageKey, Entry>,
    /// Recency: tick -> key, oldest first.
    order: BTreeMap<u64, ImageKey>,
    tick: u64,
    bytes: usize,
}

/// The cache; `Sync`, shared by all requests of a preprocessor.
pub struct ImageCache {
    max_bytes: usize,
    /// Hash of the settings that change a prepared image: part of every key.
    settings: [u8; 32],
    lru: Mutex<Lru>,
    hits: AtomicU64,
    misses: AtomicU64,
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
        let found = self.lru.lock().ok().and_then(|mut lru| {
            let lru = &mut *lru;
            lru.tick += 1;
            let entry = lru.map.get_mut(key)?;
            lru.order.remove(&entry.tick);
            entry.tick = lru.tick;
            lru.order.insert(lru.tick, *key);
            Some(entry.image.clone())
        });
        let counter = if found.is_some() { &self.hits } else { &self.misses };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// Store a successfully prepared image (evicting the least recently used ones to stay within
    /// the bound); no-op when disabled or when the image alone exceeds the bound.
    pub fn insert(&self, key: ImageKey, image: Arc<PreparedImage>) {
        let size = image.size_bytes() + ENTRY_OVERHEAD;
        if !self.enabled() || size > self.max_bytes {
            return;
        }
        let mut evicted = Vec::new();
        if let Ok(mut lru) = self.lru.lock() {
            let lru = &mut *lru;
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
        // `evicted` (possibly megabytes each) is freed here, after the lock is released.
        drop(evicted);
    }

    pub fn stats(&self) -> ImageCacheStats {
        let (bytes, entries) = self.lru.lock().map(|l| (l.bytes as u64, l.map.len() as u64)).unwrap_or_default();
        ImageCacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
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

//! M3 image preprocessing: bytes -> `pixel_values` rows + `image_grid_thw`, equal to the
//! Hugging Face `MiniMaxM3VLImageProcessor` (transformers `models/minimax_m3_vl/
//! image_processing_minimax_m3_vl.py`) within the tolerance stated in rust_gateway/README.md.
//!
//! Steps: decode to RGB8 ([`decode`]) -> `smart_resize` target (multiples of 28, area within
//! [min_pixels, max_pixels], aspect ratio <= 200) -> antialiased bicubic ([`resize`]) -> rescale
//! 1/255 + CLIP mean/std and 14x14 patches in 2x2-merge order, duplicated to 2 frames ([`patchify`]).
//! An image costs `grid_h * grid_w / 4` = H'W'/784 placeholder tokens.

pub mod decode;
pub mod fetch;
pub mod patchify;
pub mod resize;

use std::path::Path;

use serde_json::Value;

use decode::{decode_rgb, DecodeLimits, RgbImage};
use patchify::{patchify_into, NormalizeTable, PatchGeometry};

/// OpenAI CLIP normalization constants (HF `OPENAI_CLIP_MEAN` / `OPENAI_CLIP_STD`).
pub const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
pub const CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// How the target size is chosen (m3_architecture.md §7.3, ambiguity A6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizePolicy {
    /// HF processor: area in [min_pixels, max_pixels] (default 3,136 … 451,584 px, <= 576 tokens).
    HfArea,
    /// SGLang's serving default: long side <= N (2016), short side >= 112, multiples of 28.
    LongSide(u32),
}

/// Image settings, from the checkpoint's `preprocessor_config.json` when present.
#[derive(Debug, Clone)]
pub struct ImageConfig {
    pub min_pixels: u64,
    pub max_pixels: u64,
    pub patch_size: usize,
    pub merge_size: usize,
    pub temporal_patch_size: usize,
    pub image_mean: [f64; 3],
    pub image_std: [f64; 3],
    pub rescale_factor: f64,
    pub policy: ResizePolicy,
    pub limits: DecodeLimits,
}

impl Default for ImageConfig {
    fn default() -> Self {
        Self {
            min_pixels: 4 * 28 * 28,
            max_pixels: 451_584,
            patch_size: 14,
            merge_size: 2,
            temporal_patch_size: 2,
            image_mean: CLIP_MEAN,
            image_std: CLIP_STD,
            rescale_factor: 1.0 / 255.0,
            policy: ResizePolicy::HfArea,
            limits: DecodeLimits::default(),
        }
    }
}

impl ImageConfig {
    /// Read `preprocessor_config.json` if the checkpoint has one; HF's class defaults otherwise.
    pub fn load(model_dir: &Path) -> Result<Self, String> {
        let mut cfg = Self::default();
        let path = model_dir.join("preprocessor_config.json");
        if !path.exists() {
            return Ok(cfg);
        }
        let text = std::fs::read_to_string(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| format!("parsing {}: {e}", path.display()))?;
        cfg.apply(&v);
        Ok(cfg)
    }

    fn apply(&mut self, v: &Value) {
        let num = |k: &str| v.get(k).and_then(Value::as_f64);
        // `size` as {"shortest_edge", "longest_edge"} (pixels); the list form [672, 672] is a
        // known-wrong saved default that HF ignores, and so do we.
        if let Some(size) = v.get("size").and_then(Value::as_object) {
            if let Some(x) = size.get("shortest_edge").and_then(Value::as_u64) {
                self.min_pixels = x;
            }
            if let Some(x) = size.get("longest_edge").and_then(Value::as_u64) {
                self.max_pixels = x;
            }
        }
        if let Some(x) = v.get("min_pixels").and_then(Value::as_u64) {
            self.min_pixels = x;
        }
        if let Some(x) = v.get("max_pixels").and_then(Value::as_u64) {
            self.max_pixels = x;
        }
        if let Some(x) = num("patch_size") {
            self.patch_size = x as usize;
        }
        if let Some(x) = num("merge_size") {
            self.merge_size = x as usize;
        }
        if let Some(x) = num("temporal_patch_size") {
            self.temporal_patch_size = x as usize;
        }
        if let Some(x) = num("rescale_factor") {
            self.rescale_factor = x;
        }
        let triple = |k: &str| -> Option<[f64; 3]> {
            let a = v.get(k)?.as_array()?;
            Some([a.first()?.as_f64()?, a.get(1)?.as_f64()?, a.get(2)?.as_f64()?])
        };
        if let Some(m) = triple("image_mean") {
            self.image_mean = m;
        }
        if let Some(s) = triple("image_std") {
            self.image_std = s;
        }
    }

    pub fn factor(&self) -> usize {
        self.patch_size * self.merge_size
    }

    /// Target (height, width) for an image of `h` x `w`.
    pub fn target_size(&self, h: usize, w: usize) -> Result<(usize, usize), String> {
        match self.policy {
            ResizePolicy::HfArea => smart_resize(h, w, self.factor(), self.min_pixels, self.max_pixels),
            ResizePolicy::LongSide(n) => long_side_resize(h, w, self.factor(), n as usize),
        }
    }
}

fn check_aspect(h: usize, w: usize) -> Result<(), String> {
    let (lo, hi) = (h.min(w).max(1) as f64, h.max(w) as f64);
    if hi / lo > 200.0 {
        return Err(format!("image aspect ratio must be at most 200, got {:.1} ({w}x{h})", hi / lo));
    }
    Ok(())
}

/// HF `smart_resize` (Python `round` is round-half-to-even).
pub fn smart_resize(
    h: usize,
    w: usize,
    factor: usize,
    min_pixels: u64,
    max_pixels: u64,
) -> Result<(usize, usize), String> {
    check_aspect(h, w)?;
    let f = factor as f64;
    let (hf, wf) = (h as f64, w as f64);
    let mut hb = (hf / f).round_ties_even() * f;
    let mut wb = (wf / f).round_ties_even() * f;
    if hb * wb > max_pixels as f64 {
        let beta = (hf * wf / max_pixels as f64).sqrt();
        hb = f.max((hf / beta / f).floor() * f);
        wb = f.max((wf / beta / f).floor() * f);
    } else if hb * wb < min_pixels as f64 {
        let beta = (min_pixels as f64 / (hf * wf)).sqrt();
        hb = (hf * beta / f).ceil() * f;
        wb = (wf * beta / f).ceil() * f;
    }
    Ok((hb as usize, wb as usize))
}

/// SGLang 0.5.23's M3 serving size: long side capped at `max_long_side` (rounded down to the
/// factor), short side raised to 112 when possible, both rounded to the factor.
pub fn long_side_resize(h: usize, w: usize, factor: usize, max_long_side: usize) -> Result<(usize, usize), String> {
    const MIN_SHORT_SIDE: f64 = 112.0;
    check_aspect(h, w)?;
    let (hf, wf, f) = (h as f64, w as f64, factor as f64);
    let cap = (max_long_side - max_long_side % factor) as f64;
    let (long, short) = (hf.max(wf), hf.min(wf));
    let beta = if long > cap {
        cap / long
    } else if short < MIN_SHORT_SIDE {
        (MIN_SHORT_SIDE / short).min(cap / long)
    } else {
        1.0
    };
    let side = |x: f64| f.max((x * beta / f).round_ties_even() * f) as usize;
    Ok((side(hf), side(wf)))
}

/// One preprocessed image.
#[derive(Debug, Clone)]
pub struct ProcessedImage {
    /// `grid_h * grid_w` rows of `3 * temporal * patch * patch` floats, row-major.
    pub pixel_values: Vec<f32>,
    /// `[t, grid_h, grid_w]` in patches (t = 1 for a still image).
    pub grid_thw: [u32; 3],
    /// Size after resize, (height, width).
    pub resized_hw: (usize, usize),
    /// Size as decoded, (height, width).
    pub original_hw: (usize, usize),
    pub merge_size: usize,
}

impl ProcessedImage {
    /// Placeholder tokens this image takes in the prompt (between start and end of image).
    pub fn num_tokens(&self) -> usize {
        (self.grid_thw[0] * self.grid_thw[1] * self.grid_thw[2]) as usize / (self.merge_size * self.merge_size)
    }

    pub fn num_patches(&self) -> usize {
        (self.grid_thw[1] * self.grid_thw[2]) as usize
    }
}

/// The image pipeline with its normalization table precomputed.
pub struct ImageProcessor {
    pub config: ImageConfig,
    table: NormalizeTable,
}

impl std::fmt::Debug for ImageProcessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageProcessor").field("config", &self.config).finish()
    }
}

impl ImageProcessor {
    pub fn new(config: ImageConfig) -> Self {
        let table = NormalizeTable::new(config.image_mean, config.image_std, config.rescale_factor);
        Self { config, table }
    }

    /// Decode and preprocess encoded image bytes.
    pub fn process_bytes(&self, bytes: &[u8]) -> Result<ProcessedImage, String> {
        let img = decode_rgb(bytes, &self.config.limits)?;
        self.process_rgb(&img)
    }

    /// Decode and resize only: (resized RGB8, height, width) — for callers that patchify into their
    /// own buffer with [`Self::patchify_to`].
    pub fn decode_resize(&self, bytes: &[u8]) -> Result<(Vec<u8>, usize, usize), String> {
        let img = decode_rgb(bytes, &self.config.limits)?;
        let (th, tw) = self.config.target_size(img.height, img.width)?;
        if (th, tw) == (img.height, img.width) {
            return Ok((img.data, th, tw));
        }
        Ok((resize::resize_rgb8(&img.data, img.width, img.height, tw, th), th, tw))
    }

    pub fn geometry(&self) -> PatchGeometry {
        PatchGeometry {
            patch: self.config.patch_size,
            merge: self.config.merge_size,
            temporal: self.config.temporal_patch_size,
        }
    }

    /// Normalize + patchify a resized image into `out` (exactly `patchify::patchified_len` floats).
    pub fn patchify_to(&self, rgb: &[u8], h: usize, w: usize, out: &mut [f32]) -> [u32; 3] {
        let (gh, gw) = patchify::patchify_slice(rgb, w, h, self.geometry(), &self.table, out);
        [1, gh as u32, gw as u32]
    }

    /// [`Self::patchify_to`] into memory that need not be initialized; all of it is written.
    pub fn patchify_to_uninit(
        &self,
        rgb: &[u8],
        h: usize,
        w: usize,
        out: &mut [std::mem::MaybeUninit<f32>],
    ) -> [u32; 3] {
        let (gh, gw) = patchify::patchify_uninit(rgb, w, h, self.geometry(), &self.table, out);
        [1, gh as u32, gw as u32]
    }

    /// Preprocess an already decoded RGB8 image.
    pub fn process_rgb(&self, img: &RgbImage) -> Result<ProcessedImage, String> {
        let (th, tw) = self.config.target_size(img.height, img.width)?;
        let resized;
        let pixels = if (th, tw) == (img.height, img.width) {
            &img.data
        } else {
            resized = resize::resize_rgb8(&img.data, img.width, img.height, tw, th);
            &resized
        };
        let geometry = PatchGeometry {
            patch: self.config.patch_size,
            merge: self.config.merge_size,
            temporal: self.config.temporal_patch_size,
        };
        let mut pixel_values = Vec::new();
        let (gh, gw) = patchify_into(pixels, tw, th, geometry, &self.table, &mut pixel_values);
        Ok(ProcessedImage {
            pixel_values,
            grid_thw: [1, gh as u32, gw as u32],
            resized_hw: (th, tw),
            original_hw: (img.height, img.width),
            merge_size: self.config.merge_size,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smart_resize_matches_hf_examples() {
        // Values computed with transformers' smart_resize.
        assert_eq!(smart_resize(1080, 1920, 28, 3136, 451_584).unwrap(), (504, 896));
        assert_eq!(smart_resize(42, 70, 28, 3136, 451_584).unwrap(), (56, 56));
        assert_eq!(smart_resize(224, 224, 28, 3136, 451_584).unwrap(), (224, 224));
        assert!(smart_resize(10, 2100, 28, 3136, 451_584).unwrap_err().contains("aspect ratio"));
    }

    #[test]
    fn long_side_matches_sglang_examples() {
        assert_eq!(long_side_resize(1080, 1920, 28, 2016).unwrap(), (1092, 1932));
        assert_eq!(long_side_resize(2016, 2016, 28, 2016).unwrap(), (2016, 2016));
    }

    #[test]
    fn tokens_per_image() {
        let p = ImageProcessor::new(ImageConfig::default());
        let img = RgbImage { width: 1920, height: 1080, data: vec![128; 1920 * 1080 * 3] };
        let out = p.process_rgb(&img).unwrap();
        assert_eq!(out.grid_thw, [1, 36, 64]);
        assert_eq!(out.num_tokens(), 504 * 896 / 784);
        assert_eq!(out.pixel_values.len(), 36 * 64 * 1176);
    }
}

/// Best of 15 runs of `f`, in ms: the timing tests' measure (ignored tests, run by hand).
#[cfg(test)]
pub(crate) fn best_of_15_ms(f: &mut dyn FnMut()) -> f64 {
    (0..15)
        .map(|_| {
            let t = std::time::Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .fold(f64::MAX, f64::min)
}

#[cfg(test)]
mod timing {
    use super::*;

    /// `cargo test --release -- --ignored --nocapture timing`: where one 1080p image's time goes.
    #[test]
    #[ignore]
    fn stages_of_a_1080p_image() {
        let (w, h) = (1920usize, 1080usize);
        let data: Vec<u8> = (0..w * h * 3).map(|i| ((i * 2654435761usize) >> 13) as u8).collect();
        let img = RgbImage { width: w, height: h, data };
        let p = ImageProcessor::new(ImageConfig::default());
        for _ in 0..3 {
            let t = std::time::Instant::now();
            let mid = resize::horizontal_pass(&img.data, w, h, 896);
            let t_h = t.elapsed();
            let resized = resize::vertical_pass(&mid, 896, h, 504);
            let t_resize = t.elapsed();
            eprintln!("horizontal {t_h:?}");
            let t = std::time::Instant::now();
            let mut out = Vec::new();
            let geometry = PatchGeometry { patch: 14, merge: 2, temporal: 2 };
            patchify_into(&resized, 896, 504, geometry, &p.table, &mut out);
            let t_patch = t.elapsed();
            eprintln!("resize {t_resize:?} patchify {t_patch:?} ({} floats)", out.len());
        }
    }

    /// `M3_IMAGE_DIR=dir cargo test --release -- --ignored --nocapture stages_of_files`: decode,
    /// resize and patchify times (best of 15) of every image file in `dir`.
    #[test]
    #[ignore]
    fn stages_of_files() {
        let Ok(dir) = std::env::var("M3_IMAGE_DIR") else { return };
        let p = ImageProcessor::new(ImageConfig::default());
        let mut paths: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
        paths.sort();
        for path in paths {
            let bytes = std::fs::read(&path).unwrap();
            if decode::sniff(&bytes).is_err() {
                continue;
            }
            let img = decode_rgb(&bytes, &p.config.limits).unwrap();
            let (th, tw) = p.config.target_size(img.height, img.width).unwrap();
            let t_dec = best_of_15_ms(&mut || drop(decode_rgb(&bytes, &p.config.limits).unwrap()));
            let t_res = best_of_15_ms(&mut || drop(resize::resize_rgb8(&img.data, img.width, img.height, tw, th)));
            let resized = resize::resize_rgb8(&img.data, img.width, img.height, tw, th);
            let t_pat = best_of_15_ms(&mut || {
                let mut out = Vec::new();
                patchify_into(&resized, tw, th, p.geometry(), &p.table, &mut out);
            });
            eprintln!(
                "{}: decode {t_dec:.2} ms, resize {}x{} -> {tw}x{th} {t_res:.2} ms, patchify {t_pat:.2} ms",
                path.file_name().unwrap().to_string_lossy(),
                img.width,
                img.height
            );
        }
    }
}

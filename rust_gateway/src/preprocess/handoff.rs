//! The image hand-off to the SGLang worker: already-preprocessed pixels, so the worker neither
//! decodes nor resizes again.
//!
//! Wire format: `image_data` of the worker's `/generate` is a list with one string per image, in
//! prompt order, each a data URL of our own media type whose parameters say how to read it:
//!
//! ```text
//! data:application/x-m3serve-pixels;v=1;dtype=float32;grid=1x36x64;base64,<rows, little-endian>
//! ```
//!
//! `grid` is `t x grid_h x grid_w` (the image's `image_grid_thw`), the payload holds
//! `t*grid_h*grid_w` rows of `3*2*14*14 = 1176` values (`dtype` float32 or bfloat16), laid out as the
//! HF M3 processor's `pixel_values`. `input_ids` already hold the expanded placeholders
//! (start-of-image, N image tokens, end-of-image per image).
//!
//! Why strings: SGLang 0.5.23's `/generate` contract gate (`sglang.api.v1.api_types`) admits image
//! items only as strings or `{url, ...}` objects, so a `processor_output` dict cannot be posted, and
//! JSON cannot carry tensors anyway. The worker-side plugin hook
//! (`python/m3serve/plugin/mm_handoff.py`) turns these strings into the single `processor_output`
//! item (tensors) that SGLang's M3 processor passes through without loading, resizing or running
//! the HF image processor.

use base64::Engine;
use serde_json::Value;

use super::images::ProcessedImage;

/// Element type of `pixel_values` on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireDtype {
    /// Exact: the values the HF processor computes.
    Float32,
    /// Half the bytes; rounded to nearest-even exactly like `tensor.to(torch.bfloat16)`, which
    /// is what the worker does to float32 features when the model runs in bf16.
    BFloat16,
}

impl WireDtype {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "float32" | "fp32" => Some(Self::Float32),
            "bfloat16" | "bf16" => Some(Self::BFloat16),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Float32 => "float32",
            Self::BFloat16 => "bfloat16",
        }
    }
}

/// float32 -> bfloat16 bits, round to nearest, ties to even (NaN stays NaN).
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) as u16) | 0x0040;
    }
    let rounding = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(rounding) >> 16) as u16
}

/// Raw little-endian bytes of all images' rows, concatenated in prompt order.
pub fn pixel_bytes(images: &[ProcessedImage], dtype: WireDtype) -> Vec<u8> {
    let total: usize = images.iter().map(|i| i.pixel_values.len()).sum();
    let mut out = Vec::with_capacity(total * if dtype == WireDtype::Float32 { 4 } else { 2 });
    for img in images {
        match dtype {
            WireDtype::Float32 => out.extend_from_slice(f32_le_bytes(&img.pixel_values).as_ref()),
            WireDtype::BFloat16 => {
                let bits: Vec<u16> = img.pixel_values.iter().map(|v| f32_to_bf16_bits(*v).to_le()).collect();
                out.extend_from_slice(bytemuck::cast_slice(&bits));
            }
        }
    }
    out
}

/// The little-endian bytes of `values`: a free view on little-endian machines.
pub fn f32_le_bytes(values: &[f32]) -> std::borrow::Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        std::borrow::Cow::Borrowed(bytemuck::cast_slice(values))
    } else {
        std::borrow::Cow::Owned(values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }
}

/// Media type of the hand-off data URLs.
pub const WIRE_MEDIA_TYPE: &str = "application/x-m3serve-pixels";

/// One image as a hand-off data URL (see the module docs).
pub fn image_data_url(image: &ProcessedImage, dtype: WireDtype) -> String {
    let [t, h, w] = image.grid_thw;
    let header = format!("data:{WIRE_MEDIA_TYPE};v=1;dtype={};grid={t}x{h}x{w};base64,", dtype.name());
    // The rows' bytes without a second copy, base64-encoded straight into a string of exact size.
    let bf16: Vec<u16>;
    let f32_bytes;
    let raw: &[u8] = match dtype {
        WireDtype::Float32 => {
            f32_bytes = f32_le_bytes(&image.pixel_values);
            &f32_bytes
        }
        WireDtype::BFloat16 => {
            bf16 = image.pixel_values.iter().map(|v| f32_to_bf16_bits(*v).to_le()).collect();
            bytemuck::cast_slice(&bf16)
        }
    };
    let mut out = String::with_capacity(header.len() + base64::encoded_len(raw.len(), true).unwrap_or(0));
    out.push_str(&header);
    base64::engine::general_purpose::STANDARD.encode_string(raw, &mut out);
    out
}

/// One image of a request in the form the request path needs: the hand-off data URL (already
/// encoded), the grid and token count for the prompt, a pixel hash for routing, and, only where
/// asked for (Python API, tests), the float32 rows. Shared through `Arc` with the image cache
/// ([`super::image_cache`]), so a repeated image costs no decode, resize, patchify or encoding.
#[derive(Debug, Clone, PartialEq)]
pub struct PreparedImage {
    /// `[t, grid_h, grid_w]` in patches.
    pub grid_thw: [u32; 3],
    pub merge_size: usize,
    /// Size after resize and as decoded, (height, width).
    pub resized_hw: (usize, usize),
    pub original_hw: (usize, usize),
    /// Element type of [`Self::data_url`].
    pub wire_dtype: WireDtype,
    /// The hand-off data URL ([`image_data_url`]) for the worker's `image_data`.
    pub data_url: String,
    /// 64-bit hash of the pixel values and grid: tells images apart in prefix routing.
    pub pixel_hash: u64,
    /// The float32 `pixel_values` rows, when kept (`PreprocessConfig::keep_pixel_values`).
    pub pixel_values: Option<Vec<f32>>,
}

impl PreparedImage {
    /// Encode a processed image for the worker (the expensive part after patchify: bf16 rounding
    /// and base64 of ~5 MB for a 576-token image).
    pub fn new(image: ProcessedImage, dtype: WireDtype, keep_pixel_values: bool) -> Self {
        let mut data_url = image_data_url(&image, dtype);
        data_url.shrink_to_fit();
        Self {
            grid_thw: image.grid_thw,
            merge_size: image.merge_size,
            resized_hw: image.resized_hw,
            original_hw: image.original_hw,
            wire_dtype: dtype,
            pixel_hash: pixel_hash(&image),
            data_url,
            pixel_values: keep_pixel_values.then_some(image.pixel_values),
        }
    }

    /// Placeholder tokens this image takes in the prompt.
    pub fn num_tokens(&self) -> usize {
        (self.grid_thw[0] * self.grid_thw[1] * self.grid_thw[2]) as usize / (self.merge_size * self.merge_size)
    }

    pub fn num_patches(&self) -> usize {
        (self.grid_thw[1] * self.grid_thw[2]) as usize
    }

    /// Heap and inline bytes this image holds (what the image cache counts against its bound).
    pub fn size_bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.data_url.capacity()
            + self.pixel_values.as_ref().map_or(0, |p| p.capacity() * std::mem::size_of::<f32>())
    }
}

/// Routing salt of an image: every 7th value of its rows, and its grid.
pub fn pixel_hash(image: &ProcessedImage) -> u64 {
    let bytes: Vec<u8> = image.pixel_values.iter().step_by(7).flat_map(|x| x.to_le_bytes()).collect();
    xxhash_rust::xxh3::xxh3_64(&bytes) ^ u64::from(image.grid_thw[1]) << 32 ^ u64::from(image.grid_thw[2])
}

/// The `image_data` list for the worker's `/generate` (None when the request has no image).
pub fn worker_image_data(images: &[std::sync::Arc<PreparedImage>]) -> Option<Value> {
    if images.is_empty() {
        return None;
    }
    Some(Value::Array(images.iter().map(|i| Value::String(i.data_url.clone())).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_url_is_header_plus_base64_of_the_rows() {
        let values: Vec<f32> = (0..2 * 1176).map(|i| (i as f32 * 0.37).sin() * 2.5).collect();
        let image = ProcessedImage {
            pixel_values: values,
            grid_thw: [1, 2, 1],
            resized_hw: (28, 14),
            original_hw: (28, 14),
            merge_size: 2,
        };
        for dtype in [WireDtype::Float32, WireDtype::BFloat16] {
            let want = format!(
                "data:{WIRE_MEDIA_TYPE};v=1;dtype={};grid=1x2x1;base64,{}",
                dtype.name(),
                base64::engine::general_purpose::STANDARD.encode(pixel_bytes(std::slice::from_ref(&image), dtype))
            );
            let got = image_data_url(&image, dtype);
            assert_eq!(got, want);
            assert_eq!(got.capacity(), got.len());
        }
    }

    #[test]
    fn bf16_rounding_is_nearest_even() {
        assert_eq!(f32_to_bf16_bits(1.0), 0x3f80);
        // 1 + 2^-8 is exactly half way between two bf16 values: ties to even (down).
        assert_eq!(f32_to_bf16_bits(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3 * 2^-8 is half way too: ties to even (up).
        assert_eq!(f32_to_bf16_bits(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(f32_to_bf16_bits(-2.0), 0xc000);
    }
}

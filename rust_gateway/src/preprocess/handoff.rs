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
    let data = base64::engine::general_purpose::STANDARD.encode(pixel_bytes(std::slice::from_ref(image), dtype));
    format!("data:{WIRE_MEDIA_TYPE};v=1;dtype={};grid={t}x{h}x{w};base64,{data}", dtype.name())
}

/// The `image_data` list for the worker's `/generate` (None when the request has no image).
pub fn worker_image_data(images: &[ProcessedImage], dtype: WireDtype) -> Option<Value> {
    if images.is_empty() {
        return None;
    }
    Some(Value::Array(images.iter().map(|i| Value::String(image_data_url(i, dtype))).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

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

//! The image hand-off to the SGLang worker: already-preprocessed pixels, so the worker neither
//! decodes nor resizes again.
//!
//! Wire format (`image_data` of the worker's `/generate`, one item for all images of the request,
//! because SGLang accepts exactly one `processor_output` item per modality):
//!
//! ```json
//! {"format": "processor_output",
//!  "modality": "IMAGE",
//!  "m3serve_pixels": "v1",
//!  "pixel_values": {"dtype": "float32" | "bfloat16", "shape": [rows, 1176], "data": "<base64, little-endian>"},
//!  "image_grid_thw": [[1, grid_h, grid_w], ...]}
//! ```
//!
//! `input_ids` already hold the expanded placeholders (start-of-image, N image tokens,
//! end-of-image per image). SGLang 0.5.23 takes `processor_output` items as they are, except
//! that JSON cannot carry tensors: `python/m3serve/plugin/mm_handoff.py` turns `pixel_values` and
//! `image_grid_thw` into tensors before the M3 processor sees the item (see its docstring).

use base64::Engine;
use serde_json::{json, Value};

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
            WireDtype::Float32 => {
                for v in &img.pixel_values {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
            WireDtype::BFloat16 => {
                for v in &img.pixel_values {
                    out.extend_from_slice(&f32_to_bf16_bits(*v).to_le_bytes());
                }
            }
        }
    }
    out
}

/// The `image_data` list for the worker's `/generate` (None when the request has no image).
pub fn worker_image_data(images: &[ProcessedImage], dtype: WireDtype) -> Option<Value> {
    let first = images.first()?;
    let row_len = first.pixel_values.len() / first.num_patches().max(1);
    let rows: usize = images.iter().map(ProcessedImage::num_patches).sum();
    let data = base64::engine::general_purpose::STANDARD.encode(pixel_bytes(images, dtype));
    let grids: Vec<Value> = images.iter().map(|i| json!(i.grid_thw)).collect();
    Some(json!([{
        "format": "processor_output",
        "modality": "IMAGE",
        "m3serve_pixels": "v1",
        "pixel_values": {"dtype": dtype.name(), "shape": [rows, row_len], "data": data},
        "image_grid_thw": grids,
    }]))
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

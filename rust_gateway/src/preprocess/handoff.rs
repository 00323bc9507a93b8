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
    encode_data_url(image, dtype, "")
}

/// The data URL between two `quote`s (`"` gives its JSON string form, which needs no escaping:
/// the header's characters and base64's alphabet are all plain printable ASCII).
fn encode_data_url(image: &ProcessedImage, dtype: WireDtype, quote: &str) -> String {
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
    let mut out =
        String::with_capacity(2 * quote.len() + header.len() + base64::encoded_len(raw.len(), true).unwrap_or(0));
    out.push_str(quote);
    out.push_str(&header);
    base64::engine::general_purpose::STANDARD.encode_string(raw, &mut out);
    out.push_str(quote);
    out
}

/// `s` is its own JSON string body: serde_json escapes only `"`, `\\` and control characters.
fn json_safe(s: &str) -> bool {
    s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\')
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
    /// The hand-off data URL ([`image_data_url`]) in JSON string form (between double quotes;
    /// nothing escaped, checked once here), so a request writes it into the worker's `/generate`
    /// body without re-encoding or copying it ([`Self::data_url_json`]).
    data_url_json: String,
    /// 64-bit hash of the pixel values and grid: tells images apart in prefix routing.
    pub pixel_hash: u64,
    /// The float32 `pixel_values` rows, when kept (`PreprocessConfig::keep_pixel_values`).
    pub pixel_values: Option<Vec<f32>>,
}

impl PreparedImage {
    /// Encode a processed image for the worker (the expensive part after patchify: bf16 rounding
    /// and base64 of ~5 MB for a 576-token image).
    pub fn new(image: ProcessedImage, dtype: WireDtype, keep_pixel_values: bool) -> Self {
        let data_url_json = encode_data_url(&image, dtype, "\"");
        // The header (dtype name, grid numbers) must need no escaping; base64 never does.
        let header_end = data_url_json.find(";base64,").expect("hand-off header");
        assert!(json_safe(&data_url_json[1..header_end]), "hand-off header needs JSON escaping");
        debug_assert!(json_safe(&data_url_json[1..data_url_json.len() - 1]));
        Self {
            grid_thw: image.grid_thw,
            merge_size: image.merge_size,
            resized_hw: image.resized_hw,
            original_hw: image.original_hw,
            wire_dtype: dtype,
            pixel_hash: pixel_hash(&image),
            data_url_json,
            pixel_values: keep_pixel_values.then_some(image.pixel_values),
        }
    }

    /// The hand-off data URL ([`image_data_url`]) for the worker's `image_data`.
    pub fn data_url(&self) -> &str {
        &self.data_url_json[1..self.data_url_json.len() - 1]
    }

    /// [`Self::data_url`] as a JSON string (quoted), exactly what `serde_json` writes for it.
    pub fn data_url_json(&self) -> &str {
        &self.data_url_json
    }

    /// [`Self::data_url_json`] as `Bytes` sharing this image's memory (no copy): an HTTP body
    /// chunk that keeps the image alive until sent.
    pub fn data_url_json_bytes(self: &std::sync::Arc<Self>) -> bytes::Bytes {
        bytes::Bytes::from_owner(JsonOf(self.clone()))
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
            + self.data_url_json.capacity()
            + self.pixel_values.as_ref().map_or(0, |p| p.capacity() * std::mem::size_of::<f32>())
    }
}

/// Owner of a [`PreparedImage::data_url_json_bytes`] chunk.
struct JsonOf(std::sync::Arc<PreparedImage>);

impl AsRef<[u8]> for JsonOf {
    fn as_ref(&self) -> &[u8] {
        self.0.data_url_json.as_bytes()
    }
}

/// Routing salt of an image: every 7th value of its rows, and its grid.
pub fn pixel_hash(image: &ProcessedImage) -> u64 {
    let bytes: Vec<u8> = image.pixel_values.iter().step_by(7).flat_map(|x| x.to_le_bytes()).collect();
    xxhash_rust::xxh3::xxh3_64(&bytes) ^ u64::from(image.grid_thw[1]) << 32 ^ u64::from(image.grid_thw[2])
}

/// The `image_data` list for the worker's `/generate` as a `serde_json::Value` (None when the
/// request has no image). Copies every data URL: the server and the Python binding write
/// [`worker_image_data_json`] / [`PreparedImage::data_url_json_bytes`] instead.
pub fn worker_image_data(images: &[std::sync::Arc<PreparedImage>]) -> Option<Value> {
    if images.is_empty() {
        return None;
    }
    Some(Value::Array(images.iter().map(|i| Value::String(i.data_url().to_string())).collect()))
}

/// The `image_data` list as JSON text, the same text `serde_json::to_string` gives for
/// [`worker_image_data`], built from the stored JSON strings (one copy each, no escaping pass).
pub fn worker_image_data_json(images: &[std::sync::Arc<PreparedImage>]) -> Option<String> {
    if images.is_empty() {
        return None;
    }
    let mut out = String::with_capacity(1 + images.iter().map(|i| i.data_url_json.len() + 1).sum::<usize>());
    out.push('[');
    for (k, image) in images.iter().enumerate() {
        if k > 0 {
            out.push(',');
        }
        out.push_str(&image.data_url_json);
    }
    out.push(']');
    Some(out)
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
    fn stored_json_form_is_what_serde_json_writes() {
        let image = |seed: usize, h: u32| ProcessedImage {
            pixel_values: (0..h as usize * 1176).map(|i| ((i * 31 + seed) as f32 * 0.11).cos() * 2.0).collect(),
            grid_thw: [1, h, 1],
            resized_hw: (14 * h as usize, 14),
            original_hw: (14 * h as usize, 14),
            merge_size: 2,
        };
        for dtype in [WireDtype::Float32, WireDtype::BFloat16] {
            let shapes = [(1, 2), (2, 4), (1, 2)];
            let images: Vec<std::sync::Arc<PreparedImage>> = shapes
                .iter()
                .map(|&(seed, h)| std::sync::Arc::new(PreparedImage::new(image(seed, h), dtype, false)))
                .collect();
            for (img, &(seed, h)) in images.iter().zip(&shapes) {
                assert_eq!(img.data_url(), image_data_url(&image(seed, h), dtype));
                assert_eq!(img.data_url_json(), serde_json::to_string(img.data_url()).unwrap());
                assert_eq!(img.data_url_json_bytes().as_ref(), img.data_url_json().as_bytes());
            }
            for k in 0..=images.len() {
                let old = worker_image_data(&images[..k]).map(|v| v.to_string());
                assert_eq!(worker_image_data_json(&images[..k]), old);
            }
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

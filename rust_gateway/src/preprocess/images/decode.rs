//! Image bytes -> RGB8, refusing what we cannot or should not decode.
//!
//! Order of checks, cheapest first: format from the magic bytes (JPEG, PNG, WebP, GIF; anything
//! else is named and refused), structural completeness (a truncated file is an error, not a
//! half-grey picture), dimensions from the header *before* decoding (decompression bombs and
//! absurd sizes never allocate), then the decode itself under an allocation limit.

use std::io::Cursor;

use image::{ImageFormat, ImageReader, Limits};

/// Limits on one decoded image.
#[derive(Debug, Clone, Copy)]
pub struct DecodeLimits {
    /// Largest width or height, in pixels.
    pub max_side: u32,
    /// Largest width * height.
    pub max_pixels: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        // 8k x 5k photographs pass; a 100k x 100k PNG bomb does not.
        Self { max_side: 16_384, max_pixels: 50_000_000 }
    }
}

/// A decoded image, interleaved RGB8.
#[derive(Debug, Clone)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

/// Recognize the container from its first bytes.
pub fn sniff(bytes: &[u8]) -> Result<ImageFormat, String> {
    if bytes.is_empty() {
        return Err("empty image data".into());
    }
    let starts = |m: &[u8]| bytes.starts_with(m);
    if starts(&[0xFF, 0xD8, 0xFF]) {
        Ok(ImageFormat::Jpeg)
    } else if starts(b"\x89PNG\r\n\x1a\n") {
        Ok(ImageFormat::Png)
    } else if starts(b"GIF87a") || starts(b"GIF89a") {
        Ok(ImageFormat::Gif)
    } else if bytes.len() >= 12 && starts(b"RIFF") && &bytes[8..12] == b"WEBP" {
        Ok(ImageFormat::WebP)
    } else {
        let known = if starts(b"BM") {
            "BMP"
        } else if starts(b"II*\0") || starts(b"MM\0*") {
            "TIFF"
        } else if bytes.len() >= 12 && &bytes[4..8] == b"ftyp" {
            "HEIF/AVIF"
        } else if starts(b"<svg") || starts(b"<?xml") {
            "SVG"
        } else if starts(&[0, 0, 1, 0]) {
            "ICO"
        } else {
            "unknown"
        };
        Err(format!("unsupported image format ({known}); supported: JPEG, PNG, WebP, GIF"))
    }
}

/// Structural check that the file is complete; decoders often paper over truncation.
fn check_complete(bytes: &[u8], format: ImageFormat) -> Result<(), String> {
    let tail = |n: usize| &bytes[bytes.len().saturating_sub(n)..];
    let (complete, what) = match format {
        // The end-of-image marker; some writers append a few padding bytes after it.
        ImageFormat::Jpeg => (tail(64).windows(2).any(|w| w == [0xFF, 0xD9]), "JPEG"),
        ImageFormat::Png => (tail(64).windows(4).any(|w| w == b"IEND"), "PNG"),
        ImageFormat::Gif => (tail(16).contains(&0x3B), "GIF"),
        ImageFormat::WebP => {
            let declared = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) as usize + 8;
            (bytes.len() >= declared, "WebP")
        }
        _ => (true, ""),
    };
    if complete {
        Ok(())
    } else {
        Err(format!("truncated {what} data ({} bytes)", bytes.len()))
    }
}

/// Header dimensions without decoding pixels.
pub fn dimensions(bytes: &[u8], format: ImageFormat) -> Result<(u32, u32), String> {
    ImageReader::with_format(Cursor::new(bytes), format)
        .into_dimensions()
        .map_err(|e| format!("invalid {format:?} header: {e}"))
}

/// Decode to RGB8 (alpha dropped, palette and grey expanded, like PIL's `convert("RGB")`;
/// for GIF the first frame).
pub fn decode_rgb(bytes: &[u8], limits: &DecodeLimits) -> Result<RgbImage, String> {
    let format = sniff(bytes)?;
    check_complete(bytes, format)?;
    let (w, h) = dimensions(bytes, format)?;
    if w == 0 || h == 0 {
        return Err(format!("image has zero size ({w}x{h})"));
    }
    if w > limits.max_side || h > limits.max_side || u64::from(w) * u64::from(h) > limits.max_pixels {
        return Err(format!(
            "image is {w}x{h} pixels; the limit is {} per side and {} pixels in total",
            limits.max_side, limits.max_pixels
        ));
    }
    if format == ImageFormat::WebP {
        if let Some(img) = decode_webp_still(bytes, w as usize, h as usize) {
            return Ok(img);
        }
        // Animated or otherwise unusual files: the image crate's decoder (first frame) below.
    }
    if format == ImageFormat::Gif {
        if let Some(img) = decode_gif_plain(bytes, w as usize, h as usize) {
            return Ok(img);
        }
        // Frames with transparency or smaller than the screen: composited by the image crate.
    }
    decode_with_image_crate(bytes, format, limits)
}

/// The general path: the image crate's decoder under an allocation limit, then RGB8.
fn decode_with_image_crate(bytes: &[u8], format: ImageFormat, limits: &DecodeLimits) -> Result<RgbImage, String> {
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut lim = Limits::default();
    lim.max_image_width = Some(limits.max_side);
    lim.max_image_height = Some(limits.max_side);
    // Room for the largest allowed image at 16 bits per channel with alpha.
    lim.max_alloc = Some(limits.max_pixels * 8 + (1 << 20));
    reader.limits(lim);
    let img = reader.decode().map_err(|e| format!("could not decode {format:?} image: {e}"))?;
    let rgb = img.into_rgb8();
    let (width, height) = (rgb.width() as usize, rgb.height() as usize);
    Ok(RgbImage { width, height, data: rgb.into_raw() })
}

/// A still WebP (lossy or lossless, alpha dropped) through libwebp, the decoder Pillow uses: about
/// 2x faster than the pure-Rust image-webp, with the same pixels. `None` for what libwebp's simple
/// API refuses (animations), which then go through the image crate.
fn decode_webp_still(bytes: &[u8], width: usize, height: usize) -> Option<RgbImage> {
    let (mut w, mut h) = (0, 0);
    // SAFETY: libwebp reads at most `bytes.len()` bytes from the pointer and writes the two ints.
    let ok = unsafe { libwebp_sys::WebPGetInfo(bytes.as_ptr(), bytes.len(), &mut w, &mut h) };
    if ok == 0 || (w as usize, h as usize) != (width, height) {
        return None;
    }
    let stride = width * 3;
    let mut data = vec![0u8; stride * height];
    // SAFETY: `data` holds `height` rows of `stride` bytes, the size and stride passed; libwebp
    // writes only inside it and returns null on any error.
    let out = unsafe {
        libwebp_sys::WebPDecodeRGBInto(bytes.as_ptr(), bytes.len(), data.as_mut_ptr(), data.len(), stride as i32)
    };
    (!out.is_null()).then_some(RgbImage { width, height, data })
}

/// The first GIF frame when it covers the whole screen and has no transparent index: LZW to palette
/// indices, then one table lookup per pixel (what PIL's `convert("RGB")` of the P image does),
/// skipping the image crate's RGBA canvas and compositing. `None` for anything else.
fn decode_gif_plain(bytes: &[u8], width: usize, height: usize) -> Option<RgbImage> {
    let mut options = gif::DecodeOptions::new();
    options.set_color_output(gif::ColorOutput::Indexed);
    let mut decoder = options.read_info(bytes).ok()?;
    if (usize::from(decoder.width()), usize::from(decoder.height())) != (width, height) {
        return None;
    }
    let global = decoder.global_palette().map(<[u8]>::to_vec);
    let frame = decoder.next_frame_info().ok()??;
    let full =
        frame.left == 0 && frame.top == 0 && (usize::from(frame.width), usize::from(frame.height)) == (width, height);
    if !full || frame.transparent.is_some() {
        return None;
    }
    let palette = frame.palette.clone().or(global)?;
    let mut indices = vec![0u8; width * height];
    decoder.read_into_buffer(&mut indices).ok()?;
    let entries = palette.len() / 3;
    if indices.iter().any(|&i| usize::from(i) >= entries) {
        return None;
    }
    let mut table = [[0u8; 3]; 256];
    for (t, c) in table.iter_mut().zip(palette.chunks_exact(3)) {
        t.copy_from_slice(c);
    }
    let mut data = vec![0u8; width * height * 3];
    for (px, &i) in data.chunks_exact_mut(3).zip(&indices) {
        px.copy_from_slice(&table[usize::from(i)]);
    }
    Some(RgbImage { width, height, data })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crc32(data: &[u8]) -> u32 {
        let mut crc = 0xFFFF_FFFFu32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
            }
        }
        !crc
    }

    fn encode_gif(w: u16, h: u16, interlaced: bool, transparent: Option<u8>) -> Vec<u8> {
        let palette: Vec<u8> = (0..17u8).flat_map(|i| [i * 15, 255 - i * 7, i.wrapping_mul(91)]).collect();
        let pixels: Vec<u8> = (0..usize::from(w) * usize::from(h)).map(|i| ((i * 7 + i / 13) % 17) as u8).collect();
        let mut frame = gif::Frame::from_indexed_pixels(w, h, pixels, transparent);
        frame.interlaced = interlaced;
        let mut out = Vec::new();
        {
            let mut enc = gif::Encoder::new(&mut out, w, h, &palette).unwrap();
            enc.write_frame(&frame).unwrap();
        }
        out
    }

    #[test]
    fn plain_gif_path_equals_image_crate() {
        for (w, h, interlaced) in [(40, 30, false), (33, 57, true), (1, 1, false)] {
            let bytes = encode_gif(w, h, interlaced, None);
            let fast = decode_gif_plain(&bytes, usize::from(w), usize::from(h)).expect("plain GIF");
            let slow = decode_with_image_crate(&bytes, ImageFormat::Gif, &DecodeLimits::default()).unwrap();
            assert_eq!((fast.width, fast.height), (slow.width, slow.height));
            assert_eq!(fast.data, slow.data, "{w}x{h} interlaced={interlaced}");
        }
        // A transparent index is left to the image crate.
        assert!(decode_gif_plain(&encode_gif(8, 8, false, Some(3)), 8, 8).is_none());
    }

    #[test]
    fn names_unsupported_formats() {
        assert!(sniff(b"BM....").unwrap_err().contains("BMP"));
        assert!(sniff(b"hello").unwrap_err().contains("unknown"));
        assert!(sniff(b"").unwrap_err().contains("empty"));
    }

    #[test]
    fn refuses_bomb_before_decoding() {
        // A PNG header claiming 100000 x 100000 pixels followed by nothing useful.
        let mut ihdr = b"IHDR".to_vec();
        ihdr.extend_from_slice(&100_000u32.to_be_bytes());
        ihdr.extend_from_slice(&100_000u32.to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
        let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\r".to_vec();
        png.extend_from_slice(&ihdr);
        png.extend_from_slice(&crc32(&ihdr).to_be_bytes());
        // An (empty) IDAT chunk: header readers want to see the first one.
        png.extend_from_slice(b"\0\0\0\0IDAT");
        png.extend_from_slice(&crc32(b"IDAT").to_be_bytes());
        png.extend_from_slice(b"\0\0\0\0IEND\xaeB`\x82");
        let err = decode_rgb(&png, &DecodeLimits::default()).unwrap_err();
        assert!(err.contains("100000x100000"), "{err}");
    }
}

//! Antialiased bicubic resize of 8-bit RGB, computed the way the Hugging Face M3 image processor
//! gets it: torchvision `resize(uint8, BICUBIC, antialias=True)`, which runs PyTorch's
//! Pillow-derived separable convolution (`upsample_avx_bilinear_bicubic_uint8`).
//!
//! Scheme (our own implementation of the published algorithm): the Keys cubic with a = -0.5,
//! stretched by the downscale factor so it also low-passes; weights normalized per output
//! pixel, then quantized to int16 with the largest precision that keeps the biggest weight below
//! 2^15; the horizontal pass runs first into an 8-bit intermediate (rounded, clamped), then the
//! vertical pass. Reproducing the quantization and pass order is what makes the pixels match.

/// Quantized filter taps for one axis.
struct Taps {
    /// First input index of every output position.
    start: Vec<usize>,
    /// Number of taps of every output position (<= `ksize`).
    len: Vec<usize>,
    /// `ksize` weights per output position, fixed point with `precision` fractional bits.
    weights: Vec<i32>,
    ksize: usize,
    precision: u32,
}

fn keys_cubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

fn taps(in_size: usize, out_size: usize) -> Taps {
    let scale = in_size as f64 / out_size as f64;
    let (support, inv_scale) = if scale >= 1.0 { (2.0 * scale, 1.0 / scale) } else { (2.0, 1.0) };
    let ksize = support.ceil() as usize * 2 + 1;
    let mut start = Vec::with_capacity(out_size);
    let mut len = Vec::with_capacity(out_size);
    let mut float_w = vec![0.0f64; out_size * ksize];
    for i in 0..out_size {
        let center = scale * (i as f64 + 0.5);
        // `as i64` truncates toward zero, as the C++ cast does.
        let lo = ((center - support + 0.5) as i64).max(0) as usize;
        let hi = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = hi.saturating_sub(lo).min(ksize);
        let w = &mut float_w[i * ksize..i * ksize + n];
        let mut total = 0.0;
        for (j, wj) in w.iter_mut().enumerate() {
            *wj = keys_cubic((j as f64 + lo as f64 - center + 0.5) * inv_scale);
            total += *wj;
        }
        if total != 0.0 {
            for wj in w.iter_mut() {
                *wj /= total;
            }
        }
        start.push(lo);
        len.push(n);
    }
    let w_max = float_w.iter().cloned().fold(f64::MIN, f64::max);
    let mut precision = 0u32;
    while precision < 22 {
        let next = (0.5 + w_max * f64::from(1u32 << (precision + 1))) as i64;
        if next >= 1 << 15 {
            break;
        }
        precision += 1;
    }
    let factor = f64::from(1u32 << precision);
    let weights = float_w
        .iter()
        .map(|&w| {
            let v = w * factor;
            (if v < 0.0 { v - 0.5 } else { v + 0.5 }) as i32
        })
        .collect();
    Taps { start, len, weights, ksize, precision }
}

#[inline(always)]
fn clamp_shift(acc: i32, precision: u32) -> u8 {
    (acc >> precision).clamp(0, 255) as u8
}

/// Resize interleaved RGB8 `src` (`w` x `h`) to `ow` x `oh`.
pub fn resize_rgb8(src: &[u8], w: usize, h: usize, ow: usize, oh: usize) -> Vec<u8> {
    assert_eq!(src.len(), w * h * 3, "source buffer does not match its dimensions");
    if (w, h) == (ow, oh) {
        return src.to_vec();
    }
    let horizontal = if ow != w { Some(horizontal_pass(src, w, h, ow)) } else { None };
    let (mid, mid_w) = match &horizontal {
        Some(buf) => (buf.as_slice(), ow),
        None => (src, w),
    };
    if oh == h {
        return mid.to_vec();
    }
    vertical_pass(mid, mid_w, h, oh)
}

/// Rows convolved together: with the tile transposed to [x][row][channel], every tap is one
/// contiguous 24-lane multiply-accumulate, which the compiler turns into SIMD.
const TILE_ROWS: usize = 8;
const TILE_LANES: usize = TILE_ROWS * 3;

pub(crate) fn horizontal_pass(src: &[u8], w: usize, h: usize, ow: usize) -> Vec<u8> {
    let t = taps(w, ow);
    let mut out = vec![0u8; ow * h * 3];
    let tiled_rows = h / TILE_ROWS * TILE_ROWS;
    // One spare byte: pixels move as 4-byte words, the 4th byte overwritten by the next pixel.
    let mut tile = vec![0u8; w * TILE_LANES + 1];
    for y0 in (0..tiled_rows).step_by(TILE_ROWS) {
        let rows: [&[u8]; TILE_ROWS] = std::array::from_fn(|r| &src[(y0 + r) * w * 3..(y0 + r + 1) * w * 3]);
        for x in 0..w - 1 {
            let dst = &mut tile[x * TILE_LANES..x * TILE_LANES + TILE_LANES + 1];
            for (r, row) in rows.iter().enumerate() {
                let word: [u8; 4] = row[x * 3..x * 3 + 4].try_into().expect("4 bytes");
                dst[r * 3..r * 3 + 4].copy_from_slice(&word);
            }
        }
        // The last pixel of a row has no 4th byte to read.
        let (x, dst) = (w - 1, &mut tile[(w - 1) * TILE_LANES..w * TILE_LANES]);
        for (r, row) in rows.iter().enumerate() {
            dst[r * 3..r * 3 + 3].copy_from_slice(&row[x * 3..x * 3 + 3]);
        }
        horizontal_tile(&t, &tile, &mut out, y0, ow);
    }
    horizontal_rows(&t, &src[tiled_rows * w * 3..], w, &mut out[tiled_rows * ow * 3..], ow);
    out
}

/// Runs `horizontal_tile_body` compiled for AVX2 when the CPU has it (the x86-64 baseline has no
/// 32-bit vector multiply, so the portable build of this loop is several times slower).
fn horizontal_tile(t: &Taps, tile: &[u8], out: &mut [u8], y0: usize, ow: usize) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        unsafe { horizontal_tile_avx2(t, tile, out, y0, ow) };
        return;
    }
    horizontal_tile_body(t, tile, out, y0, ow);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn horizontal_tile_avx2(t: &Taps, tile: &[u8], out: &mut [u8], y0: usize, ow: usize) {
    use std::arch::x86_64::*;
    // Two taps per step with `pmaddwd`: the bytes of taps k and k+1 are interleaved into 16-bit
    // pairs and multiplied by the (w_k, w_k+1) pair, summed exactly in 32 bits — the same integer
    // sum as one multiply-add per tap, so the pixels do not change.
    let half = 1i32 << (t.precision - 1).min(31);
    let shift = _mm_cvtsi32_si128(t.precision as i32);
    let mut packed = [0u8; 32];
    for x in 0..ow {
        let (lo, n) = (t.start[x], t.len[x]);
        let ws = &t.weights[x * t.ksize..x * t.ksize + n];
        let block = &tile[lo * TILE_LANES..(lo + n) * TILE_LANES];
        let (mut a0, mut a1, mut a2) = (_mm256_set1_epi32(half), _mm256_set1_epi32(half), _mm256_set1_epi32(half));
        let mut k = 0;
        while k < n {
            let p = block[k * TILE_LANES..].as_ptr();
            // The last odd tap pairs with itself at weight 0 (no read past the block).
            let (q, w1) = if k + 1 < n { (p.add(TILE_LANES), ws[k + 1]) } else { (p, 0) };
            let wv = _mm256_set1_epi32((w1 << 16) | (ws[k] & 0xFFFF));
            // SAFETY: `p` and `q` point at full 24-byte tile entries inside `block`; the loads
            // read bytes 0..16 and 16..24 of each.
            let (pa, qa) = (_mm_loadu_si128(p as *const __m128i), _mm_loadu_si128(q as *const __m128i));
            let (pb, qb) = (_mm_loadl_epi64(p.add(16) as *const __m128i), _mm_loadl_epi64(q.add(16) as *const __m128i));
            let m0 = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(pa, qa));
            let m1 = _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(pa, qa));
            let m2 = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(pb, qb));
            a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(m0, wv));
            a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(m1, wv));
            a2 = _mm256_add_epi32(a2, _mm256_madd_epi16(m2, wv));
            k += 2;
        }
        // Arithmetic shift, then saturating packs i32 -> i16 -> u8: the same as clamp(0, 255).
        let (a0, a1, a2) = (_mm256_sra_epi32(a0, shift), _mm256_sra_epi32(a1, shift), _mm256_sra_epi32(a2, shift));
        let w0 = _mm_packs_epi32(_mm256_castsi256_si128(a0), _mm256_extracti128_si256(a0, 1));
        let w1 = _mm_packs_epi32(_mm256_castsi256_si128(a1), _mm256_extracti128_si256(a1, 1));
        let w2 = _mm_packs_epi32(_mm256_castsi256_si128(a2), _mm256_extracti128_si256(a2, 1));
        let dst = packed.as_mut_ptr() as *mut __m128i;
        _mm_storeu_si128(dst, _mm_packus_epi16(w0, w1));
        _mm_storeu_si128(dst.add(1), _mm_packus_epi16(w2, w2));
        for r in 0..TILE_ROWS {
            let o = ((y0 + r) * ow + x) * 3;
            out[o..o + 3].copy_from_slice(&packed[r * 3..r * 3 + 3]);
        }
    }
}

#[inline(always)]
fn horizontal_tile_body(t: &Taps, tile: &[u8], out: &mut [u8], y0: usize, ow: usize) {
    let half = 1i32 << (t.precision - 1).min(31);
    for x in 0..ow {
        let (lo, n) = (t.start[x], t.len[x]);
        let ws = &t.weights[x * t.ksize..x * t.ksize + n];
        let mut acc = [half; TILE_LANES];
        for (&wk, px) in ws.iter().zip(tile[lo * TILE_LANES..(lo + n) * TILE_LANES].chunks_exact(TILE_LANES)) {
            let px: &[u8; TILE_LANES] = px.try_into().expect("chunks_exact gives full tiles");
            for (a, &p) in acc.iter_mut().zip(px) {
                *a += i32::from(p) * wk;
            }
        }
        for r in 0..TILE_ROWS {
            let o = &mut out[((y0 + r) * ow + x) * 3..((y0 + r) * ow + x) * 3 + 3];
            for c in 0..3 {
                o[c] = clamp_shift(acc[r * 3 + c], t.precision);
            }
        }
    }
}

/// The plain per-row convolution (rows that do not fill a tile; also the tests' reference).
fn horizontal_rows(t: &Taps, src: &[u8], w: usize, out: &mut [u8], ow: usize) {
    let half = 1i32 << (t.precision - 1).min(31);
    for (row_in, row_out) in src.chunks_exact(w * 3).zip(out.chunks_exact_mut(ow * 3)) {
        for x in 0..ow {
            let lo = t.start[x];
            let n = t.len[x];
            let ws = &t.weights[x * t.ksize..x * t.ksize + n];
            let px = &row_in[lo * 3..(lo + n) * 3];
            let (mut r, mut g, mut b) = (half, half, half);
            for (wk, p) in ws.iter().zip(px.chunks_exact(3)) {
                r += i32::from(p[0]) * wk;
                g += i32::from(p[1]) * wk;
                b += i32::from(p[2]) * wk;
            }
            let o = &mut row_out[x * 3..x * 3 + 3];
            o[0] = clamp_shift(r, t.precision);
            o[1] = clamp_shift(g, t.precision);
            o[2] = clamp_shift(b, t.precision);
        }
    }
}

pub(crate) fn vertical_pass(src: &[u8], w: usize, h: usize, oh: usize) -> Vec<u8> {
    let t = taps(h, oh);
    let stride = w * 3;
    let mut out = vec![0u8; stride * oh];
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        unsafe { vertical_avx2(&t, src, stride, &mut out) };
        return out;
    }
    vertical_body(&t, src, stride, &mut out);
    out
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn vertical_avx2(t: &Taps, src: &[u8], stride: usize, out: &mut [u8]) {
    use std::arch::x86_64::*;
    // 32 output bytes at a time, accumulators in registers, two source rows per `pmaddwd`
    // (bytes of rows k and k+1 interleaved into 16-bit pairs): exact integer sums as in
    // `vertical_body`, so the pixels are identical.
    let half = 1i32 << (t.precision - 1).min(31);
    let shift = _mm_cvtsi32_si128(t.precision as i32);
    let main = stride / 32 * 32;
    for (y, row_out) in out.chunks_exact_mut(stride).enumerate() {
        let lo = t.start[y];
        let n = t.len[y];
        let ws = &t.weights[y * t.ksize..y * t.ksize + n];
        let mut x = 0;
        while x < main {
            let mut acc = [_mm256_set1_epi32(half); 4];
            let mut k = 0;
            while k < n {
                let p = src[(lo + k) * stride + x..].as_ptr();
                let (q, w1) = if k + 1 < n { (p.add(stride), ws[k + 1]) } else { (p, 0) };
                let wv = _mm256_set1_epi32((w1 << 16) | (ws[k] & 0xFFFF));
                // SAFETY: x + 32 <= stride, so both 32-byte loads stay inside rows k and k+1.
                let a = _mm256_loadu_si256(p as *const __m256i);
                let b = _mm256_loadu_si256(q as *const __m256i);
                // unpack works per 128-bit lane: lo = bytes 0..8 and 16..24, hi = 8..16 and 24..32.
                let il = _mm256_unpacklo_epi8(a, b);
                let ih = _mm256_unpackhi_epi8(a, b);
                let zero = _mm256_setzero_si256();
                let l0 = _mm256_unpacklo_epi8(il, zero);
                let l1 = _mm256_unpackhi_epi8(il, zero);
                let h0 = _mm256_unpacklo_epi8(ih, zero);
                let h1 = _mm256_unpackhi_epi8(ih, zero);
                // l0: bytes 0..4 | 16..20, l1: 4..8 | 20..24, h0: 8..12 | 24..28, h1: 12..16 | 28..32.
                acc[0] = _mm256_add_epi32(acc[0], _mm256_madd_epi16(l0, wv));
                acc[1] = _mm256_add_epi32(acc[1], _mm256_madd_epi16(l1, wv));
                acc[2] = _mm256_add_epi32(acc[2], _mm256_madd_epi16(h0, wv));
                acc[3] = _mm256_add_epi32(acc[3], _mm256_madd_epi16(h1, wv));
                k += 2;
            }
            let s0 = _mm256_sra_epi32(acc[0], shift);
            let s1 = _mm256_sra_epi32(acc[1], shift);
            let s2 = _mm256_sra_epi32(acc[2], shift);
            let s3 = _mm256_sra_epi32(acc[3], shift);
            // packs per 128-bit lane undoes the unpack order: (s0, s1) -> bytes 0..8 | 16..24,
            // (s2, s3) -> 8..16 | 24..32; packus of the two puts every byte back in place.
            let p01 = _mm256_packs_epi32(s0, s1);
            let p23 = _mm256_packs_epi32(s2, s3);
            let bytes = _mm256_packus_epi16(p01, p23);
            _mm256_storeu_si256(row_out[x..].as_mut_ptr() as *mut __m256i, bytes);
            x += 32;
        }
        for (xi, o) in row_out.iter_mut().enumerate().skip(main) {
            let mut acc = half;
            for (k, &wk) in ws.iter().enumerate() {
                acc += i32::from(src[(lo + k) * stride + xi]) * wk;
            }
            *o = clamp_shift(acc, t.precision);
        }
    }
}

#[inline(always)]
fn vertical_body(t: &Taps, src: &[u8], stride: usize, out: &mut [u8]) {
    let half = 1i32 << (t.precision - 1).min(31);
    let mut acc = vec![0i32; stride];
    for (y, row_out) in out.chunks_exact_mut(stride).enumerate() {
        acc.fill(half);
        let lo = t.start[y];
        let ws = &t.weights[y * t.ksize..y * t.ksize + t.len[y]];
        for (k, &wk) in ws.iter().enumerate() {
            let row = &src[(lo + k) * stride..(lo + k + 1) * stride];
            // Whole-row multiply-accumulate: the compiler vectorizes this loop.
            for (a, &p) in acc.iter_mut().zip(row) {
                *a += i32::from(p) * wk;
            }
        }
        for (o, &a) in row_out.iter_mut().zip(&acc) {
            *o = clamp_shift(a, t.precision);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for (i, o) in [(1920, 896), (100, 28), (28, 56), (7, 3), (3000, 28)] {
            let t = taps(i, o);
            for x in 0..o {
                let s: i32 = t.weights[x * t.ksize..x * t.ksize + t.len[x]].iter().sum();
                let one = 1i32 << t.precision;
                assert!((s - one).abs() <= t.len[x] as i32, "{i}->{o} at {x}: {s} vs {one}");
            }
        }
    }

    #[test]
    fn tiled_pass_equals_per_row_pass() {
        for (w, h, ow) in [(97, 21, 40), (30, 17, 61), (1920, 24, 896)] {
            let src: Vec<u8> = (0..w * h * 3).map(|i| ((i * 2654435761usize) >> 11) as u8).collect();
            let t = taps(w, ow);
            let mut want = vec![0u8; ow * h * 3];
            horizontal_rows(&t, &src, w, &mut want, ow);
            assert_eq!(horizontal_pass(&src, w, h, ow), want, "{w}x{h} -> {ow}");
        }
    }

    #[test]
    fn vertical_pass_equals_scalar_body() {
        for (w, h, oh) in [(45, 97, 40), (11, 30, 61), (896, 1080, 504)] {
            let src: Vec<u8> = (0..w * h * 3).map(|i| ((i * 2654435761usize) >> 11) as u8).collect();
            let t = taps(h, oh);
            let mut want = vec![0u8; w * 3 * oh];
            vertical_body(&t, &src, w * 3, &mut want);
            assert_eq!(vertical_pass(&src, w, h, oh), want, "{w}x{h} -> {oh}");
        }
    }

    #[test]
    fn constant_image_stays_constant() {
        let src = vec![77u8; 50 * 40 * 3];
        let out = resize_rgb8(&src, 50, 40, 28, 56);
        assert!(out.iter().all(|&v| v == 77));
    }
}

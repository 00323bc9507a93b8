//! Rescale + normalize + patch layout of a resized RGB8 image, as the HF M3 processor produces
//! `pixel_values`.
//!
//! Normalization: HF fuses rescale into normalize, computing in float32
//! `(x - mean*255) / (std*255)` with `mean*255` and `std*255` rounded to float32; a 256-entry
//! table per channel gives bit-identical values.
//!
//! Layout (`patchify` in image_processing_minimax_m3_vl.py): rows are patches in 2x2-merge-block
//! order — for every block row, block column, then the 2x2 patches inside the block row-major —
//! and each row is `[channel(3)][temporal(2)][py(14)][px(14)]`, the still image duplicated along
//! the temporal axis.

use std::mem::MaybeUninit;

/// Per-channel lookup: u8 value -> normalized float32.
pub struct NormalizeTable {
    lut: [[f32; 256]; 3],
}

impl NormalizeTable {
    pub fn new(mean: [f64; 3], std: [f64; 3], rescale_factor: f64) -> Self {
        let mut lut = [[0f32; 256]; 3];
        // HF: mean / rescale_factor and std / rescale_factor as float32 tensors (1/(1/255) in f64
        // first, then a float32 multiply, as torch does for tensor * python float).
        let inv = (1.0 / rescale_factor) as f32;
        for c in 0..3 {
            let m = (mean[c] as f32) * inv;
            let s = (std[c] as f32) * inv;
            for (v, out) in lut[c].iter_mut().enumerate() {
                *out = (v as f32 - m) / s;
            }
        }
        Self { lut }
    }
}

/// Geometry of the patch grid.
#[derive(Debug, Clone, Copy)]
pub struct PatchGeometry {
    pub patch: usize,
    pub merge: usize,
    pub temporal: usize,
}

impl PatchGeometry {
    pub fn row_len(&self) -> usize {
        3 * self.temporal * self.patch * self.patch
    }
}

/// Patchify `rgb` (`w` x `h`, both multiples of patch*merge) into `out` (appended).
/// Returns (grid_h, grid_w) in patches.
pub fn patchify_into(
    rgb: &[u8],
    w: usize,
    h: usize,
    g: PatchGeometry,
    table: &NormalizeTable,
    out: &mut Vec<f32>,
) -> (usize, usize) {
    let n = (h / g.patch) * (w / g.patch) * g.row_len();
    let base = out.len();
    if base == 0 {
        // Fresh zeroed pages straight from the allocator (calloc): no separate zero-fill pass.
        *out = vec![0.0; n];
    } else {
        out.resize(base + n, 0.0);
    }
    patchify_slice(rgb, w, h, g, table, &mut out[base..])
}

/// Number of floats `patchify_slice` writes for a `w` x `h` image.
pub fn patchified_len(w: usize, h: usize, g: PatchGeometry) -> usize {
    (h / g.patch) * (w / g.patch) * g.row_len()
}

/// Patchify into a caller-provided slice of exactly [`patchified_len`] floats.
pub fn patchify_slice(
    rgb: &[u8],
    w: usize,
    h: usize,
    g: PatchGeometry,
    table: &NormalizeTable,
    out: &mut [f32],
) -> (usize, usize) {
    // SAFETY: `MaybeUninit<f32>` has the layout of `f32`, and the function writes only floats.
    let out = unsafe { &mut *(out as *mut [f32] as *mut [MaybeUninit<f32>]) };
    patchify_uninit(rgb, w, h, g, table, out)
}

/// Patchify into memory that need not be initialized (a fresh Python bytes object, say): every
/// one of the [`patchified_len`] floats is written, so the caller may treat it as initialized.
pub fn patchify_uninit(
    rgb: &[u8],
    w: usize,
    h: usize,
    g: PatchGeometry,
    table: &NormalizeTable,
    out: &mut [MaybeUninit<f32>],
) -> (usize, usize) {
    let (p, m, t) = (g.patch, g.merge, g.temporal);
    assert!(w.is_multiple_of(p * m) && h.is_multiple_of(p * m), "image {w}x{h} is not a multiple of {}", p * m);
    let (gh, gw) = (h / p, w / p);
    let row_len = g.row_len();
    assert_eq!(out.len(), gh * gw * row_len, "output slice does not fit the patch grid");
    let mut dst = out;
    let stride = w * 3;
    for bh in 0..gh / m {
        for bw in 0..gw / m {
            for mh in 0..m {
                for mw in 0..m {
                    let (prow, pcol) = (bh * m + mh, bw * m + mw);
                    let (row, rest) = dst.split_at_mut(row_len);
                    dst = rest;
                    // Channel planes of this patch row: [c][t][py][px]; fill t = 0, then copy.
                    let plane = t * p * p;
                    for py in 0..p {
                        let y = prow * p + py;
                        let src = &rgb[y * stride + pcol * p * 3..y * stride + (pcol + 1) * p * 3];
                        let (r, rest) = row.split_at_mut(plane);
                        let (gr, b) = rest.split_at_mut(plane);
                        let (r, gr, b) =
                            (&mut r[py * p..(py + 1) * p], &mut gr[py * p..(py + 1) * p], &mut b[py * p..(py + 1) * p]);
                        for (((px, r), gr), b) in src.chunks_exact(3).zip(r).zip(gr).zip(b) {
                            r.write(table.lut[0][px[0] as usize]);
                            gr.write(table.lut[1][px[1] as usize]);
                            b.write(table.lut[2][px[2] as usize]);
                        }
                    }
                    // The still image fills every temporal slot.
                    for c in 0..3 {
                        let ch = &mut row[c * plane..(c + 1) * plane];
                        let (first, others) = ch.split_at_mut(p * p);
                        for slot in others.chunks_exact_mut(p * p) {
                            slot.copy_from_slice(first);
                        }
                    }
                }
            }
        }
    }
    (gh, gw)
}

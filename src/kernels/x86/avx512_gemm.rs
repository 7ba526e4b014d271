//! AVX-512 VNNI kernels for [`gemm`](crate::kernels::gemm) on the quantized types.
//!
//! Both operands are repacked into [`Panel`]s of 16 scale groups side by side (sub-blocks of the
//! K-quants, blocks of Q8_0/Q4_0), transposed so that lane t of `q[v]` holds values 4v..4v+4 of
//! group t. One `vpdpbusd` then advances all 16 groups' integer dot products by 4 values, and the
//! sums come out one group per i32 lane, ready for a per-lane float scale: the inner loop has no
//! unpacking, no shuffles and no horizontal sums, only `V` `vpdpbusd`, a convert, a multiply of
//! the two panels' scales and an FMA (plus one for the mins of Q4_K/Q5_K) per pair of panels.
//! The activations are repacked once per call, each weight row once (in its tile).
//!
//! Integer sums stay within i32 (at most 32 products of 255 by 128 per lane) and match gemv's;
//! the float work differs in order only.

use std::arch::x86_64::*;

use half::f16;
use rayon::prelude::*;

use crate::kernels::blocks::*;
use crate::kernels::gemm::{tiles_par, SharedOut};
use crate::kernels::reference;

/// 16 scale groups of `4 * V` values, transposed (see the module docs), with per-group factors.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub struct Panel<const V: usize> {
    /// Lane t (bytes 4t..4t+4) of `q[v]`: values 4v..4v+4 of group t. Unsigned for the operand
    /// `vpdpbusd` takes unsigned (weights, or Q8_0's activations offset by 128), else i8.
    q: [[u8; 64]; V],
    /// The group's scale: weights' `d * sub-block scale` (or `d`), activations' `d`.
    scale: [f32; 16],
    /// Per type (see [`Kind`]): the f32 factors of the mins term, the i32 offset term to start
    /// the integer sums from, or unused (zero).
    extra: [u32; 16],
}

impl<const V: usize> Panel<V> {
    const ZERO: Self = Panel {
        q: [[0; 64]; V],
        scale: [0.0; 16],
        extra: [0; 16],
    };

    /// Sets lane `t`'s values.
    fn put(&mut self, t: usize, values: impl Fn(usize) -> u8) {
        for (v, q) in self.q.iter_mut().enumerate() {
            for e in 0..4 {
                q[4 * t + e] = values(4 * v + e);
            }
        }
    }
}

/// Scale group `t` of a row of panels: (panel, lane).
fn lane<const V: usize>(panels: &mut [Panel<V>], t: usize) -> (&mut Panel<V>, usize) {
    (&mut panels[t / 16], t % 16)
}

/// How a weight type maps onto panels of `V` vectors.
pub trait Kind<const V: usize> {
    type Block: Sync;
    /// Scale groups per block.
    const GROUPS: usize;
    /// Q8_0: the weights are signed, so the activations go in offset by 128 as the unsigned
    /// operand and the weight panels' `extra` holds `-128 * sum of the group's weights`.
    const SIGNED_W: bool;
    /// The activation panels' `extra` holds the offset term of unsigned weights (Q6_K's 32,
    /// Q4_0's 8): `-offset * sum of the group's activations`.
    const A_OFFSET: bool;
    /// Q4_K/Q5_K: both `extra`s hold f32 factors of the mins term, `-dmin * min` and
    /// `d * sum of the group's activations`.
    const MINS: bool;
    /// One weight row's panels (`out.len()` of them).
    fn pack_weights(w: &[Self::Block], out: &mut [Panel<V>]);
    /// One activation row, quantized as gemv does, into panels.
    fn pack_acts(x: &[f32], out: &mut [Panel<V>]);
}

/// Panels per row of `blocks` blocks of `K`.
fn panels<K: Kind<V>, const V: usize>(blocks: usize) -> usize {
    (blocks * K::GROUPS).div_ceil(16)
}

/// Clears the last panel of a row, the only one with lanes past the data (left at zero, they add
/// nothing); the others are written whole.
fn clear_tail<const V: usize>(out: &mut [Panel<V>]) {
    if let Some(last) = out.last_mut() {
        *last = Panel::ZERO;
    }
}

/// Q4_K/Q5_K activations: Q8_K, groups of 32.
fn pack_acts_k32(x: &[f32], out: &mut [Panel<8>]) {
    clear_tail(out);
    for (k, a) in quantize_q8k(x).iter().enumerate() {
        for s in 0..8 {
            let (p, t) = lane(out, 8 * k + s);
            p.put(t, |l| a.qs[32 * s + l] as u8);
            p.scale[t] = a.d;
            let sum = a.bsums[2 * s] as i32 + a.bsums[2 * s + 1] as i32;
            p.extra[t] = (a.d * sum as f32).to_bits();
        }
    }
}

/// Q4_K/Q5_K weights: sub-block `s` of `b` with `value(l)` its `l`-th value.
fn pack_k32(
    out: &mut [Panel<8>],
    t: usize,
    (d, dmin): (f16, f16),
    (scale, min): (u8, u8),
    value: impl Fn(usize) -> u8,
) {
    let (p, t) = lane(out, t);
    p.put(t, value);
    p.scale[t] = d.to_f32() * scale as f32;
    p.extra[t] = (-dmin.to_f32() * min as f32).to_bits();
}

pub struct Q4K;
impl Kind<8> for Q4K {
    type Block = BlockQ4K;
    const GROUPS: usize = 8;
    const SIGNED_W: bool = false;
    const A_OFFSET: bool = false;
    const MINS: bool = true;

    fn pack_weights(w: &[BlockQ4K], out: &mut [Panel<8>]) {
        clear_tail(out);
        for (k, b) in w.iter().enumerate() {
            let (sc, mn) = unpack_scales_k4(&b.scales);
            for s in 0..8 {
                // Sub-block s: the low (even s) or high nibbles of qs[32 * (s / 2)..][..32].
                let (q, shift) = (&b.qs[32 * (s / 2)..][..32], 4 * (s % 2));
                pack_k32(out, 8 * k + s, (b.d, b.dmin), (sc[s], mn[s]), |l| {
                    (q[l] >> shift) & 0xF
                });
            }
        }
    }

    fn pack_acts(x: &[f32], out: &mut [Panel<8>]) {
        pack_acts_k32(x, out)
    }
}

pub struct Q5K;
impl Kind<8> for Q5K {
    type Block = BlockQ5K;
    const GROUPS: usize = 8;
    const SIGNED_W: bool = false;
    const A_OFFSET: bool = false;
    const MINS: bool = true;

    fn pack_weights(w: &[BlockQ5K], out: &mut [Panel<8>]) {
        clear_tail(out);
        for (k, b) in w.iter().enumerate() {
            let (sc, mn) = unpack_scales_k4(&b.scales);
            for s in 0..8 {
                // As Q4_K, plus bit s of qh[l] as bit 4.
                let (q, shift) = (&b.qs[32 * (s / 2)..][..32], 4 * (s % 2));
                pack_k32(out, 8 * k + s, (b.d, b.dmin), (sc[s], mn[s]), |l| {
                    ((q[l] >> shift) & 0xF) | (((b.qh[l] >> s) & 1) << 4)
                });
            }
        }
    }

    fn pack_acts(x: &[f32], out: &mut [Panel<8>]) {
        pack_acts_k32(x, out)
    }
}

pub struct Q6K;
impl Kind<4> for Q6K {
    type Block = BlockQ6K;
    const GROUPS: usize = 16;
    const SIGNED_W: bool = false;
    const A_OFFSET: bool = true;
    const MINS: bool = false;

    fn pack_weights(w: &[BlockQ6K], out: &mut [Panel<4>]) {
        for (b, p) in w.iter().zip(out) {
            let d = b.d.to_f32();
            for t in 0..16 {
                // 0..=63: the offset of 32 is the activations' `extra`.
                p.put(t, |l| (reference::q6k_value(b, 16 * t + l) + 32) as u8);
                p.scale[t] = d * b.scales[t] as f32;
            }
        }
    }

    fn pack_acts(x: &[f32], out: &mut [Panel<4>]) {
        for (a, p) in quantize_q8k(x).iter().zip(out) {
            for t in 0..16 {
                p.put(t, |l| a.qs[16 * t + l] as u8);
                p.scale[t] = a.d;
                p.extra[t] = (-32 * a.bsums[t] as i32) as u32;
            }
        }
    }
}

pub struct Q8_0;
impl Kind<8> for Q8_0 {
    type Block = BlockQ8_0;
    const GROUPS: usize = 1;
    const SIGNED_W: bool = true;
    const A_OFFSET: bool = false;
    const MINS: bool = false;

    fn pack_weights(w: &[BlockQ8_0], out: &mut [Panel<8>]) {
        clear_tail(out);
        for (k, b) in w.iter().enumerate() {
            let (p, t) = lane(out, k);
            p.put(t, |l| b.qs[l] as u8);
            p.scale[t] = b.d.to_f32();
            let sum: i32 = b.qs.iter().map(|&q| q as i32).sum();
            p.extra[t] = (-128 * sum) as u32;
        }
    }

    fn pack_acts(x: &[f32], out: &mut [Panel<8>]) {
        clear_tail(out);
        for (k, a) in quantize_q8_0(x).iter().enumerate() {
            let (p, t) = lane(out, k);
            p.put(t, |l| (a.qs[l] as i32 + 128) as u8);
            p.scale[t] = a.d.to_f32();
        }
    }
}

pub struct Q4_0;
impl Kind<8> for Q4_0 {
    type Block = BlockQ4_0;
    const GROUPS: usize = 1;
    const SIGNED_W: bool = false;
    const A_OFFSET: bool = true;
    const MINS: bool = false;

    fn pack_weights(w: &[BlockQ4_0], out: &mut [Panel<8>]) {
        clear_tail(out);
        for (k, b) in w.iter().enumerate() {
            let (p, t) = lane(out, k);
            // 0..=15: the offset of 8 is the activations' `extra`.
            p.put(t, |l| {
                if l < 16 {
                    b.qs[l] & 0xF
                } else {
                    b.qs[l - 16] >> 4
                }
            });
            p.scale[t] = b.d.to_f32();
        }
    }

    fn pack_acts(x: &[f32], out: &mut [Panel<8>]) {
        clear_tail(out);
        for (k, a) in quantize_q8_0(x).iter().enumerate() {
            let (p, t) = lane(out, k);
            p.put(t, |l| a.qs[l] as u8);
            p.scale[t] = a.d.to_f32();
            let sum: i32 = a.qs.iter().map(|&q| q as i32).sum();
            p.extra[t] = (-8 * sum) as u32;
        }
    }
}

/// Weight rows per microkernel call.
const RW: usize = 2;
/// Activation rows per microkernel call.
const RA: usize = 4;

/// `out[i * rows + r] = dot(row r of w, row i of x)` for the `n` rows of `x` (`cols` values
/// each); `w` has `bpr` blocks per row.
///
/// # Safety
/// The CPU must have AVX-512 F, BW, VL and VNNI.
pub unsafe fn gemm<K: Kind<V>, const V: usize>(
    w: &[K::Block],
    bpr: usize,
    x: &[f32],
    cols: usize,
    n: usize,
    out: &SharedOut,
) {
    let np = panels::<K, V>(bpr);
    let mut acts = vec![Panel::<V>::ZERO; n * np];
    acts.par_chunks_mut(np)
        .zip(x.par_chunks(cols))
        .for_each(|(p, x)| K::pack_acts(x, p));
    tiles_par(out, |tile| {
        let rows = tile.rows();
        let mut wp = vec![Panel::<V>::ZERO; rows.len() * np];
        for (p, r) in wp.chunks_mut(np).zip(rows.clone()) {
            K::pack_weights(&w[r * bpr..(r + 1) * bpr], p);
        }
        for i0 in (0..n).step_by(RA) {
            let ra = RA.min(n - i0);
            for r0 in (0..rows.len()).step_by(RW) {
                let rw = RW.min(rows.len() - r0);
                macro_rules! call {
                    ($rw:literal, $ra:literal) => {{
                        let wr = std::array::from_fn(|r| &wp[(r0 + r) * np..][..np]);
                        let ar = std::array::from_fn(|i| &acts[(i0 + i) * np..][..np]);
                        // SAFETY: the caller guarantees AVX-512 F/BW/VL/VNNI.
                        let res = unsafe { panel_dots::<K, V, $rw, $ra>(wr, ar) };
                        for (r, res) in res.iter().enumerate() {
                            for (i, &v) in res.iter().enumerate() {
                                tile.set(i0 + i, rows.start + r0 + r, v);
                            }
                        }
                    }};
                }
                match (rw, ra) {
                    (2, 4) => call!(2, 4),
                    (2, 3) => call!(2, 3),
                    (2, 2) => call!(2, 2),
                    (2, 1) => call!(2, 1),
                    (1, 4) => call!(1, 4),
                    (1, 3) => call!(1, 3),
                    (1, 2) => call!(1, 2),
                    _ => call!(1, 1),
                }
            }
        }
    });
}

/// A 64-byte field of a [`Panel`] as a vector.
#[inline]
#[target_feature(enable = "avx512f")]
fn load<T>(field: &[T; 16]) -> __m512i
where
    T: Copy,
{
    const { assert!(size_of::<T>() == 4) };
    // SAFETY: 64 bytes (asserted), at a multiple of 64 within a `Panel`, which is 64-aligned.
    unsafe { _mm512_load_si512(field.as_ptr().cast()) }
}

/// `q[v]` of a panel as a vector.
#[inline]
#[target_feature(enable = "avx512f")]
fn load_q(q: &[u8; 64]) -> __m512i {
    // SAFETY: 64 bytes, at a multiple of 64 within a `Panel`, which is 64-aligned.
    unsafe { _mm512_load_si512(q.as_ptr().cast()) }
}

/// The dot products of `RW` weight rows with `RA` activation rows, all as panels (the same
/// number of each).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
fn panel_dots<K: Kind<V>, const V: usize, const RW: usize, const RA: usize>(
    w: [&[Panel<V>]; RW],
    a: [&[Panel<V>]; RA],
) -> [[f32; RA]; RW] {
    let np = a[0].len();
    assert!(w.iter().all(|w| w.len() == np) && a.iter().all(|a| a.len() == np));
    let mut acc = [[_mm512_setzero_ps(); RA]; RW];
    for g in 0..np {
        for i in 0..RA {
            let ap = &a[i][g];
            for r in 0..RW {
                let wp = &w[r][g];
                let mut s = if K::A_OFFSET {
                    load(&ap.extra)
                } else if K::SIGNED_W {
                    load(&wp.extra)
                } else {
                    _mm512_setzero_si512()
                };
                for v in 0..V {
                    s = if K::SIGNED_W {
                        _mm512_dpbusd_epi32(s, load_q(&ap.q[v]), load_q(&wp.q[v]))
                    } else {
                        _mm512_dpbusd_epi32(s, load_q(&wp.q[v]), load_q(&ap.q[v]))
                    };
                }
                let scale = _mm512_mul_ps(
                    _mm512_castsi512_ps(load(&wp.scale)),
                    _mm512_castsi512_ps(load(&ap.scale)),
                );
                acc[r][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, acc[r][i]);
                if K::MINS {
                    acc[r][i] = _mm512_fmadd_ps(
                        _mm512_castsi512_ps(load(&wp.extra)),
                        _mm512_castsi512_ps(load(&ap.extra)),
                        acc[r][i],
                    );
                }
            }
        }
    }
    let mut res = [[0f32; RA]; RW];
    for r in 0..RW {
        for i in 0..RA {
            res[r][i] = _mm512_reduce_add_ps(acc[r][i]);
        }
    }
    res
}

//! Element conversions and row dequantizers used by the executor.
//!
//! Rounding follows torch on CPU: every float downcast is round-to-nearest-even, and a
//! product "in bf16" is the f32 product rounded once to bf16. The dequantizers reproduce
//! the reference libraries bit for bit:
//! - ct-int4 (compressed-tensors): `(q - 8) * scale` computed in the scale's dtype, then
//!   cast to the destination dtype;
//! - Quark MXFP4: `e2m1(code) * 2^(e - 127)` (exact in f32; e = 255 is NaN), then cast;
//! - FP8 block: `float(w) * scale_inv[r / br, c / bc]` in f32, then cast.

use half::{bf16, f16};

use crate::dtype::Dtype;

/// Float dtypes a destination (or a converted source) may have.
pub fn is_float(d: Dtype) -> bool {
    matches!(d, Dtype::BF16 | Dtype::F16 | Dtype::F32 | Dtype::F64)
}

#[inline]
fn read_f32(src: &[u8], i: usize, d: Dtype) -> f32 {
    match d {
        Dtype::F32 => f32::from_le_bytes(src[4 * i..4 * i + 4].try_into().expect("4 bytes")),
        Dtype::BF16 => bf16::from_bits(u16::from_le_bytes([src[2 * i], src[2 * i + 1]])).to_f32(),
        Dtype::F16 => f16::from_bits(u16::from_le_bytes([src[2 * i], src[2 * i + 1]])).to_f32(),
        Dtype::F64 => f64::from_le_bytes(src[8 * i..8 * i + 8].try_into().expect("8 bytes")) as f32,
        Dtype::F8E4M3 => e4m3_to_f32(src[i]),
        Dtype::F8E8M0 => e8m0_to_f32(src[i]),
        _ => unreachable!("not a float dtype: {d}"),
    }
}

#[inline]
fn write_f32(dst: &mut [u8], i: usize, d: Dtype, v: f32) {
    match d {
        Dtype::F32 => dst[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes()),
        Dtype::BF16 => {
            dst[2 * i..2 * i + 2].copy_from_slice(&bf16::from_f32(v).to_bits().to_le_bytes())
        }
        Dtype::F16 => {
            dst[2 * i..2 * i + 2].copy_from_slice(&f16::from_f32(v).to_bits().to_le_bytes())
        }
        Dtype::F64 => dst[8 * i..8 * i + 8].copy_from_slice(&(v as f64).to_le_bytes()),
        _ => unreachable!("not a float destination: {d}"),
    }
}

/// Rounds `v` to `d`'s precision and back (identity for f32).
#[inline]
fn round_to(v: f32, d: Dtype) -> f32 {
    match d {
        Dtype::BF16 => f32::from_bits((bf16_bits(v) as u32) << 16),
        Dtype::F16 => f16::from_f32(v).to_f32(),
        _ => v,
    }
}

/// Writes `vals` (already rounded as the reference rounds them) into `out` as `to`.
#[inline]
fn store(out: &mut [u8], to: Dtype, vals: impl Iterator<Item = f32>) {
    match to {
        Dtype::BF16 => {
            for (o, v) in out.chunks_exact_mut(2).zip(vals) {
                o.copy_from_slice(&bf16_bits(v).to_le_bytes());
            }
        }
        Dtype::F16 => {
            for (o, v) in out.chunks_exact_mut(2).zip(vals) {
                o.copy_from_slice(&f16::from_f32(v).to_bits().to_le_bytes());
            }
        }
        Dtype::F32 => {
            for (o, v) in out.chunks_exact_mut(4).zip(vals) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        Dtype::F64 => {
            for (o, v) in out.chunks_exact_mut(8).zip(vals) {
                o.copy_from_slice(&(v as f64).to_le_bytes());
            }
        }
        _ => unreachable!("not a float destination: {to}"),
    }
}

/// Converts `n` floats from `src` (dtype `from`) into `dst` (dtype `to`).
pub fn convert(src: &[u8], from: Dtype, dst: &mut [u8], to: Dtype, n: usize) {
    match (from, to) {
        (a, b) if a == b => {
            dst[..n * a.size() as usize].copy_from_slice(&src[..n * a.size() as usize])
        }
        (Dtype::BF16, Dtype::F32) => {
            // exact: bf16 is the top half of an f32
            for (o, i) in dst.chunks_exact_mut(4).zip(src.chunks_exact(2)).take(n) {
                o.copy_from_slice(
                    &(((u16::from_le_bytes([i[0], i[1]]) as u32) << 16).to_le_bytes()),
                );
            }
        }
        (Dtype::F32, _) => store(
            dst,
            to,
            src.chunks_exact(4)
                .take(n)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        (Dtype::BF16, _) => store(
            dst,
            to,
            src.chunks_exact(2)
                .take(n)
                .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()),
        ),
        (Dtype::F16, _) => store(
            dst,
            to,
            src.chunks_exact(2)
                .take(n)
                .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()),
        ),
        _ => {
            for i in 0..n {
                write_f32(dst, i, to, read_f32(src, i, from));
            }
        }
    }
}

/// float8_e4m3fn -> f32 (no infinities; 0x7F / 0xFF are NaN).
pub fn e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let exp = (b >> 3) & 0xF;
    let man = (b & 0x7) as f32;
    if exp == 0xF && b & 0x7 == 0x7 {
        return f32::NAN;
    }
    if exp == 0 {
        sign * man / 8.0 * 2f32.powi(-6)
    } else {
        sign * (1.0 + man / 8.0) * 2f32.powi(exp as i32 - 7)
    }
}

/// An E8M0 scale (a biased power of two; 255 is NaN, as in the OCP MX spec) as f32.
#[inline]
pub fn e8m0_to_f32(e: u8) -> f32 {
    if e == 255 {
        f32::NAN
    } else {
        f32::from_bits(if e == 0 { 1 << 22 } else { (e as u32) << 23 })
    }
}

/// All 256 float8_e4m3fn values as f32.
fn e4m3_table() -> &'static [f32; 256] {
    static TABLE: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| std::array::from_fn(|b| e4m3_to_f32(b as u8)))
}

const E2M1: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// f32 -> bf16 bits, round to nearest even; NaN becomes the canonical 0x7FC0 (as torch).
#[inline(always)]
pub fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    // branch-free (a select), so that loops over it vectorize
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    if b & 0x7fff_ffff > 0x7f80_0000 {
        0x7fc0
    } else {
        rounded
    }
}

/// Expands 4-bit codes (two per byte, the even element in the low nibble) through a
/// 16-entry table of already-rounded outputs, one group of `group` codes at a time;
/// `fill(g, &mut table)` writes group `g`'s table.
#[inline(always)]
fn expand_nibbles(
    codes: &[u8],
    group: usize,
    n: usize,
    out: &mut [u8],
    to: Dtype,
    fill: impl Fn(usize, &mut [f32; 16]),
) {
    let mut lut = [0f32; 16];
    let es = to.size() as usize;
    for (g, (src, dst)) in codes[..n / 2]
        .chunks(group / 2)
        .zip(out.chunks_mut(group * es))
        .enumerate()
    {
        fill(g, &mut lut);
        match to {
            Dtype::BF16 | Dtype::F16 => {
                let mut t = [0u16; 16];
                for (b, &v) in t.iter_mut().zip(&lut) {
                    *b = if to == Dtype::BF16 {
                        bf16_bits(v)
                    } else {
                        f16::from_f32(v).to_bits()
                    };
                }
                for (o, &b) in dst.chunks_exact_mut(4).zip(src) {
                    let pair = t[(b & 0xF) as usize] as u32 | (t[(b >> 4) as usize] as u32) << 16;
                    o.copy_from_slice(&pair.to_le_bytes());
                }
            }
            Dtype::F32 => {
                for (o, &b) in dst.chunks_exact_mut(8).zip(src) {
                    o[..4].copy_from_slice(&lut[(b & 0xF) as usize].to_le_bytes());
                    o[4..].copy_from_slice(&lut[(b >> 4) as usize].to_le_bytes());
                }
            }
            _ => store(
                dst,
                to,
                src.iter()
                    .flat_map(|&b| [lut[(b & 0xF) as usize], lut[(b >> 4) as usize]]),
            ),
        }
    }
}

/// The common case of [`expand_nibbles`], a bf16 output whose table is `base[k] * s`
/// rounded once to bf16 (`s = scale(g)` for group `g`), with SSSE3: the table is computed
/// and rounded in registers, and each 16 bytes of codes (32 outputs) are split into
/// nibbles, put in element order and looked up in the table's low-byte and high-byte
/// halves with `pshufb`. Returns false (writing nothing) where SSSE3 is missing or the
/// groups are not whole 16-byte blocks; the caller then takes the portable path.
#[inline(always)]
fn expand_bf16_fast(
    codes: &[u8],
    group: usize,
    n: usize,
    out: &mut [u8],
    base: &[f32; 16],
    scale: impl Fn(usize) -> f32,
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if group.is_multiple_of(32) && std::arch::is_x86_feature_detected!("ssse3") {
        // SAFETY: the CPU was just checked to have SSSE3.
        unsafe { expand_bf16_ssse3(&codes[..n / 2], group, &mut out[..2 * n], base, scale) };
        return true;
    }
    let _ = (codes, group, n, out, base, &scale);
    false
}

/// See [`expand_bf16_fast`]; `group` is a multiple of 32 and `out` holds 4 bytes per
/// byte of `codes`.
///
/// # Safety
/// The CPU must support SSSE3.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "ssse3")]
unsafe fn expand_bf16_ssse3(
    codes: &[u8],
    group: usize,
    out: &mut [u8],
    base: &[f32; 16],
    scale: impl Fn(usize) -> f32,
) {
    use std::arch::x86_64::{
        __m128, __m128i, _mm_add_epi32, _mm_and_si128, _mm_andnot_si128, _mm_castps_si128,
        _mm_cmpunord_ps, _mm_loadu_ps, _mm_loadu_si128, _mm_mul_ps, _mm_or_si128, _mm_packs_epi32,
        _mm_packus_epi16, _mm_set1_epi32, _mm_set1_epi8, _mm_set1_ps, _mm_shuffle_epi8,
        _mm_srli_epi16, _mm_srli_epi32, _mm_storeu_si128, _mm_unpackhi_epi8, _mm_unpacklo_epi8,
    };
    assert!(group.is_multiple_of(32) && out.len() == 4 * codes.len());
    let nib = _mm_set1_epi8(0x0F);
    let byte = _mm_set1_epi32(0xFF);
    let one = _mm_set1_epi32(1);
    let half = _mm_set1_epi32(0x7FFF);
    let nan = _mm_set1_epi32(0x7FC0);
    // SAFETY: each load reads 4 of the 16 floats of `base`.
    let base: [__m128; 4] =
        std::array::from_fn(|i| unsafe { _mm_loadu_ps(base.as_ptr().add(4 * i)) });
    for (g, (src, dst)) in codes
        .chunks_exact(group / 2)
        .zip(out.chunks_exact_mut(group * 2))
        .enumerate()
    {
        let s = _mm_set1_ps(scale(g));
        // bf16 bits of each base * s (round to nearest even; NaN -> 0x7FC0), as in `bf16_bits`
        let bits = base.map(|b| {
            let p = _mm_mul_ps(b, s);
            let x = _mm_castps_si128(p);
            let odd = _mm_and_si128(_mm_srli_epi32(x, 16), one);
            let r = _mm_srli_epi32(_mm_add_epi32(x, _mm_add_epi32(half, odd)), 16);
            let isnan = _mm_castps_si128(_mm_cmpunord_ps(p, p));
            _mm_or_si128(_mm_andnot_si128(isnan, r), _mm_and_si128(isnan, nan))
        });
        // 32-bit lanes below 2^16: split into 16-entry tables of low and high bytes
        let lo = |v: __m128i| _mm_and_si128(v, byte);
        let hi = |v: __m128i| _mm_and_si128(_mm_srli_epi32(v, 8), byte);
        let tlo = _mm_packus_epi16(
            _mm_packs_epi32(lo(bits[0]), lo(bits[1])),
            _mm_packs_epi32(lo(bits[2]), lo(bits[3])),
        );
        let thi = _mm_packus_epi16(
            _mm_packs_epi32(hi(bits[0]), hi(bits[1])),
            _mm_packs_epi32(hi(bits[2]), hi(bits[3])),
        );
        for (s16, d64) in src.chunks_exact(16).zip(dst.chunks_exact_mut(64)) {
            // SAFETY: the load reads the 16 bytes of `s16`; the four stores write the 64
            // bytes of `d64`.
            unsafe {
                let b = _mm_loadu_si128(s16.as_ptr().cast::<__m128i>());
                let even = _mm_and_si128(b, nib);
                let odd = _mm_and_si128(_mm_srli_epi16(b, 4), nib);
                let o = d64.as_mut_ptr().cast::<__m128i>();
                for (k, idx) in [_mm_unpacklo_epi8(even, odd), _mm_unpackhi_epi8(even, odd)]
                    .into_iter()
                    .enumerate()
                {
                    let l = _mm_shuffle_epi8(tlo, idx);
                    let h = _mm_shuffle_epi8(thi, idx);
                    _mm_storeu_si128(o.add(2 * k), _mm_unpacklo_epi8(l, h));
                    _mm_storeu_si128(o.add(2 * k + 1), _mm_unpackhi_epi8(l, h));
                }
            }
        }
    }
}

/// `k - 8` for the 16 ct-int4 codes.
const INT4: [f32; 16] = [
    -8.0, -7.0, -6.0, -5.0, -4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0,
];

/// `n` logical columns of ct-int4 (`n` a multiple of `group`): `packed` holds their
/// nibbles (little-endian i32 words, starting at a group boundary), `scale` their group
/// scales. Each output is `(nibble - 8) * scale` rounded in the scale's dtype, then cast.
pub fn dequant_int4_row(
    packed: &[u8],
    scale: &[u8],
    scale_dtype: Dtype,
    group: usize,
    n: usize,
    out: &mut [u8],
    to: Dtype,
) {
    // a bf16 output of a bf16 or f32 product is one rounding of the f32 product
    if to == Dtype::BF16
        && matches!(scale_dtype, Dtype::BF16 | Dtype::F32)
        && expand_bf16_fast(packed, group, n, out, &INT4, |g| {
            read_f32(scale, g, scale_dtype)
        })
    {
        return;
    }
    expand_nibbles(packed, group, n, out, to, |g, lut| {
        let s = read_f32(scale, g, scale_dtype);
        for (slot, k) in lut.iter_mut().zip(INT4) {
            *slot = round_to(k * s, scale_dtype);
        }
    });
}

/// `n` columns of Quark MXFP4 (`n` a multiple of `group`): `codes` holds two E2M1 codes
/// per byte (the even element in the low nibble), starting at a group boundary; `scale`
/// their e8m0 exponents (255 is NaN).
pub fn dequant_mxfp4_row(
    codes: &[u8],
    scale: &[u8],
    group: usize,
    n: usize,
    out: &mut [u8],
    to: Dtype,
) {
    if to == Dtype::BF16 && expand_bf16_fast(codes, group, n, out, &E2M1, |g| e8m0_to_f32(scale[g]))
    {
        return;
    }
    expand_nibbles(codes, group, n, out, to, |g, lut| {
        let s = e8m0_to_f32(scale[g]);
        for (slot, v) in lut.iter_mut().zip(E2M1) {
            *slot = v * s;
        }
    });
}

/// `n` columns of FP8 block: `w` holds the fp8 values (starting at a block boundary),
/// `scale` the block scales that cover them (`scale_inv[r / br, ..]`).
pub fn dequant_fp8_row(
    w: &[u8],
    scale: &[u8],
    scale_dtype: Dtype,
    block_cols: usize,
    n: usize,
    out: &mut [u8],
    to: Dtype,
) {
    let table = e4m3_table();
    let es = to.size() as usize;
    for (b, (src, dst)) in w[..n]
        .chunks(block_cols)
        .zip(out.chunks_mut(block_cols * es))
        .enumerate()
    {
        let s = read_f32(scale, b, scale_dtype);
        store(dst, to, src.iter().map(|&x| table[x as usize] * s));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_matches_known_values() {
        assert_eq!(e4m3_to_f32(0x00), 0.0);
        assert_eq!(e4m3_to_f32(0x38), 1.0);
        assert_eq!(e4m3_to_f32(0x7E), 448.0);
        assert_eq!(e4m3_to_f32(0xFE), -448.0);
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9));
        assert!(e4m3_to_f32(0x7F).is_nan());
    }

    #[test]
    fn e8m0_is_a_power_of_two() {
        for e in 0..255u8 {
            assert_eq!(e8m0_to_f32(e), 2f32.powi(e as i32 - 127), "{e}");
        }
        assert!(e8m0_to_f32(255).is_nan());
    }

    #[test]
    fn bf16_rounding_is_nearest_even() {
        let mut out = [0u8; 2];
        // 1 + 2^-8 is exactly halfway between two bf16 values: rounds to even (1.0)
        write_f32(&mut out, 0, Dtype::BF16, 1.0 + 2f32.powi(-8));
        assert_eq!(u16::from_le_bytes(out), 0x3F80);
        write_f32(&mut out, 0, Dtype::BF16, 1.0 + 3.0 * 2f32.powi(-8));
        assert_eq!(u16::from_le_bytes(out), 0x3F82);
    }

    #[test]
    fn fast_paths_match_the_element_formulas() {
        // every nibble, several scales and destinations, against the one-element formula
        let packed: Vec<u8> = (0..=255u8).collect();
        let scales: Vec<u8> = [0.0123f32, -3.5, 1e-3, 7.0e3, 0.5, 2.0, 1.1, 9.9]
            .iter()
            .flat_map(|&s| bf16::from_f32(s).to_bits().to_le_bytes())
            .collect();
        for to in [Dtype::BF16, Dtype::F32, Dtype::F16] {
            let n = 512;
            let mut out = vec![0u8; n * to.size() as usize];
            dequant_int4_row(&packed, &scales, Dtype::BF16, 64, n, &mut out, to);
            for c in 0..n {
                let byte = packed[c / 2];
                let nib = if c % 2 == 0 { byte & 0xF } else { byte >> 4 };
                let want = round_to(
                    (nib as f32 - 8.0) * read_f32(&scales, c / 64, Dtype::BF16),
                    Dtype::BF16,
                );
                let mut one = vec![0u8; to.size() as usize];
                write_f32(&mut one, 0, to, want);
                assert_eq!(
                    &out[c * one.len()..(c + 1) * one.len()],
                    &one[..],
                    "int4 {to} col {c}"
                );
            }
            let e8: Vec<u8> = vec![127, 120, 130, 255, 0, 1, 200, 126];
            dequant_mxfp4_row(&packed, &e8, 64, n, &mut out, to);
            for c in 0..n {
                let byte = packed[c / 2];
                let code = if c % 2 == 0 { byte & 0xF } else { byte >> 4 };
                let e = e8[c / 64];
                let s = if e == 255 {
                    f32::NAN
                } else {
                    2f32.powi(e as i32 - 127)
                };
                let mut one = vec![0u8; to.size() as usize];
                write_f32(&mut one, 0, to, E2M1[code as usize] * s);
                let got = &out[c * one.len()..(c + 1) * one.len()];
                let nan = e == 255;
                assert!(nan || got == &one[..], "mxfp4 {to} col {c}");
            }
            let f32s: Vec<u8> = [0.5f32, 3.0].iter().flat_map(|s| s.to_le_bytes()).collect();
            dequant_fp8_row(&packed, &f32s, Dtype::F32, 128, 256, &mut out, to);
            for c in 0..256 {
                let mut one = vec![0u8; to.size() as usize];
                write_f32(
                    &mut one,
                    0,
                    to,
                    e4m3_to_f32(c as u8) * [0.5f32, 3.0][c / 128],
                );
                let got = &out[c * one.len()..(c + 1) * one.len()];
                assert!(
                    e4m3_to_f32(c as u8).is_nan() || got == &one[..],
                    "fp8 {to} col {c}"
                );
            }
        }
        // conversions
        let src: Vec<u8> = (0..=255u8).flat_map(|b| [b, b ^ 0x5A]).collect();
        let mut a = vec![0u8; 256 * 4];
        convert(&src, Dtype::BF16, &mut a, Dtype::F32, 256);
        for i in 0..256 {
            let mut one = [0u8; 4];
            write_f32(&mut one, 0, Dtype::F32, read_f32(&src, i, Dtype::BF16));
            assert!(a[i * 4..i * 4 + 4] == one || read_f32(&src, i, Dtype::BF16).is_nan());
        }
    }

    /// The one-element formula of each nibble format, as the reference computes it.
    fn element(fmt: &str, code: u8, scale: &[u8], g: usize, sd: Dtype) -> f32 {
        if fmt == "int4" {
            round_to((code as f32 - 8.0) * read_f32(scale, g, sd), sd)
        } else {
            E2M1[code as usize] * e8m0_to_f32(scale[g])
        }
    }

    #[test]
    fn simd_and_portable_paths_give_the_element_formula_on_edge_scales() {
        // every code in every position, group sizes the SIMD path takes (32, 64, 128) and
        // ones it leaves to the portable path (16, 48), scales at the edges: zeros of both
        // signs, f32 subnormals, values that overflow when multiplied, inf, NaN
        let edge = [
            0.0f32,
            -0.0,
            1e-40,
            -3e-39,
            3.0e38,
            -2.9e38,
            f32::INFINITY,
            f32::NAN,
            0.0123,
            -7.5,
            1.0,
            65504.0,
            6.1e-5,
            -1e-8,
            0.1,
            3.3e-3,
        ];
        let codes: Vec<u8> = (0..1536u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let n = 2 * codes.len();
        for group in [16usize, 32, 48, 64, 128] {
            let groups = n / group;
            for sd in [Dtype::BF16, Dtype::F32, Dtype::F16, Dtype::F8E8M0] {
                let fmt = if sd == Dtype::F8E8M0 { "mxfp4" } else { "int4" };
                let mut scale = vec![0u8; groups * sd.size() as usize];
                for g in 0..groups {
                    let v = edge[g % edge.len()] * if g >= edge.len() { 0.37 } else { 1.0 };
                    match sd {
                        Dtype::F8E8M0 => scale[g] = (g * 37 % 256) as u8,
                        _ => write_f32(&mut scale, g, sd, v),
                    }
                }
                for to in [Dtype::BF16, Dtype::F16, Dtype::F32] {
                    let es = to.size() as usize;
                    let mut out = vec![0xAAu8; n * es];
                    if fmt == "int4" {
                        dequant_int4_row(&codes, &scale, sd, group, n, &mut out, to);
                    } else {
                        dequant_mxfp4_row(&codes, &scale, group, n, &mut out, to);
                    }
                    for c in 0..n {
                        let byte = codes[c / 2];
                        let code = if c % 2 == 0 { byte & 0xF } else { byte >> 4 };
                        let v = element(fmt, code, &scale, c / group, sd);
                        let got = &out[c * es..(c + 1) * es];
                        let ctx = format!("{fmt} scale {sd} group {group} -> {to} col {c} ({v})");
                        if v.is_nan() {
                            assert!(read_f32(got, 0, to).is_nan(), "{ctx}");
                            if to == Dtype::BF16 {
                                assert_eq!(got, &0x7fc0u16.to_le_bytes()[..], "{ctx}");
                            }
                        } else {
                            let mut one = vec![0u8; es];
                            write_f32(&mut one, 0, to, v);
                            assert_eq!(got, &one[..], "{ctx}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn int4_product_is_rounded_in_the_scale_dtype() {
        // q = 7 (nibble 15), scale = bf16(0.0123) -> 7 * s rounded to bf16, then to f32
        let s = bf16::from_f32(0.0123);
        let packed = [0xFFu8];
        let mut out = [0u8; 8];
        dequant_int4_row(
            &packed,
            &s.to_bits().to_le_bytes(),
            Dtype::BF16,
            32,
            2,
            &mut out,
            Dtype::F32,
        );
        let want = bf16::from_f32(7.0 * s.to_f32()).to_f32();
        assert_eq!(f32::from_le_bytes(out[..4].try_into().unwrap()), want);
    }
}

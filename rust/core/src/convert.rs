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
        Dtype::BF16 => bf16::from_f32(v).to_f32(),
        Dtype::F16 => f16::from_f32(v).to_f32(),
        _ => v,
    }
}

/// Converts `n` floats from `src` (dtype `from`) into `dst` (dtype `to`).
pub fn convert(src: &[u8], from: Dtype, dst: &mut [u8], to: Dtype, n: usize) {
    if from == Dtype::F64 && to == Dtype::F64 {
        dst[..8 * n].copy_from_slice(&src[..8 * n]);
        return;
    }
    for i in 0..n {
        write_f32(dst, i, to, read_f32(src, i, from));
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

const E2M1: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// `n` logical columns of ct-int4: `packed` holds their nibbles (little-endian i32 words,
/// starting at a group boundary), `scale` their group scales.
pub fn dequant_int4_row(
    packed: &[u8],
    scale: &[u8],
    scale_dtype: Dtype,
    group: usize,
    n: usize,
    out: &mut [u8],
    to: Dtype,
) {
    for c in 0..n {
        let byte = packed[c / 2];
        let nib = if c % 2 == 0 { byte & 0xF } else { byte >> 4 };
        let q = nib as f32 - 8.0;
        let s = read_f32(scale, c / group, scale_dtype);
        write_f32(out, c, to, round_to(q * s, scale_dtype));
    }
}

/// `n` columns of Quark MXFP4: `codes` holds two E2M1 codes per byte (the even element in
/// the low nibble), starting at a group boundary; `scale` their e8m0 exponents.
pub fn dequant_mxfp4_row(
    codes: &[u8],
    scale: &[u8],
    group: usize,
    n: usize,
    out: &mut [u8],
    to: Dtype,
) {
    for c in 0..n {
        let byte = codes[c / 2];
        let code = if c % 2 == 0 { byte & 0xF } else { byte >> 4 };
        let e = scale[c / group];
        let s = if e == 255 {
            f32::NAN
        } else {
            2f32.powi(e as i32 - 127)
        };
        write_f32(out, c, to, E2M1[code as usize] * s);
    }
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
    for (c, &byte) in w[..n].iter().enumerate() {
        let s = read_f32(scale, c / block_cols, scale_dtype);
        write_f32(out, c, to, e4m3_to_f32(byte) * s);
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
    fn bf16_rounding_is_nearest_even() {
        let mut out = [0u8; 2];
        // 1 + 2^-8 is exactly halfway between two bf16 values: rounds to even (1.0)
        write_f32(&mut out, 0, Dtype::BF16, 1.0 + 2f32.powi(-8));
        assert_eq!(u16::from_le_bytes(out), 0x3F80);
        write_f32(&mut out, 0, Dtype::BF16, 1.0 + 3.0 * 2f32.powi(-8));
        assert_eq!(u16::from_le_bytes(out), 0x3F82);
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

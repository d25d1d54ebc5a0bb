//! Quantize-on-sync on the CPU: bf16 / f32 weights into ct-int4 (`weight_packed` bytes
//! and per-group scales), bit for bit what `kimi_loader.quant.quantize_int4`'s torch
//! reference computes (which is tested against compressed-tensors' own quantizer and
//! the published QAT rule), in parallel over rows. The torch reference stays the path
//! for other dtypes and for device tensors.
//!
//! The element formulas, as torch evaluates them on the CPU:
//! - `compressed-tensors`: `s = max(|min(g, 0)|, |max(g, 0)|) / 7.5` in f32 (`eps` when
//!   0), `scale = s` rounded to the scale dtype, `q = round(clamp(w / scale, -8, 7))`,
//!   where the quotient is rounded to bf16 when both `w` and the scale are bf16 (torch's
//!   bf16 division) and kept in f32 otherwise;
//! - `int4-qat`: `scale = max(absmax(g) / 7, 1e-5)` in f32 rounded to the scale dtype,
//!   `q = clamp(round(f32(w) / f32(scale)), -7, 7)`.
//!
//! `round` is to nearest, ties to even. Codes are stored as `q + 8`, two per byte, the
//! even element in the low nibble.

use rayon::prelude::*;

use crate::convert::bf16_bits;
use crate::dtype::Dtype;
use crate::error::{Error, Result};

/// Which int4 rule: compressed-tensors' symmetric quantizer or the Kimi QAT one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Int4Rule {
    CompressedTensors,
    Qat,
}

impl Int4Rule {
    pub fn parse(s: &str) -> Option<Int4Rule> {
        match s {
            "compressed-tensors" => Some(Int4Rule::CompressedTensors),
            "int4-qat" => Some(Int4Rule::Qat),
            _ => None,
        }
    }
}

/// 1.5 * 2^23: `(x + ROUND) - ROUND` is `x` rounded to an integer, ties to even, for
/// `|x| < 2^22` (the sum's ulp is 1).
const ROUND: f32 = 12_582_912.0;

#[inline(always)]
fn bf16_round(x: f32) -> f32 {
    f32::from_bits((bf16_bits(x) as u32) << 16)
}

/// What one call quantizes: a row-major `[rows, cols]` weight of `src_dtype`.
#[derive(Clone, Copy, Debug)]
pub struct Int4Job {
    pub rows: usize,
    pub cols: usize,
    pub group: usize,
    pub src_dtype: Dtype,
    pub scale_dtype: Dtype,
    pub rule: Int4Rule,
}

impl Int4Job {
    fn check(&self, src: usize, packed: usize, scales: usize, what: &str) -> Result<()> {
        let bad = |reason: String| {
            Err(Error::InvalidArgument {
                reason: format!("{what}: {reason}"),
            })
        };
        if !matches!(self.src_dtype, Dtype::BF16 | Dtype::F32) {
            return bad(format!("cannot quantize {:?} weights", self.src_dtype));
        }
        if !matches!(self.scale_dtype, Dtype::BF16 | Dtype::F32) {
            return bad(format!(
                "unsupported int4 scale dtype {:?}",
                self.scale_dtype
            ));
        }
        if self.group == 0 || !self.group.is_multiple_of(2) || !self.cols.is_multiple_of(self.group)
        {
            return bad(format!(
                "{} input columns are not a multiple of the (even) group {}",
                self.cols, self.group
            ));
        }
        let n = self.rows * self.cols;
        let want = (
            n * self.src_dtype.size() as usize,
            n / 2,
            n / self.group * self.scale_dtype.size() as usize,
        );
        if (src, packed, scales) != want {
            return bad(format!(
                "buffers of {src} / {packed} / {scales} bytes, expected {} / {} / {} \
                 (weight / packed codes / scales)",
                want.0, want.1, want.2
            ));
        }
        Ok(())
    }
}

/// Quantizes `src` into `packed` (`rows * cols / 2` bytes) and `scales` (`rows * cols /
/// group` elements of the scale dtype, little-endian) on `pool`. A non-finite value is
/// refused naming `what` (the outputs are then partly written: callers pass fresh
/// buffers).
pub fn quantize_int4(
    job: Int4Job,
    src: &[u8],
    packed: &mut [u8],
    scales: &mut [u8],
    what: &str,
    pool: &rayon::ThreadPool,
) -> Result<()> {
    job.check(src.len(), packed.len(), scales.len(), what)?;
    if job.rows == 0 || job.cols == 0 {
        return Ok(());
    }
    let es = job.src_dtype.size() as usize;
    let ss = job.scale_dtype.size() as usize;
    let ok = pool.install(|| {
        src.par_chunks(job.cols * es)
            .zip(packed.par_chunks_mut(job.cols / 2))
            .zip(scales.par_chunks_mut(job.cols / job.group * ss))
            .all(|((s, p), sc)| quantize_row(&job, s, p, sc))
    });
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument {
            reason: format!("{what}: holds NaN or infinite values; refusing to quantize it"),
        })
    }
}

/// One row; false if it holds a non-finite value. Picks the AVX2 build of the same code
/// where the CPU has it (the formulas are IEEE operations without contraction, so every
/// build gives the same bits).
fn quantize_row(job: &Int4Job, src: &[u8], packed: &mut [u8], scales: &mut [u8]) -> bool {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { quantize_row_avx2(job, src, packed, scales) };
    }
    quantize_row_any(job, src, packed, scales)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_row_avx2(
    job: &Int4Job,
    src: &[u8],
    packed: &mut [u8],
    scales: &mut [u8],
) -> bool {
    quantize_row_any(job, src, packed, scales)
}

#[inline(always)]
fn quantize_row_any(job: &Int4Job, src: &[u8], packed: &mut [u8], scales: &mut [u8]) -> bool {
    let bf16_quotient = job.src_dtype == Dtype::BF16 && job.scale_dtype == Dtype::BF16;
    match (job.rule, bf16_quotient) {
        (Int4Rule::CompressedTensors, true) => row::<true, true>(job, src, packed, scales),
        (Int4Rule::CompressedTensors, false) => row::<true, false>(job, src, packed, scales),
        (Int4Rule::Qat, _) => row::<false, false>(job, src, packed, scales),
    }
}

/// The row kernel for one rule (`CT`: compressed-tensors, else QAT) and quotient
/// rounding (`BFQ`: the quotient is rounded to bf16 first), group by group.
#[inline(always)]
fn row<const CT: bool, const BFQ: bool>(
    job: &Int4Job,
    src: &[u8],
    packed: &mut [u8],
    scales: &mut [u8],
) -> bool {
    let g = job.group;
    let mut v = [0f32; 64];
    let mut buf = Vec::new();
    let v: &mut [f32] = if g <= 64 {
        &mut v[..g]
    } else {
        buf.resize(g, 0f32);
        &mut buf
    };
    let mut finite = true;
    let es = job.src_dtype.size() as usize;
    let ss = job.scale_dtype.size() as usize;
    for (k, (p, sc)) in packed
        .chunks_exact_mut(g / 2)
        .zip(scales.chunks_exact_mut(ss))
        .enumerate()
    {
        let bytes = &src[k * g * es..(k + 1) * g * es];
        if job.src_dtype == Dtype::BF16 {
            for (x, b) in v.iter_mut().zip(bytes.chunks_exact(2)) {
                *x = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
            }
        } else {
            for (x, b) in v.iter_mut().zip(bytes.chunks_exact(4)) {
                *x = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        // amax of |x| (compressed-tensors' max(|min(x, 0)|, max(x, 0)) is the same
        // value), with a compare-select max (NaNs are caught by the finiteness test)
        let mut amax = 0f32;
        let mut bad = 0u32;
        for &x in v.iter() {
            let a = x.abs();
            bad |= (a.to_bits() >= 0x7f80_0000) as u32;
            amax = if a > amax { a } else { amax };
        }
        finite &= bad == 0;
        let s = if CT {
            let s = amax / 7.5;
            if s == 0.0 {
                f32::EPSILON
            } else {
                s
            }
        } else {
            let s = amax / 7.0;
            if s < 1e-5 {
                1e-5
            } else {
                s
            }
        };
        let scale = if job.scale_dtype == Dtype::BF16 {
            let b = bf16_bits(s);
            sc.copy_from_slice(&b.to_le_bytes());
            f32::from_bits((b as u32) << 16)
        } else {
            sc.copy_from_slice(&s.to_le_bytes());
            s
        };
        // each value becomes its code: (x + ROUND) has the rounded integer k in its low
        // mantissa bits (bits = 0x4B40_0000 + k), so the stored nibble k + 8 is plain
        // integer arithmetic on the bits
        let (lo, hi) = if CT { (-8.0, 7.0) } else { (-8.0, 8.0) };
        for x in v.iter_mut() {
            let mut q = *x / scale;
            if BFQ {
                q = bf16_round(q);
            }
            let q = if q < lo {
                lo
            } else if q > hi {
                hi
            } else {
                q
            };
            let mut k = ((q + ROUND).to_bits() as i32).wrapping_sub(0x4B40_0000);
            if !CT {
                k = k.clamp(-7, 7);
            }
            *x = f32::from_bits((k + 8) as u32);
        }
        for (b, q) in p.iter_mut().zip(v.chunks_exact(2)) {
            *b = (q[0].to_bits() | (q[1].to_bits() << 4)) as u8;
        }
    }
    finite
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap()
    }

    fn run(rule: Int4Rule, src: &[f32], cols: usize, group: usize) -> (Vec<u8>, Vec<u8>) {
        let job = Int4Job {
            rows: src.len() / cols,
            cols,
            group,
            src_dtype: Dtype::F32,
            scale_dtype: Dtype::F32,
            rule,
        };
        let bytes: Vec<u8> = src.iter().flat_map(|x| x.to_le_bytes()).collect();
        let mut p = vec![0u8; src.len() / 2];
        let mut s = vec![0u8; src.len() / group * 4];
        quantize_int4(job, &bytes, &mut p, &mut s, "w", &pool()).unwrap();
        (p, s)
    }

    #[test]
    fn rounds_ties_to_even_and_packs_low_nibble_first() {
        // absmax 7.5 -> scale 1 (compressed-tensors): codes are round-half-even of x
        let row = [0.5, 1.5, 2.5, -0.5, -1.5, -7.5, 7.5, 0.0];
        let (p, s) = run(Int4Rule::CompressedTensors, &row, 8, 8);
        assert_eq!(f32::from_le_bytes(s[..4].try_into().unwrap()), 1.0);
        let q: Vec<i32> = p
            .iter()
            .flat_map(|b| [(b & 15) as i32 - 8, (b >> 4) as i32 - 8])
            .collect();
        assert_eq!(q, [0, 2, 2, 0, -2, -8, 7, 0]);
    }

    #[test]
    fn zero_groups_take_eps_or_the_qat_floor() {
        let (_, s) = run(Int4Rule::CompressedTensors, &[0.0; 4], 4, 4);
        assert_eq!(f32::from_le_bytes(s[..4].try_into().unwrap()), f32::EPSILON);
        let (p, s) = run(Int4Rule::Qat, &[0.0; 4], 4, 4);
        assert_eq!(f32::from_le_bytes(s[..4].try_into().unwrap()), 1e-5);
        assert_eq!(p, [0x88, 0x88]);
    }

    #[test]
    fn refuses_non_finite_values_and_bad_shapes() {
        let job = Int4Job {
            rows: 1,
            cols: 4,
            group: 4,
            src_dtype: Dtype::F32,
            scale_dtype: Dtype::F32,
            rule: Int4Rule::Qat,
        };
        let src: Vec<u8> = [1.0f32, f32::NAN, 0.0, 2.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let e = quantize_int4(job, &src, &mut [0; 2], &mut [0; 4], "w.x", &pool()).unwrap_err();
        assert!(e.to_string().contains("w.x") && e.to_string().contains("NaN"));
        let e = quantize_int4(
            Int4Job { group: 3, ..job },
            &src,
            &mut [0; 2],
            &mut [0; 4],
            "w.x",
            &pool(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("multiple"), "{e}");
        let e = quantize_int4(job, &src, &mut [0; 3], &mut [0; 4], "w.x", &pool()).unwrap_err();
        assert!(e.to_string().contains("expected"), "{e}");
    }
}

//! Quantize-on-sync on the CPU: bf16 / f32 weights into ct-int4 (`weight_packed` bytes
//! and per-group scales) and MXFP4 (E2M1 codes and e8m0 scales), bit for bit what the
//! torch references of `kimi_loader.quant` compute (which are tested against
//! compressed-tensors' own quantizers and the published QAT rule), in parallel over rows.
//! The torch references stay the path for other dtypes and for device tensors.
//!
//! The element formulas, as torch evaluates them on the CPU:
//! - int4 `compressed-tensors`: `s = max(|min(g, 0)|, |max(g, 0)|) / 7.5` in f32 (`eps`
//!   when 0), `scale = s` rounded to the scale dtype, `q = round(clamp(w / scale, -8,
//!   7))`, where the quotient is rounded to bf16 when both `w` and the scale are bf16
//!   (torch's bf16 division) and kept in f32 otherwise;
//! - int4 `int4-qat`: `scale = max(absmax(g) / 7, 1e-5)` in f32 rounded to the scale
//!   dtype, `q = clamp(round(f32(w) / f32(scale)), -7, 7)`;
//! - MXFP4 (OCP MX, as compressed-tensors' MX quantizer): the group's absmax rounded to
//!   one mantissa bit, its exponent `E` gives the e8m0 scale `max(E - 2, 0)` (255 stays
//!   255), and each `clamp(w / 2^(e8 - 127), -6, 6)` goes to the nearest E2M1 value, ties
//!   to the even code; a negative value that rounds to 0 is stored as -0.
//!
//! `round` is to nearest, ties to even. int4 codes are stored as `q + 8`; both formats
//! put two codes in a byte, the even element in the low nibble.

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
        if !matches!(self.scale_dtype, Dtype::BF16 | Dtype::F32) {
            return Err(Error::InvalidArgument {
                reason: format!(
                    "{what}: unsupported int4 scale dtype {:?}",
                    self.scale_dtype
                ),
            });
        }
        Groups {
            cols: self.cols,
            group: self.group,
            src_dtype: self.src_dtype,
            scale_size: self.scale_dtype.size() as usize,
        }
        .check(self.rows, src, packed, scales, what)
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
    let bf16_quotient = job.src_dtype == Dtype::BF16 && job.scale_dtype == Dtype::BF16;
    let bf16_scale = job.scale_dtype == Dtype::BF16;
    let shape = Groups {
        cols: job.cols,
        group: job.group,
        src_dtype: job.src_dtype,
        scale_size: job.scale_dtype.size() as usize,
    };
    let ok = match (job.rule, bf16_quotient) {
        (Int4Rule::CompressedTensors, true) => {
            shape.run(src, packed, scales, pool, &Int4::<true, true>(bf16_scale))
        }
        (Int4Rule::CompressedTensors, false) => {
            shape.run(src, packed, scales, pool, &Int4::<true, false>(bf16_scale))
        }
        (Int4Rule::Qat, _) => {
            shape.run(src, packed, scales, pool, &Int4::<false, false>(bf16_scale))
        }
    };
    finite_or_refused(ok, what)
}

/// Quantizes the row-major `[rows, cols]` `src_dtype` weight `src` into MXFP4: `packed`
/// (`rows * cols / 2` bytes of E2M1 codes) and `scales` (`rows * cols / group` e8m0
/// bytes). Errors as [`quantize_int4`].
#[allow(clippy::too_many_arguments)]
pub fn quantize_mxfp4(
    rows: usize,
    cols: usize,
    group: usize,
    src_dtype: Dtype,
    src: &[u8],
    packed: &mut [u8],
    scales: &mut [u8],
    what: &str,
    pool: &rayon::ThreadPool,
) -> Result<()> {
    let shape = Groups {
        cols,
        group,
        src_dtype,
        scale_size: 1,
    };
    shape.check(rows, src.len(), packed.len(), scales.len(), what)?;
    finite_or_refused(shape.run(src, packed, scales, pool, &Mxfp4), what)
}

/// Quantizes the row-major `[rows, cols]` `src_dtype` weight `src` into FP8-block:
/// `out` (`rows * cols` float8_e4m3fn bytes) and `scales` (`ceil(rows / block.0) x
/// ceil(cols / block.1)` f32 `weight_scale_inv`, little-endian), one scale per tile:
/// `scale = (1 / amax) * 448` (1 for an all-zero tile), `scale_inv = 1 / scale`, each value
/// `clamp(w * scale, -448, 448)` rounded to e4m3fn (nearest, ties to even; the sign of
/// zero kept), as transformers' FineGrainedFP8 weight quantization with float scales.
#[allow(clippy::too_many_arguments)]
pub fn quantize_fp8_block(
    rows: usize,
    cols: usize,
    block: (usize, usize),
    src_dtype: Dtype,
    src: &[u8],
    out: &mut [u8],
    scales: &mut [u8],
    what: &str,
    pool: &rayon::ThreadPool,
) -> Result<()> {
    let (br, bc) = block;
    let bad = |reason: String| {
        Err(Error::InvalidArgument {
            reason: format!("{what}: {reason}"),
        })
    };
    if !matches!(src_dtype, Dtype::BF16 | Dtype::F32) {
        return bad(format!("cannot quantize {src_dtype:?} weights"));
    }
    if br == 0 || bc == 0 {
        return bad(format!("block {block:?} must not be empty"));
    }
    let es = src_dtype.size() as usize;
    let (ob, ib) = (rows.div_ceil(br), cols.div_ceil(bc));
    let want = (rows * cols * es, rows * cols, ob * ib * 4);
    if (src.len(), out.len(), scales.len()) != want {
        return bad(format!(
            "buffers of {} / {} / {} bytes, expected {} / {} / {} (weight / fp8 / scales)",
            src.len(),
            out.len(),
            scales.len(),
            want.0,
            want.1,
            want.2
        ));
    }
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let tiles = Tiles {
        cols,
        block,
        src_dtype,
    };
    let finite = pool.install(|| {
        src.par_chunks(br * cols * es)
            .zip(out.par_chunks_mut(br * cols))
            .zip(scales.par_chunks_mut(ib * 4))
            .all(|((s, o), sc)| {
                #[cfg(target_arch = "x86_64")]
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU supports AVX2 (checked just above).
                    return unsafe { tiles.row_block_avx2(s, o, sc) };
                }
                tiles.row_block(s, o, sc)
            })
    });
    finite_or_refused(finite, what)
}

/// How an FP8-block weight is cut: rows of `cols` values, tiles of `block`.
struct Tiles {
    cols: usize,
    block: (usize, usize),
    src_dtype: Dtype,
}

impl Tiles {
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn row_block_avx2(&self, src: &[u8], out: &mut [u8], scales: &mut [u8]) -> bool {
        self.row_block(src, out, scales)
    }

    /// One block of rows (the last may be short): per tile its amax, scale and codes.
    #[inline(always)]
    fn row_block(&self, src: &[u8], out: &mut [u8], scales: &mut [u8]) -> bool {
        let (cols, bc) = (self.cols, self.block.1);
        let rows = out.len() / cols;
        // the block's values as f32, row-major
        let mut v = vec![0f32; rows * cols];
        let bad = load_f32(self.src_dtype, src, &mut v);
        for (t, sc) in scales.chunks_exact_mut(4).enumerate() {
            let (c0, c1) = (t * bc, ((t + 1) * bc).min(cols));
            let mut amax = 0f32;
            for r in 0..rows {
                amax = amax.max(absmax(&v[r * cols + c0..r * cols + c1]));
            }
            // as torch evaluates `448 / amax` (a Python number over a tensor): the
            // reciprocal, then the product
            let scale = if amax > 0.0 {
                (1.0 / amax) * E4M3_MAX
            } else {
                1.0
            };
            sc.copy_from_slice(&(1.0 / scale).to_le_bytes());
            for r in 0..rows {
                let (x, o) = (
                    &v[r * cols + c0..r * cols + c1],
                    &mut out[r * cols + c0..r * cols + c1],
                );
                for (o, &x) in o.iter_mut().zip(x) {
                    *o = e4m3fn(x * scale);
                }
            }
        }
        bad == 0
    }
}

/// The largest float8_e4m3fn value.
const E4M3_MAX: f32 = 448.0;

/// `clamp(x, -448, 448)` rounded to float8_e4m3fn bits: to nearest, ties to even, the
/// sign of zero kept (x finite).
#[inline(always)]
fn e4m3fn(x: f32) -> u8 {
    let sign = ((x.to_bits() >> 24) & 0x80) as u8;
    let a = x.abs();
    let a = if a > E4M3_MAX { E4M3_MAX } else { a };
    let code = if a < 0.015625 {
        // subnormal (and zero): a multiple of 2^-9, rounded with the 1.5 * 2^23 trick
        // (2^-6 itself, reached by rounding up, is code 8: exponent 1, mantissa 0)
        (((a * 512.0) + ROUND).to_bits() as i32).wrapping_sub(0x4B40_0000) as u32
    } else {
        // normal: round the f32 mantissa to 3 bits (a carry moves into the exponent),
        // then rebias the exponent from 127 to 7
        let b = a.to_bits();
        let r = b + (1 << 19) - 1 + ((b >> 20) & 1);
        (r >> 20) - (120 << 3)
    };
    sign | code as u8
}

fn finite_or_refused(finite: bool, what: &str) -> Result<()> {
    if finite {
        Ok(())
    } else {
        Err(Error::InvalidArgument {
            reason: format!("{what}: holds NaN or infinite values; refusing to quantize it"),
        })
    }
}

/// How a weight is cut: rows of `cols` values of `src_dtype`, groups of `group` values
/// sharing one scale of `scale_size` bytes, two codes a byte.
#[derive(Clone, Copy)]
struct Groups {
    cols: usize,
    group: usize,
    src_dtype: Dtype,
    scale_size: usize,
}

impl Groups {
    fn check(
        &self,
        rows: usize,
        src: usize,
        packed: usize,
        scales: usize,
        what: &str,
    ) -> Result<()> {
        let bad = |reason: String| {
            Err(Error::InvalidArgument {
                reason: format!("{what}: {reason}"),
            })
        };
        if !matches!(self.src_dtype, Dtype::BF16 | Dtype::F32) {
            return bad(format!("cannot quantize {:?} weights", self.src_dtype));
        }
        if self.group == 0 || !self.group.is_multiple_of(2) || !self.cols.is_multiple_of(self.group)
        {
            return bad(format!(
                "{} input columns are not a multiple of the (even) group {}",
                self.cols, self.group
            ));
        }
        let n = rows * self.cols;
        let want = (
            n * self.src_dtype.size() as usize,
            n / 2,
            n / self.group * self.scale_size,
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

    /// Runs `kernel` on every group (values, codes, scale bytes), rows in parallel on `pool`;
    /// false if a value is not finite. The AVX2 build of the same code runs where the
    /// CPU has it (the formulas are IEEE operations without contraction, so every build
    /// gives the same bits).
    fn run<K: GroupKernel>(
        &self,
        src: &[u8],
        packed: &mut [u8],
        scales: &mut [u8],
        pool: &rayon::ThreadPool,
        kernel: &K,
    ) -> bool {
        if self.cols == 0 || src.is_empty() {
            return true;
        }
        let es = self.src_dtype.size() as usize;
        pool.install(|| {
            src.par_chunks(self.cols * es)
                .zip(packed.par_chunks_mut(self.cols / 2))
                .zip(scales.par_chunks_mut(self.cols / self.group * self.scale_size))
                .all(|((s, p), sc)| {
                    #[cfg(target_arch = "x86_64")]
                    if std::arch::is_x86_feature_detected!("avx2") {
                        // SAFETY: the CPU supports AVX2 (checked just above).
                        return unsafe { self.row_avx2(s, p, sc, kernel) };
                    }
                    self.row(s, p, sc, kernel)
                })
        })
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn row_avx2<K: GroupKernel>(
        &self,
        src: &[u8],
        packed: &mut [u8],
        scales: &mut [u8],
        kernel: &K,
    ) -> bool {
        self.row(src, packed, scales, kernel)
    }

    /// One row, group by group: the values as f32, their finiteness, then the kernel.
    #[inline(always)]
    fn row<K: GroupKernel>(
        &self,
        src: &[u8],
        packed: &mut [u8],
        scales: &mut [u8],
        kernel: &K,
    ) -> bool {
        let g = self.group;
        let mut stack = [0f32; 64];
        let mut heap = Vec::new();
        let v: &mut [f32] = if g <= 64 {
            &mut stack[..g]
        } else {
            heap.resize(g, 0f32);
            &mut heap
        };
        let es = self.src_dtype.size() as usize;
        let mut bad = 0u32;
        for (k, (p, sc)) in packed
            .chunks_exact_mut(g / 2)
            .zip(scales.chunks_exact_mut(self.scale_size))
            .enumerate()
        {
            bad |= load_f32(self.src_dtype, &src[k * g * es..(k + 1) * g * es], v);
            kernel.group(v, p, sc);
        }
        bad == 0
    }
}

/// `src` (bf16 or f32, little-endian) into `v` as f32; nonzero if a value is not finite.
#[inline(always)]
fn load_f32(dtype: Dtype, src: &[u8], v: &mut [f32]) -> u32 {
    if dtype == Dtype::BF16 {
        for (x, b) in v.iter_mut().zip(src.chunks_exact(2)) {
            *x = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
        }
    } else {
        for (x, b) in v.iter_mut().zip(src.chunks_exact(4)) {
            *x = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
    }
    let mut bad = 0u32;
    for &x in v.iter() {
        bad |= ((x.to_bits() & 0x7fff_ffff) >= 0x7f80_0000) as u32;
    }
    bad
}

/// The largest |x| of a group (compressed-tensors' `max(|min(x, 0)|, max(x, 0)|)` is the
/// same value), with a compare-select max that vectorizes (NaNs were refused already).
#[inline(always)]
fn absmax(v: &[f32]) -> f32 {
    let mut m = 0f32;
    for &x in v {
        let a = x.abs();
        m = if a > m { a } else { m };
    }
    m
}

/// What turns one group of values (overwritten) into its codes and scale. A trait with
/// always-inlined methods, not a closure, so that each kernel is compiled into the AVX2
/// build of the row loop too.
trait GroupKernel: Sync {
    fn group(&self, v: &mut [f32], p: &mut [u8], sc: &mut [u8]);
}

/// int4 (`CT`: the compressed-tensors rule, else QAT; `BFQ`: the quotient is rounded to
/// bf16 first); the field: bf16 scales (else f32).
struct Int4<const CT: bool, const BFQ: bool>(bool);

impl<const CT: bool, const BFQ: bool> GroupKernel for Int4<CT, BFQ> {
    #[inline(always)]
    fn group(&self, v: &mut [f32], p: &mut [u8], sc: &mut [u8]) {
        int4_group::<CT, BFQ>(v, p, sc, self.0)
    }
}

struct Mxfp4;

impl GroupKernel for Mxfp4 {
    #[inline(always)]
    fn group(&self, v: &mut [f32], p: &mut [u8], sc: &mut [u8]) {
        mxfp4_group(v, p, sc)
    }
}

/// One int4 group. `v` is overwritten.
#[inline(always)]
fn int4_group<const CT: bool, const BFQ: bool>(
    v: &mut [f32],
    p: &mut [u8],
    sc: &mut [u8],
    bf16_scale: bool,
) {
    let amax = absmax(v);
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
    let scale = if bf16_scale {
        let b = bf16_bits(s);
        sc.copy_from_slice(&b.to_le_bytes());
        f32::from_bits((b as u32) << 16)
    } else {
        sc.copy_from_slice(&s.to_le_bytes());
        s
    };
    // (x + ROUND) holds the rounded integer k in its low mantissa bits (bits =
    // 0x4B40_0000 + k), so the stored nibble k + 8 is integer arithmetic on the bits;
    // it is kept in the bits of `v`
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

/// One MXFP4 group. `v` is overwritten.
#[inline(always)]
fn mxfp4_group(v: &mut [f32], p: &mut [u8], sc: &mut [u8]) {
    let amax = absmax(v);
    // absmax rounded to one mantissa bit; its biased exponent (0: zero or tiny, 255: it
    // overflowed) less E2M1's largest exponent, 2
    let e = ((amax.to_bits() + (1 << 21)) >> 23) & 0xFF;
    let e8 = if e == 255 { 255 } else { e.saturating_sub(2) };
    sc[0] = e8 as u8;
    let scale = if e8 == 0 {
        f32::from_bits(1 << 22) // 2^-127, a subnormal
    } else {
        f32::from_bits(e8 << 23)
    };
    for x in v.iter_mut() {
        let q = *x / scale;
        let m = q.abs();
        // the nearest E2M1 magnitude; at a tie the even code (0.75 -> 1, 1.25 -> 1, ...)
        let idx = (m > 0.25) as u32
            + (m >= 0.75) as u32
            + (m > 1.25) as u32
            + (m >= 1.75) as u32
            + (m > 2.5) as u32
            + (m >= 3.5) as u32
            + (m > 5.0) as u32;
        *x = f32::from_bits(idx | (((q < 0.0) as u32) << 3));
    }
    for (b, q) in p.iter_mut().zip(v.chunks_exact(2)) {
        *b = (q[0].to_bits() | (q[1].to_bits() << 4)) as u8;
    }
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
    fn mxfp4_rounds_ties_to_the_even_code_and_keeps_negative_zero() {
        // absmax 6 -> e8m0 127 (scale 1): the values are their own quotients
        let row = [6.0f32, 0.75, -0.25, -0.0, 1.25, -1.75, 5.0, -0.1];
        let bytes: Vec<u8> = row.iter().flat_map(|x| x.to_le_bytes()).collect();
        let (mut p, mut s) = (vec![0u8; 4], vec![0u8; 1]);
        quantize_mxfp4(1, 8, 8, Dtype::F32, &bytes, &mut p, &mut s, "w", &pool()).unwrap();
        assert_eq!(s, [127]);
        let codes: Vec<u8> = p.iter().flat_map(|b| [b & 15, b >> 4]).collect();
        // 6 -> 7; 0.75 -> 1.0 (code 2); -0.25 -> -0 (8); -0.0 -> +0; 1.25 -> 1.0 (2);
        // -1.75 -> -2 (8 | 4); 5 -> 4 (6); -0.1 -> -0 (8)
        assert_eq!(codes, [7, 2, 8, 0, 2, 12, 6, 8]);
    }

    #[test]
    fn e4m3fn_rounds_to_nearest_even_saturates_and_keeps_the_sign_of_zero() {
        let cases = [
            (448.0f32, 0x7E),
            (500.0, 0x7E),
            (400.0, 0x7C),
            (1.0625, 0x38),
            (1.1875, 0x3A),
            (0.015625, 0x08),
            (0.0146484375, 0x08),
            (2f32.powi(-10), 0x00),
            (3.0 * 2f32.powi(-10), 0x02),
            (-0.0, 0x80),
            (-1.0, 0xB8),
        ];
        for (x, code) in cases {
            assert_eq!(e4m3fn(x), code, "{x}");
        }
        // every finite value the format holds encodes to its own code
        for code in (0u8..=0x7E).chain(0x80..=0xFE) {
            assert_eq!(e4m3fn(crate::convert::e4m3_to_f32(code)), code, "{code:#x}");
        }
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

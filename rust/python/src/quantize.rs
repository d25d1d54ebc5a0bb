//! `quantize_int4()` / `quantize_mxfp4()` / `quantize_fp8_block()`: quantize-on-sync on
//! the CPU (GIL released).
//! The public API is `kimi_loader.quant`, which allocates the outputs.

use kimi_loader_core::quantize::{self, Int4Job, Int4Rule};
use kimi_loader_core::{threads, Dtype};
use pyo3::prelude::*;

use crate::buffer::{check_disjoint, dtype_of_torch, live_tensor, LiveBuffer};
use crate::errors::{detached, invalid};

/// A weight and its two outputs, checked: contiguous CPU tensors, pairwise disjoint.
struct Buffers {
    rows: usize,
    cols: usize,
    src_dtype: Dtype,
    scale_dtype: Dtype,
    src: LiveBuffer,
    packed: LiveBuffer,
    scale: LiveBuffer,
}

impl Buffers {
    fn new(
        py: Python<'_>,
        src: &Bound<'_, PyAny>,
        packed: &Bound<'_, PyAny>,
        scale: &Bound<'_, PyAny>,
        what: &str,
    ) -> PyResult<Buffers> {
        let dtype = |t: &Bound<'_, PyAny>, role: &str| -> PyResult<Dtype> {
            let name: String = t.getattr("dtype")?.str()?.extract()?;
            dtype_of_torch(&name)
                .ok_or_else(|| invalid(py, format!("{what}: {role} has dtype {name}")))
        };
        let shape: Vec<usize> = src.getattr("shape")?.extract()?;
        let [rows, cols] = shape[..] else {
            return Err(invalid(
                py,
                format!("{what}: expected a 2-D weight, got shape {shape:?}"),
            ));
        };
        let live = |t: &Bound<'_, PyAny>, role: &str| -> PyResult<LiveBuffer> {
            live_tensor(
                t,
                t.getattr("nbytes")?.extract()?,
                None,
                &format!("{what} ({role})"),
            )
        };
        let b = Buffers {
            rows,
            cols,
            src_dtype: dtype(src, "the weight")?,
            scale_dtype: dtype(scale, "the scale")?,
            src: live(src, "weight")?,
            packed: live(packed, "packed")?,
            scale: live(scale, "scale")?,
        };
        check_disjoint(
            py,
            &[
                ("weight", b.src.ptr, b.src.len),
                ("packed", b.packed.ptr, b.packed.len),
                ("scale", b.scale.ptr, b.scale.len),
            ],
        )?;
        Ok(b)
    }

    /// Runs `f(src, packed, scales)` with the GIL released.
    fn run<F>(self, py: Python<'_>, f: F) -> PyResult<()>
    where
        F: FnOnce(&[u8], &mut [u8], &mut [u8]) -> kimi_loader_core::Result<()> + Send,
    {
        detached(py, move || {
            // SAFETY: each buffer was checked in `new` against its live tensor (CPU,
            // contiguous, exactly `len` bytes, storage held by `self` until this
            // returns); the three are pairwise disjoint, and the outputs are fresh
            // tensors of the caller's that nothing else touches meanwhile.
            let (src, packed, scales) = unsafe {
                (
                    std::slice::from_raw_parts(self.src.ptr as *const u8, self.src.len as usize),
                    std::slice::from_raw_parts_mut(
                        self.packed.ptr as *mut u8,
                        self.packed.len as usize,
                    ),
                    std::slice::from_raw_parts_mut(
                        self.scale.ptr as *mut u8,
                        self.scale.len as usize,
                    ),
                )
            };
            f(src, packed, scales)
        })
    }
}

/// Quantizes the contiguous CPU `[rows, cols]` bf16 / f32 tensor `src` into ct-int4:
/// `packed` (`rows * cols / 2` bytes, any dtype) and `scale` (`[rows, cols / group]` of
/// bf16 or f32), both fresh tensors of the caller's. `what` names the weight in errors.
#[pyfunction]
#[pyo3(signature = (src, packed, scale, group, rule, what, threads=None))]
#[allow(clippy::too_many_arguments)]
pub fn quantize_int4(
    py: Python<'_>,
    src: Bound<'_, PyAny>,
    packed: Bound<'_, PyAny>,
    scale: Bound<'_, PyAny>,
    group: usize,
    rule: &str,
    what: &str,
    threads: Option<usize>,
) -> PyResult<()> {
    let rule = Int4Rule::parse(rule).ok_or_else(|| {
        invalid(
            py,
            format!("{what}: unknown int4 rule '{rule}' (compressed-tensors, int4-qat)"),
        )
    })?;
    let b = Buffers::new(py, &src, &packed, &scale, what)?;
    let job = Int4Job {
        rows: b.rows,
        cols: b.cols,
        group,
        src_dtype: b.src_dtype,
        scale_dtype: b.scale_dtype,
        rule,
    };
    b.run(py, |s, p, c| {
        quantize::quantize_int4(job, s, p, c, what, &*threads::pool(threads)?)
    })
}

/// Quantizes the contiguous CPU `[rows, cols]` bf16 / f32 tensor `src` into MXFP4:
/// `packed` (`rows * cols / 2` bytes of E2M1 codes) and `scale` (`rows * cols / group`
/// e8m0 bytes), both fresh tensors of the caller's.
#[pyfunction]
#[pyo3(signature = (src, packed, scale, group, what, threads=None))]
pub fn quantize_mxfp4(
    py: Python<'_>,
    src: Bound<'_, PyAny>,
    packed: Bound<'_, PyAny>,
    scale: Bound<'_, PyAny>,
    group: usize,
    what: &str,
    threads: Option<usize>,
) -> PyResult<()> {
    let b = Buffers::new(py, &src, &packed, &scale, what)?;
    let (rows, cols, dtype) = (b.rows, b.cols, b.src_dtype);
    b.run(py, |s, p, c| {
        quantize::quantize_mxfp4(
            rows,
            cols,
            group,
            dtype,
            s,
            p,
            c,
            what,
            &*threads::pool(threads)?,
        )
    })
}

/// Quantizes the contiguous CPU `[rows, cols]` bf16 / f32 tensor `src` into FP8-block
/// with float32 scales: `out` (`rows * cols` float8_e4m3fn) and `scale`
/// (`[ceil(rows / block_rows), ceil(cols / block_cols)]` float32 `weight_scale_inv`),
/// both fresh tensors of the caller's.
#[pyfunction]
#[pyo3(signature = (src, out, scale, block_rows, block_cols, what, threads=None))]
#[allow(clippy::too_many_arguments)]
pub fn quantize_fp8_block(
    py: Python<'_>,
    src: Bound<'_, PyAny>,
    out: Bound<'_, PyAny>,
    scale: Bound<'_, PyAny>,
    block_rows: usize,
    block_cols: usize,
    what: &str,
    threads: Option<usize>,
) -> PyResult<()> {
    let b = Buffers::new(py, &src, &out, &scale, what)?;
    if b.scale_dtype != Dtype::F32 {
        return Err(invalid(
            py,
            format!("{what}: FP8 scales must be float32 here"),
        ));
    }
    let (rows, cols, dtype) = (b.rows, b.cols, b.src_dtype);
    b.run(py, |s, o, c| {
        quantize::quantize_fp8_block(
            rows,
            cols,
            (block_rows, block_cols),
            dtype,
            s,
            o,
            c,
            what,
            &*threads::pool(threads)?,
        )
    })
}

//! `quantize_int4()`: quantize-on-sync into ct-int4 on the CPU (GIL released). The
//! public API is `kimi_loader.quant.quantize_int4`, which allocates the outputs.

use kimi_loader_core::quantize::{quantize_int4 as core_quantize, Int4Job, Int4Rule};
use kimi_loader_core::threads;
use pyo3::prelude::*;

use crate::buffer::{check_disjoint, dtype_of_torch, live_tensor};
use crate::errors::{detached, invalid};

/// Quantizes the contiguous CPU `[rows, cols]` bf16 / f32 tensor `src` into `packed`
/// (`rows * cols / 2` bytes, any dtype) and `scale` (`[rows, cols / group]` of bf16 or
/// f32), both fresh tensors of the caller's. `what` names the weight in errors.
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
    let dtype = |t: &Bound<'_, PyAny>, role: &str| -> PyResult<_> {
        let name: String = t.getattr("dtype")?.str()?.extract()?;
        dtype_of_torch(&name).ok_or_else(|| invalid(py, format!("{what}: {role} has dtype {name}")))
    };
    let shape: Vec<usize> = src.getattr("shape")?.extract()?;
    let [rows, cols] = shape[..] else {
        return Err(invalid(
            py,
            format!("{what}: expected a 2-D weight, got shape {shape:?}"),
        ));
    };
    let job = Int4Job {
        rows,
        cols,
        group,
        src_dtype: dtype(&src, "the weight")?,
        scale_dtype: dtype(&scale, "the scale")?,
        rule,
    };
    let nbytes = |t: &Bound<'_, PyAny>| -> PyResult<u64> { t.getattr("nbytes")?.extract() };
    let s = live_tensor(&src, nbytes(&src)?, None, &format!("{what} (weight)"))?;
    let p = live_tensor(&packed, nbytes(&packed)?, None, &format!("{what} (packed)"))?;
    let c = live_tensor(&scale, nbytes(&scale)?, None, &format!("{what} (scale)"))?;
    check_disjoint(
        py,
        &[
            ("weight", s.ptr, s.len),
            ("packed", p.ptr, p.len),
            ("scale", c.ptr, c.len),
        ],
    )?;
    let what = what.to_owned();
    detached(py, move || {
        let pool = threads::pool(threads)?;
        // SAFETY: each buffer was checked above against its live tensor (CPU, contiguous,
        // exactly `len` bytes, storage held by `s` / `p` / `c` until this returns); the
        // three are pairwise disjoint, and the outputs are fresh tensors of the caller's
        // that nothing else touches meanwhile.
        let (src, packed, scales) = unsafe {
            (
                std::slice::from_raw_parts(s.ptr as *const u8, s.len as usize),
                std::slice::from_raw_parts_mut(p.ptr as *mut u8, p.len as usize),
                std::slice::from_raw_parts_mut(c.ptr as *mut u8, c.len as usize),
            )
        };
        core_quantize(job, src, packed, scales, &what, &pool)
    })
}

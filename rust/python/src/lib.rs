//! `kimi_loader._core`: thin pyo3 bindings over `kimi_loader_core`.
//!
//! Table of contents:
//! - [`errors`]: the one bridge from core errors to the `kimi_loader.errors` hierarchy,
//!   and the one gateway that releases the GIL for slow work.
//! - [`checkpoint`]: `open()` and the `Checkpoint` class (tensor table, reads).
//! - [`buffer`]: `ShardBuffer`, a writable copy-on-write buffer over one mapped shard,
//!   from which zero-copy tensors are viewed.
//! - [`plan`]: `plan()` and the `Plan` class: copy plans built from rules given as data,
//!   executed into destination tensors.
//! - [`quantize`]: `quantize_int4()` / `quantize_mxfp4()` / `quantize_fp8_block()`,
//!   quantize-on-sync on the CPU.
//! - [`update`]: `UpdateState` / `Selection`: hot-reload's change selection.

mod buffer;
mod checkpoint;
mod errors;
mod plan;
mod quantize;
mod update;

use pyo3::prelude::*;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("MAX_HEADER_LEN", kimi_loader_core::MAX_HEADER_LEN)?;
    m.add("THREADS_ENV", kimi_loader_core::threads::THREADS_ENV)?;
    m.add("MAX_THREADS", kimi_loader_core::threads::MAX_THREADS)?;
    m.add("OP_TABLE_COLS", kimi_loader_core::exec::OP_TABLE_COLS)?;
    m.add_function(wrap_pyfunction!(checkpoint::open, m)?)?;
    m.add_function(wrap_pyfunction!(checkpoint::resolve_threads, m)?)?;
    m.add_function(wrap_pyfunction!(checkpoint::from_tensors, m)?)?;
    m.add_class::<checkpoint::Checkpoint>()?;
    m.add_class::<buffer::ShardBuffer>()?;
    m.add_function(wrap_pyfunction!(plan::plan, m)?)?;
    m.add_class::<plan::Plan>()?;
    m.add_function(wrap_pyfunction!(quantize::quantize_int4, m)?)?;
    m.add_function(wrap_pyfunction!(quantize::quantize_mxfp4, m)?)?;
    m.add_function(wrap_pyfunction!(quantize::quantize_fp8_block, m)?)?;
    m.add_class::<update::UpdateState>()?;
    m.add_class::<update::Selection>()?;
    Ok(())
}

//! One bridge from [`kimi_loader_core::Error`] to Python exceptions, and one gateway for
//! slow calls.
//!
//! The exception classes live in `kimi_loader/errors.py` (so that a class can inherit
//! from both `KimiLoaderError` and a builtin such as `FileNotFoundError`); each core
//! variant maps to exactly one of them, and the instance carries `file`, `tensor`,
//! `destination`, `expected`, `found` and `kind` attributes.

use kimi_loader_core::Error;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;

fn class_name(e: &Error) -> &'static str {
    match e {
        Error::NotFound { .. } => "CheckpointNotFoundError",
        Error::Io { .. } => "CheckpointIOError",
        Error::Header { .. } => "HeaderError",
        Error::Index { .. } => "IndexMismatchError",
        Error::MissingTensor { .. } => "MissingTensorError",
        Error::ShapeMismatch { .. } => "ShapeMismatchError",
        Error::Unsupported { .. } => "UnsupportedFormatError",
        Error::Plan { .. } => "PlanError",
        Error::InvalidArgument { .. } => "InvalidArgumentError",
        Error::Internal { .. } => "InternalError",
    }
}

fn errors_module(py: Python<'_>) -> PyResult<&Bound<'_, PyModule>> {
    static MODULE: PyOnceLock<Py<PyModule>> = PyOnceLock::new();
    MODULE
        .get_or_try_init(py, || {
            Ok::<_, PyErr>(py.import("kimi_loader.errors")?.unbind())
        })
        .map(|m| m.bind(py))
}

/// Converts a core error into an instance of its `kimi_loader.errors` class.
pub fn to_pyerr(py: Python<'_>, e: Error) -> PyErr {
    let build = || -> PyResult<PyErr> {
        let cls = errors_module(py)?.getattr(class_name(&e))?;
        let exc = cls.call1((e.to_string(),))?;
        exc.setattr("file", e.file().map(|f| f.display().to_string()))?;
        exc.setattr("tensor", e.tensor())?;
        exc.setattr("destination", e.destination())?;
        if let Some((expected, found)) = e.shapes() {
            exc.setattr("expected", pyo3::types::PyTuple::new(py, expected)?)?;
            exc.setattr("found", pyo3::types::PyTuple::new(py, found)?)?;
        }
        exc.setattr("kind", e.kind())?;
        Ok(PyErr::from_value(exc))
    };
    build().unwrap_or_else(|import_failure| import_failure)
}

/// An `InvalidArgumentError` with `reason`: the bindings' answer to a bad argument.
pub fn invalid(py: Python<'_>, reason: String) -> PyErr {
    to_pyerr(py, Error::InvalidArgument { reason })
}

/// Runs `f`, turning a panic (a bug) into [`Error::Internal`]: no panic ever crosses
/// into Python as a `PanicException`.
pub fn no_panic<T>(f: impl FnOnce() -> kimi_loader_core::Result<T>) -> kimi_loader_core::Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        let reason = payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic".into());
        Err(Error::Internal { reason })
    })
}

/// The gateway for slow work: releases the GIL, runs `f` (panics caught), converts its
/// error.
pub fn detached<T, F>(py: Python<'_>, f: F) -> PyResult<T>
where
    T: Send,
    F: FnOnce() -> kimi_loader_core::Result<T> + Send,
{
    py.detach(|| no_panic(f)).map_err(|e| to_pyerr(py, e))
}

//! A Python buffer over one shard's private mapping, so that `torch.frombuffer` can view
//! tensors without copying. The buffer is writable because the mapping is copy-on-write:
//! writes through a view land in private pages, never in the file.

use std::ffi::c_int;
use std::sync::Arc;

use kimi_loader_core::Checkpoint;
use pyo3::exceptions::PyBufferError;
use pyo3::ffi;
use pyo3::prelude::*;

/// The whole mapped file of one shard (header included) as a writable byte buffer.
/// Holding it (or any tensor viewed from it) keeps the mapping alive.
#[pyclass(frozen, module = "kimi_loader._core")]
pub struct ShardBuffer {
    pub ckpt: Arc<Checkpoint>,
    pub shard: usize,
}

#[pymethods]
impl ShardBuffer {
    fn __len__(&self) -> usize {
        self.ckpt.shards[self.shard].map_len()
    }

    #[getter]
    fn path(&self) -> String {
        self.ckpt.shards[self.shard].path.display().to_string()
    }

    /// Base address of the mapping (for tests that prove views are zero-copy).
    #[getter]
    fn address(&self) -> usize {
        self.ckpt.shards[self.shard].map_ptr() as usize
    }

    /// # Safety
    /// Called by CPython with a valid `view` to fill.
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        if view.is_null() {
            return Err(PyBufferError::new_err("view is null"));
        }
        let (ptr, len) = {
            let me = slf.get();
            let shard = &me.ckpt.shards[me.shard];
            (shard.map_ptr(), shard.map_len())
        };
        // SAFETY: `ptr..ptr+len` is the shard's private mapping, which lives as long as
        // the `Arc<Checkpoint>` held by `slf`; PyBuffer_FillInfo stores a new reference
        // to `slf` in `view.obj`, so the mapping outlives every consumer of the view.
        // The mapping is MAP_PRIVATE and writable, so advertising it writable is sound.
        let rc = unsafe {
            ffi::PyBuffer_FillInfo(
                view,
                slf.as_ptr(),
                ptr.cast(),
                len as ffi::Py_ssize_t,
                0,
                flags,
            )
        };
        if rc == -1 {
            return Err(PyErr::fetch(slf.py()));
        }
        Ok(())
    }

    /// # Safety
    /// Called by CPython; nothing was allocated per view, so nothing is released.
    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {}
}

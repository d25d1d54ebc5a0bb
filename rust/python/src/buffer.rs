//! A Python buffer over one shard's private mapping, so that `torch.frombuffer` can view
//! tensors without copying. The buffer is writable because the mapping is copy-on-write:
//! writes through a view land in private pages, never in the file.

use std::ffi::c_int;
use std::sync::Arc;

use kimi_loader_core::{Checkpoint, Dtype};
use pyo3::exceptions::PyBufferError;
use pyo3::ffi;
use pyo3::prelude::*;

use crate::errors::invalid;

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

/// A destination tensor checked at the call: its live address and size, with its storage
/// held so that the memory outlives the (GIL-released) write even if another thread
/// rebinds the tensor's `.data` meanwhile.
pub struct LiveBuffer {
    pub ptr: usize,
    pub len: u64,
    /// the tensor's `untyped_storage()` (kept alive; never read from Rust)
    pub _keep: Py<PyAny>,
}

/// The `torch.dtype` spelling of a safetensors dtype.
fn torch_name(d: Dtype) -> &'static str {
    match d {
        Dtype::Bool => "torch.bool",
        Dtype::U8 => "torch.uint8",
        Dtype::I8 => "torch.int8",
        Dtype::U16 => "torch.uint16",
        Dtype::I16 => "torch.int16",
        Dtype::U32 => "torch.uint32",
        Dtype::I32 => "torch.int32",
        Dtype::U64 => "torch.uint64",
        Dtype::I64 => "torch.int64",
        Dtype::F16 => "torch.float16",
        Dtype::BF16 => "torch.bfloat16",
        Dtype::F32 => "torch.float32",
        Dtype::F64 => "torch.float64",
        Dtype::F8E4M3 => "torch.float8_e4m3fn",
        Dtype::F8E5M2 => "torch.float8_e5m2",
        Dtype::F8E8M0 => "torch.float8_e8m0fnu",
    }
}

/// Checks `t` (a `torch.Tensor`) is a contiguous CPU tensor of exactly `want` bytes of
/// dtype `dtype` (or a uint8 tensor of those bytes: a staging view; `None` = raw bytes),
/// and returns its live buffer. `what` names it in errors.
pub fn live_tensor(
    t: &Bound<'_, PyAny>,
    want: u64,
    dtype: Option<Dtype>,
    what: &str,
) -> PyResult<LiveBuffer> {
    checked_tensor(t, want, dtype, what, false)
}

/// The same for a contiguous tensor on a non-CPU device (its address is never
/// dereferenced on the host).
pub fn device_tensor(t: &Bound<'_, PyAny>, want: u64, what: &str) -> PyResult<LiveBuffer> {
    checked_tensor(t, want, None, what, true)
}

fn checked_tensor(
    t: &Bound<'_, PyAny>,
    want: u64,
    dtype: Option<Dtype>,
    what: &str,
    on_device: bool,
) -> PyResult<LiveBuffer> {
    let py = t.py();
    let err = |reason: String| invalid(py, format!("{what}: {reason}"));
    let attr = |name: &str| {
        t.getattr(name)
            .map_err(|_| err(format!("expected a torch.Tensor, got {}", type_name(t))))
    };
    let device: String = attr("device")?
        .getattr("type")
        .and_then(|d| d.extract())
        .map_err(|_| err("has no device type".into()))?;
    if !on_device && device != "cpu" {
        return Err(err(format!(
            "must be a CPU tensor, found device '{device}'"
        )));
    }
    if on_device && (device == "cpu" || device == "meta") {
        return Err(err(format!("must be on a device, found '{device}'")));
    }
    let contiguous: bool = attr("is_contiguous")?.call0()?.extract()?;
    if !contiguous {
        return Err(err("must be contiguous".into()));
    }
    let nbytes: u64 = attr("nbytes")?.extract()?;
    let found: String = attr("dtype")?.str()?.extract()?;
    let dtype_ok = match dtype {
        None => true,
        Some(d) => found == torch_name(d) || found == "torch.uint8",
    };
    if nbytes != want || !dtype_ok {
        let need = dtype.map_or("bytes", torch_name);
        return Err(err(format!(
            "holds {nbytes} bytes of {found}, the plan needs {want} bytes of {need} \
             (was it resized or cast after planning?)"
        )));
    }
    let ptr: usize = attr("data_ptr")?.call0()?.extract()?;
    if ptr == 0 && want > 0 {
        return Err(err("has no storage".into()));
    }
    let keep = attr("untyped_storage")?.call0()?.unbind();
    Ok(LiveBuffer {
        ptr,
        len: want,
        _keep: keep,
    })
}

/// The safetensors dtype of a `torch.dtype` spelling (`"torch.bfloat16"`).
pub fn dtype_of_torch(name: &str) -> Option<Dtype> {
    use Dtype::*;
    [
        Bool, U8, I8, U16, I16, U32, I32, U64, I64, F16, BF16, F32, F64, F8E4M3, F8E5M2, F8E8M0,
    ]
    .into_iter()
    .find(|d| torch_name(*d) == name)
}

fn type_name(t: &Bound<'_, PyAny>) -> String {
    t.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into())
}

/// Refuses buffers that share bytes (two destinations aliasing one storage, or a staging
/// arena overlapping a destination): parallel writes into the same bytes are undefined.
pub fn check_disjoint(py: Python<'_>, bufs: &[(&str, usize, u64)]) -> PyResult<()> {
    let mut spans: Vec<(usize, u64, &str)> = bufs
        .iter()
        .filter(|(_, _, len)| *len > 0)
        .map(|(name, ptr, len)| (*ptr, *len, *name))
        .collect();
    spans.sort_unstable_by_key(|s| s.0);
    for w in spans.windows(2) {
        if w[0].0 as u64 + w[0].1 > w[1].0 as u64 {
            return Err(invalid(
                py,
                format!("'{}' and '{}' share memory", w[0].2, w[1].2),
            ));
        }
    }
    Ok(())
}

/// Refuses destinations in memory the process may not write (e.g. a read-only `np.memmap`
/// viewed as a tensor): writing there would be a segfault, not an exception. Checked
/// against `/proc/self/maps` (one read per call); elsewhere, or if it cannot be read, the
/// check is skipped.
pub fn check_writable(py: Python<'_>, bufs: &[(&str, usize, u64)]) -> PyResult<()> {
    let Some(maps) = writable_ranges() else {
        return Ok(());
    };
    for &(name, ptr, len) in bufs.iter().filter(|b| b.2 > 0) {
        let (start, end) = (ptr as u64, ptr as u64 + len);
        // the mappings that cover [start, end) must be contiguous and all writable
        let mut at = start;
        let mut i = maps.partition_point(|m| m.1 <= at);
        while at < end {
            match maps.get(i) {
                Some(&(lo, hi, w)) if lo <= at && w => {
                    at = hi;
                    i += 1;
                }
                _ => {
                    return Err(invalid(
                        py,
                        format!(
                            "'{name}' is not writable memory (a read-only mapping, \
                             e.g. np.memmap(mode='r')?); pass a writable tensor"
                        ),
                    ))
                }
            }
        }
    }
    Ok(())
}

/// `(start, end, writable)` of every mapping of this process, sorted by address.
fn writable_ranges() -> Option<Vec<(u64, u64, bool)>> {
    let text = std::fs::read_to_string("/proc/self/maps").ok()?;
    let mut out = Vec::new();
    for line in text.lines() {
        let mut parts = line.split_ascii_whitespace();
        let (range, perms) = (parts.next()?, parts.next()?);
        let (lo, hi) = range.split_once('-')?;
        let lo = u64::from_str_radix(lo, 16).ok()?;
        let hi = u64::from_str_radix(hi, 16).ok()?;
        out.push((lo, hi, perms.as_bytes().get(1) == Some(&b'w')));
    }
    out.sort_unstable_by_key(|m| m.0);
    Some(out)
}

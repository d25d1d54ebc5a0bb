//! `open()` and the `Checkpoint` class. The public Python API (`kimi_loader.Checkpoint`)
//! wraps this class; everything here is shaped for that wrapper, not for end users.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use kimi_loader_core::census::Census;
use kimi_loader_core::exec::{hash_tensors, read_tasks, ReadOptions, ReadTask};
use kimi_loader_core::shard::MemTensor;
use kimi_loader_core::{threads, Checkpoint as CoreCheckpoint, Error};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::buffer::{
    check_disjoint, check_writable, device_tensor, dtype_of_torch, live_tensor, LiveBuffer,
    ShardBuffer,
};
use crate::errors::{detached, invalid, to_pyerr};

/// `(shard, dtype, shape, absolute offset, nbytes)` of one tensor.
type Location = (usize, &'static str, Vec<u64>, u64, u64);

/// `(name, dtype, shape, shard, absolute offset, nbytes)` of one tensor.
type TableRow<'a> = (&'a str, &'static str, Vec<u64>, usize, u64, u64);

#[pyclass(frozen, module = "kimi_loader._core")]
pub struct Checkpoint {
    inner: Arc<CoreCheckpoint>,
    threads: Option<usize>,
}

/// Opens and validates a checkpoint (GIL released).
#[pyfunction]
#[pyo3(signature = (paths, threads=None))]
pub fn open(py: Python<'_>, paths: Vec<PathBuf>, threads: Option<usize>) -> PyResult<Checkpoint> {
    let inner = detached(py, || CoreCheckpoint::open(&paths, threads))?;
    Ok(Checkpoint {
        inner: Arc::new(inner),
        threads,
    })
}

/// A checkpoint of in-memory tensors (contiguous CPU `torch.Tensor`s), read in place:
/// what `update_from_tensors` plans against. The tensors' storages are held until
/// `release()` (or until the checkpoint and every plan built from it are gone). `label`
/// stands for the file in error messages.
///
/// With `device=True` the tensors are contiguous tensors of one non-CPU device: the host
/// never reads them (hashing or the CPU executor fail, naming the checkpoint); plans
/// built against them run on a device executor (`Plan.op_table`).
#[pyfunction]
#[pyo3(signature = (label, names, tensors, threads=None, device=false))]
pub fn from_tensors(
    py: Python<'_>,
    label: &str,
    names: Vec<String>,
    tensors: Vec<Bound<'_, PyAny>>,
    threads: Option<usize>,
    device: bool,
) -> PyResult<Checkpoint> {
    if names.len() != tensors.len() {
        return Err(invalid(
            py,
            format!("{} names for {} tensors", names.len(), tensors.len()),
        ));
    }
    let mut mem = Vec::with_capacity(names.len());
    let mut keep = Vec::with_capacity(names.len());
    for (name, t) in names.into_iter().zip(&tensors) {
        let what = format!("{label}: tensor '{name}'");
        let nbytes: u64 = t
            .getattr("nbytes")
            .and_then(|n| n.extract())
            .map_err(|_| invalid(py, format!("{what}: expected a torch.Tensor")))?;
        let live = if device {
            device_tensor(t, nbytes, &what)?
        } else {
            live_tensor(t, nbytes, None, &what)?
        };
        let found: String = t.getattr("dtype")?.str()?.extract()?;
        let dtype = dtype_of_torch(&found).ok_or_else(|| {
            invalid(
                py,
                format!("{what}: dtype {found} has no safetensors equivalent"),
            )
        })?;
        let shape: Vec<u64> = t.getattr("shape")?.extract()?;
        mem.push(MemTensor {
            name,
            dtype,
            shape,
            ptr: live.ptr,
            len: live.len,
        });
        keep.push(live);
    }
    // SAFETY: every region is the data of a contiguous tensor checked above (on the CPU,
    // or with `device` on a device: such a checkpoint is marked so and the host never
    // reads it), whose storage `keep` holds as long as the checkpoint holds `keep`;
    // callers must not modify the tensors while an update reads them (documented on
    // `update_from_tensors`).
    let inner =
        unsafe { CoreCheckpoint::from_memory(label, mem, Box::new(KeepAlive(keep)), device) }
            .map_err(|e| to_pyerr(py, e))?;
    Ok(Checkpoint {
        inner: Arc::new(inner),
        threads,
    })
}

/// The storages of the tensors of a memory checkpoint (dropped without the GIL at
/// worst: pyo3 defers the decrefs).
struct KeepAlive(#[allow(dead_code)] Vec<LiveBuffer>);

/// The thread count a call with `threads` would use (argument, env var, CPU count).
#[pyfunction]
#[pyo3(signature = (threads=None))]
pub fn resolve_threads(py: Python<'_>, threads: Option<usize>) -> PyResult<usize> {
    threads::resolve(threads).map_err(|e| to_pyerr(py, e))
}

impl Checkpoint {
    /// The shared core checkpoint (for plans).
    pub fn core(&self) -> Arc<CoreCheckpoint> {
        self.inner.clone()
    }

    /// The thread count it was opened with.
    pub fn threads(&self) -> Option<usize> {
        self.threads
    }

    fn locate_one(&self, name: &str) -> kimi_loader_core::Result<Location> {
        let (id, e) = self.inner.get(name)?;
        let shard = self.inner.shard(id);
        Ok((
            id.shard as usize,
            e.dtype.as_str(),
            e.shape.to_vec(),
            shard.abs_offset(e),
            e.nbytes(),
        ))
    }
}

#[pymethods]
impl Checkpoint {
    fn __len__(&self) -> usize {
        self.inner.len()
    }

    fn __contains__(&self, name: &str) -> bool {
        self.inner.find(name).is_some()
    }

    /// Tensor names, sorted.
    fn keys(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.inner.iter().map(|(_, e)| &*e.name).collect();
        names.sort_unstable();
        names
    }

    /// Shard file paths, in shard order.
    fn files(&self) -> Vec<String> {
        self.inner
            .shards
            .iter()
            .map(|s| s.path.display().to_string())
            .collect()
    }

    #[getter]
    fn index_path(&self) -> Option<String> {
        self.inner
            .index_path
            .as_ref()
            .map(|p| p.display().to_string())
    }

    #[getter]
    fn root(&self) -> Option<String> {
        self.inner.root.as_ref().map(|p| p.display().to_string())
    }

    #[getter]
    fn config_json(&self) -> Option<&str> {
        self.inner.config_json.as_deref()
    }

    /// Seconds per stage of the open: index, shards, names, cross_check, total.
    #[getter]
    fn open_timings(&self) -> Vec<(&'static str, f64)> {
        let t = self.inner.timings;
        vec![
            ("index", t.index),
            ("shards", t.shards),
            ("names", t.names),
            ("cross_check", t.cross_check),
            ("total", t.total),
        ]
    }

    #[getter]
    fn data_bytes(&self) -> u64 {
        self.inner.data_bytes()
    }

    /// Header bytes of every shard (length prefix included).
    #[getter]
    fn header_bytes(&self) -> u64 {
        self.inner.shards.iter().map(|s| s.header.data_start).sum()
    }

    /// `__metadata__` of every shard, merged in shard order.
    fn metadata(&self) -> Vec<(String, String)> {
        self.inner
            .shards
            .iter()
            .flat_map(|s| s.header.metadata.iter().cloned())
            .collect()
    }

    /// `(shard, dtype, shape, absolute_offset, nbytes)` of one tensor.
    fn locate(&self, py: Python<'_>, name: &str) -> PyResult<Location> {
        self.locate_one(name).map_err(|e| to_pyerr(py, e))
    }

    /// Every tensor as `(name, dtype, shape, shard, absolute_offset, nbytes)`, in
    /// storage order.
    fn table(&self) -> Vec<TableRow<'_>> {
        self.inner
            .iter()
            .map(|(id, e)| {
                let s = self.inner.shard(id);
                (
                    &*e.name,
                    e.dtype.as_str(),
                    e.shape.to_vec(),
                    id.shard as usize,
                    s.abs_offset(e),
                    e.nbytes(),
                )
            })
            .collect()
    }

    /// The mapped bytes of shard `shard` as a writable (copy-on-write) buffer.
    fn shard_buffer(&self, py: Python<'_>, shard: usize) -> PyResult<ShardBuffer> {
        if shard >= self.inner.shards.len() {
            return Err(to_pyerr(
                py,
                Error::InvalidArgument {
                    reason: format!(
                        "shard {shard} out of range ({} shards)",
                        self.inner.shards.len()
                    ),
                },
            ));
        }
        if self.inner.shards[shard].is_memory() {
            return Err(invalid(
                py,
                "tensors handed over in memory have no mapped file to view".into(),
            ));
        }
        Ok(ShardBuffer {
            ckpt: self.inner.clone(),
            shard,
        })
    }

    /// Copies tensors `names[i]` into `tensors[i]` (contiguous CPU tensors of exactly the
    /// checkpoint tensor's bytes, pairwise disjoint; checked here), in parallel with the
    /// GIL released. The tensors' storages are held until the copy returns.
    #[pyo3(signature = (names, tensors, chunk=None))]
    fn read_into(
        &self,
        py: Python<'_>,
        names: Vec<String>,
        tensors: Vec<Bound<'_, PyAny>>,
        chunk: Option<usize>,
    ) -> PyResult<()> {
        if names.len() != tensors.len() {
            return Err(to_pyerr(
                py,
                Error::InvalidArgument {
                    reason: format!("{} names for {} tensors", names.len(), tensors.len()),
                },
            ));
        }
        let mut live = Vec::with_capacity(names.len());
        let mut tasks = Vec::with_capacity(names.len());
        for (name, t) in names.iter().zip(&tensors) {
            let (id, e) = self.inner.get(name).map_err(|e| to_pyerr(py, e))?;
            let b = live_tensor(
                t,
                e.nbytes(),
                Some(e.dtype),
                &format!("destination of '{name}'"),
            )?;
            tasks.push(ReadTask {
                shard: id.shard,
                offset: self.inner.shard(id).abs_offset(e),
                len: e.nbytes(),
                dst: b.ptr as *mut u8,
            });
            live.push(b);
        }
        let spans: Vec<(&str, usize, u64)> = names
            .iter()
            .zip(&live)
            .map(|(n, b)| (n.as_str(), b.ptr, b.len))
            .collect();
        check_disjoint(py, &spans)?;
        check_writable(py, &spans)?;
        let inner = self.inner.clone();
        let threads = self.threads;
        detached(py, move || {
            let _live = live;
            let pool = threads::pool(threads)?;
            let mut opts = ReadOptions::default();
            if let Some(c) = chunk {
                opts.chunk = c;
            }
            // SAFETY: every destination was checked above against its live tensor (CPU,
            // contiguous, exactly the tensor's bytes, pairwise disjoint) and `_live` holds
            // the storages until this returns.
            unsafe { read_tasks(&inner, &tasks, &pool, opts) }
        })
    }

    /// Lets go of the tensors of a `from_tensors` checkpoint (later reads fail).
    fn release(&self) {
        self.inner.release();
    }

    /// What the checkpoint holds, counted in one pass (see `kimi_loader_core::census`):
    /// `{"dtypes", "prefixes": {str: count}, "layers": [int], "experts": {layer: count},
    /// "expert_suffixes", "shared_suffixes": [str]}`.
    fn census<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let inner = self.inner.clone();
        let c = py.detach(move || Census::of(&inner));
        let d = PyDict::new(py);
        d.set_item("dtypes", c.dtypes)?;
        d.set_item("prefixes", c.prefixes)?;
        d.set_item("layers", c.layers.into_iter().collect::<Vec<_>>())?;
        let experts: BTreeMap<u64, usize> = c.experts.iter().map(|(l, e)| (*l, e.len())).collect();
        d.set_item("experts", experts)?;
        d.set_item(
            "expert_suffixes",
            c.expert_suffixes.into_iter().collect::<Vec<_>>(),
        )?;
        d.set_item(
            "shared_suffixes",
            c.shared_suffixes.into_iter().collect::<Vec<_>>(),
        )?;
        Ok(d)
    }

    /// xxh3-64 of each named tensor's bytes, in parallel (GIL released).
    fn hash_tensors(&self, py: Python<'_>, names: Vec<String>) -> PyResult<Vec<u64>> {
        let (inner, threads) = (self.inner.clone(), self.threads);
        detached(py, move || {
            let ids = names
                .iter()
                .map(|n| inner.get(n).map(|(id, _)| id))
                .collect::<kimi_loader_core::Result<Vec<_>>>()?;
            let pool = threads::pool(threads)?;
            hash_tensors(&inner, &ids, &pool)
        })
    }
}

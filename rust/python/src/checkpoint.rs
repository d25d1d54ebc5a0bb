//! `open()` and the `Checkpoint` class. The public Python API (`kimi_loader.Checkpoint`)
//! wraps this class; everything here is shaped for that wrapper, not for end users.

use std::path::PathBuf;
use std::sync::Arc;

use kimi_loader_core::exec::{hash_tensors, read_tasks, ReadOptions, ReadTask};
use kimi_loader_core::{threads, Checkpoint as CoreCheckpoint, Error};
use pyo3::prelude::*;

use crate::buffer::ShardBuffer;
use crate::errors::{detached, to_pyerr};

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
        Ok(ShardBuffer {
            ckpt: self.inner.clone(),
            shard,
        })
    }

    /// Copies tensors `names[i]` into `addresses[i]` (each `nbytes[i]` bytes, which must
    /// equal the tensor's size), in parallel with the GIL released.
    ///
    /// The caller (the Python wrapper) guarantees each address is the start of a live,
    /// contiguous, writable CPU buffer of that many bytes, disjoint from the others and
    /// untouched until this returns.
    #[pyo3(signature = (names, addresses, nbytes, chunk=None))]
    fn read_into(
        &self,
        py: Python<'_>,
        names: Vec<String>,
        addresses: Vec<usize>,
        nbytes: Vec<u64>,
        chunk: Option<usize>,
    ) -> PyResult<()> {
        if names.len() != addresses.len() || names.len() != nbytes.len() {
            return Err(to_pyerr(
                py,
                Error::InvalidArgument {
                    reason: "names, addresses and nbytes differ in length".into(),
                },
            ));
        }
        let inner = self.inner.clone();
        let threads = self.threads;
        detached(py, move || {
            let mut tasks = Vec::with_capacity(names.len());
            for ((name, addr), n) in names.iter().zip(&addresses).zip(&nbytes) {
                let (id, e) = inner.get(name)?;
                if e.nbytes() != *n {
                    return Err(Error::ShapeMismatch {
                        file: inner.shard(id).path.clone(),
                        tensor: name.clone(),
                        expected: vec![*n],
                        found: vec![e.nbytes()],
                    });
                }
                if *addr == 0 && *n > 0 {
                    return Err(Error::InvalidArgument {
                        reason: format!("null destination for '{name}'"),
                    });
                }
                tasks.push(ReadTask {
                    shard: id.shard,
                    offset: inner.shard(id).abs_offset(e),
                    len: e.nbytes(),
                    dst: *addr as *mut u8,
                });
            }
            let pool = threads::pool(threads)?;
            // SAFETY: the wrapper passes the data pointers of freshly allocated (or
            // caller-owned, checked contiguous and of matching size) CPU tensors that it
            // keeps alive and does not touch during the call; sizes were checked above.
            let mut opts = ReadOptions::default();
            if let Some(c) = chunk {
                opts.chunk = c;
            }
            unsafe { read_tasks(&inner, &tasks, &pool, opts) }
        })
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

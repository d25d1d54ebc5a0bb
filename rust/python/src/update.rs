//! `UpdateState` and `Selection`: hot-reload's change selection in Rust (the source
//! hashes the model holds; hash, compare and pick ops with the GIL released).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use kimi_loader_core::threads;
use kimi_loader_core::update::{select_changed, Selection as CoreSelection};
use pyo3::prelude::*;

use crate::checkpoint::Checkpoint;
use crate::errors::detached;
use crate::plan::Plan;

/// The xxh3-64 of every source tensor as the model holds it, by checkpoint name.
#[pyclass(frozen, module = "kimi_loader._core")]
#[derive(Default)]
pub struct UpdateState {
    hashes: Arc<Mutex<HashMap<String, u64>>>,
}

/// What one update changes (from `UpdateState.select`); apply with `UpdateState.commit`
/// once the update succeeded.
#[pyclass(frozen, module = "kimi_loader._core")]
pub struct Selection {
    inner: CoreSelection,
}

fn locked(m: &Mutex<HashMap<String, u64>>) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl UpdateState {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        locked(&self.hashes)
    }
}

#[pymethods]
impl UpdateState {
    #[new]
    fn new() -> Self {
        Self::default()
    }

    fn __len__(&self) -> usize {
        self.lock().len()
    }

    /// The hash held for `name`, if any.
    fn get(&self, name: &str) -> Option<u64> {
        self.lock().get(name).copied()
    }

    /// Forgets what is held for `names` (their next update is taken as a change): for
    /// updates applied without hashing (device memory).
    fn forget(&self, names: Vec<String>) {
        let mut held = self.lock();
        for n in names {
            held.remove(&n);
        }
    }

    /// Records `(name, hash)` pairs (e.g. a streamed update's, once applied).
    fn set(&self, items: Vec<(String, u64)>) {
        self.lock().extend(items);
    }

    /// Hashes the sources of `plan` (in `ckpt`; only those named in `only`, if given) and
    /// selects the ops whose sources differ from what is held. GIL released.
    #[pyo3(signature = (plan, ckpt, only=None))]
    fn select(
        &self,
        py: Python<'_>,
        plan: &Plan,
        ckpt: &Checkpoint,
        only: Option<Vec<String>>,
    ) -> PyResult<Selection> {
        let (core_plan, core_ckpt, threads) = (plan.core(), ckpt.core(), ckpt.threads());
        let hashes = self.hashes.clone();
        let inner = detached(py, move || {
            let only: Option<HashSet<String>> = only.map(|o| o.into_iter().collect());
            let pool = threads::pool(threads)?;
            // (held while hashing: a concurrent select or commit waits; no GIL is needed here)
            let held = locked(&hashes);
            select_changed(&core_ckpt, &core_plan, only.as_ref(), &held, &pool)
        })?;
        Ok(Selection { inner })
    }

    /// Takes in the hashes of a successful update.
    fn commit(&self, selection: &Selection) {
        self.lock().extend(selection.inner.hashed.iter().cloned());
    }
}

#[pymethods]
impl Selection {
    /// The op indices to execute, ascending.
    #[getter]
    fn which(&self) -> Vec<usize> {
        self.inner.which.clone()
    }

    /// Source tensors hashed.
    #[getter]
    fn tensors(&self) -> usize {
        self.inner.hashed.len()
    }

    /// Source tensors whose bytes changed.
    #[getter]
    fn changed(&self) -> usize {
        self.inner.changed
    }

    #[getter]
    fn bytes_hashed(&self) -> u64 {
        self.inner.bytes_hashed
    }

    #[getter]
    fn bytes_changed(&self) -> u64 {
        self.inner.bytes_changed
    }

    /// Decoder layers the selected ops write, ascending.
    #[getter]
    fn layers(&self) -> Vec<u64> {
        self.inner.layers.iter().copied().collect()
    }
}

//! `plan()` and the `Plan` class: build a copy plan from rules given as plain data, then
//! execute slices of it into destination buffers (GIL released).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use kimi_loader_core::exec::{
    commit_staged, execute_atomic, execute_plan, op_table, stage_ops, staged_bytes,
    staging_targets, DestBuf, ReadOptions,
};
use kimi_loader_core::mapping::{ExpertRule, IgnoreRule, Rules, StackedRule, TpSplit, UnfuseRule};
use kimi_loader_core::plan::{build_plan, DestSpec, OpKind, Plan as CorePlan, PlanOptions};
use kimi_loader_core::quant::QuantParams;
use kimi_loader_core::update::check_units;
use kimi_loader_core::{threads, Checkpoint as CoreCheckpoint, Dtype};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::buffer::{check_disjoint, check_writable, live_tensor, LiveBuffer};
use crate::checkpoint::Checkpoint;
use crate::errors::{detached, invalid as bad, to_pyerr};

/// Bytes written between two checks for Ctrl-C in `Plan.execute`.
const CHECK_BYTES: u64 = 256 << 20;

/// `{destination index: tensor}` as pairs (a non-int key is a typed error).
fn indexed<'py>(
    py: Python<'py>,
    map: &Bound<'py, PyDict>,
) -> PyResult<Vec<(usize, Bound<'py, PyAny>)>> {
    map.iter()
        .map(|(k, v)| {
            let i = k
                .extract::<usize>()
                .map_err(|_| bad(py, "destination indices are ints".into()))?;
            Ok((i, v))
        })
        .collect()
}

fn split(py: Python<'_>, s: &str) -> PyResult<TpSplit> {
    match s {
        "replicated" => Ok(TpSplit::Replicated),
        "column" => Ok(TpSplit::Column),
        "row" => Ok(TpSplit::Row),
        other => Err(bad(
            py,
            format!("unknown TP split '{other}' (replicated, column, row)"),
        )),
    }
}

fn get<'py, T: FromPyObjectOwned<'py>>(
    d: &Bound<'py, PyDict>,
    key: &str,
    default: T,
) -> PyResult<T> {
    match d.get_item(key)? {
        Some(v) if !v.is_none() => v.extract().map_err(Into::into),
        _ => Ok(default),
    }
}

type ExpertTuple = (String, String, u32, u32, String);
type IgnoreTuple = (Option<String>, Option<String>, String);

/// Every key a rules dict may have; any other key is a mistake and is rejected.
const RULE_KEYS: [&str; 19] = [
    "renames",
    "rewrites",
    "ignore",
    "num_hidden_layers",
    "num_nextn_predict_layers",
    "scale_remaps",
    "fused_shared_slot",
    "stacked",
    "experts",
    "tp_rules",
    "tp_rank",
    "tp_size",
    "ep_rank",
    "ep_size",
    "moe_tp_rank",
    "moe_tp_size",
    "num_experts",
    "shard_rows",
    "unfused",
];

/// Reads the rules dict built by `kimi_loader.loader.build_rules` (see its docstring).
fn rules_from(py: Python<'_>, d: &Bound<'_, PyDict>) -> PyResult<Rules> {
    for key in d.keys() {
        let key: String = key.extract()?;
        if !RULE_KEYS.contains(&key.as_str()) {
            return Err(bad(
                py,
                format!("unknown rule key '{key}' (known: {})", RULE_KEYS.join(", ")),
            ));
        }
    }
    let experts: Vec<ExpertTuple> = get(d, "experts", vec![])?;
    let mut expert_map = HashMap::with_capacity(experts.len());
    for (param_prefix, frag, expert, order, s) in experts {
        expert_map.insert(
            frag,
            ExpertRule {
                param_prefix,
                expert,
                order,
                split: split(py, &s)?,
            },
        );
    }
    let tp_rules: Vec<(String, String)> = get(d, "tp_rules", vec![])?;
    let ignore: Vec<IgnoreTuple> = get(d, "ignore", vec![])?;
    let stacked: Vec<(String, String, u32)> = get(d, "stacked", vec![])?;
    let unfused: Vec<(String, Vec<(String, u32)>)> = get(d, "unfused", vec![])?;
    Ok(Rules {
        renames: get(d, "renames", HashMap::new())?,
        rewrites: get(d, "rewrites", vec![])?,
        ignore: ignore
            .into_iter()
            .map(|(prefix, contains, reason)| IgnoreRule {
                prefix,
                contains,
                reason,
            })
            .collect(),
        num_hidden_layers: get(d, "num_hidden_layers", None)?,
        num_nextn_predict_layers: get(d, "num_nextn_predict_layers", 0)?,
        shard_rows: get(d, "shard_rows", HashMap::new())?,
        scale_remaps: get(d, "scale_remaps", vec![])?,
        fused_shared_slot: get(d, "fused_shared_slot", None)?,
        stacked: stacked
            .into_iter()
            .map(|(param, ckpt, order)| StackedRule { param, ckpt, order })
            .collect(),
        experts: expert_map,
        tp_rules: tp_rules
            .into_iter()
            .map(|(f, s)| Ok((f, split(py, &s)?)))
            .collect::<PyResult<_>>()?,
        tp_rank: get(d, "tp_rank", 0)?,
        tp_size: get(d, "tp_size", 1)?,
        ep_rank: get(d, "ep_rank", 0)?,
        ep_size: get(d, "ep_size", 1)?,
        moe_tp_rank: get(d, "moe_tp_rank", 0)?,
        moe_tp_size: get(d, "moe_tp_size", 0)?,
        num_experts: get(d, "num_experts", None)?,
        unfused: unfused
            .into_iter()
            .map(|(fragment, parts)| UnfuseRule { fragment, parts })
            .collect(),
    })
}

#[pyclass(frozen, module = "kimi_loader._core")]
pub struct Plan {
    ckpt: Arc<CoreCheckpoint>,
    inner: Arc<CorePlan>,
    threads: Option<usize>,
}

/// Builds a copy plan for `ckpt` into destinations `[(name, shape, dtype)]` (GIL released).
// keyword arguments of one Python function: each has a default there
#[allow(clippy::too_many_arguments)]
#[pyfunction]
#[pyo3(signature = (ckpt, rules, dests, fp8_block=(128, 128), threads=None, int4_group=None, mxfp4_group=None))]
pub fn plan(
    py: Python<'_>,
    ckpt: &Checkpoint,
    rules: &Bound<'_, PyDict>,
    dests: Vec<(String, Vec<u64>, String)>,
    fp8_block: (u64, u64),
    threads: Option<usize>,
    int4_group: Option<u64>,
    mxfp4_group: Option<u64>,
) -> PyResult<Plan> {
    let rules = rules_from(py, rules)?;
    let mut specs = Vec::with_capacity(dests.len());
    for (name, shape, dtype) in dests {
        let Some(dtype) = Dtype::parse(&dtype) else {
            return Err(bad(py, format!("unknown dtype '{dtype}' for '{name}'")));
        };
        specs.push(DestSpec { name, shape, dtype });
    }
    let core = ckpt.core();
    let c = core.clone();
    let inner = detached(py, move || {
        let pool = threads::pool(threads)?;
        let quant = QuantParams {
            fp8_block,
            int4_group,
            mxfp4_group,
        };
        build_plan(&c, &rules, specs, PlanOptions { quant }, &pool)
    })?;
    Ok(Plan {
        ckpt: core,
        inner: Arc::new(inner),
        threads,
    })
}

#[pymethods]
impl Plan {
    fn __len__(&self) -> usize {
        self.inner.ops.len()
    }

    #[getter]
    fn used(&self) -> usize {
        self.inner.used
    }

    #[getter]
    fn other_rank(&self) -> usize {
        self.inner.other_rank
    }

    #[getter]
    fn bytes_read(&self) -> u64 {
        self.inner.bytes_read
    }

    #[getter]
    fn bytes_written(&self) -> u64 {
        self.inner.bytes_written
    }

    /// `[(tensor, reason)]` skipped by declared rules.
    fn ignored(&self) -> Vec<(String, String)> {
        self.inner.ignored.clone()
    }

    /// `[(tensor, why)]` with no destination.
    fn unused(&self) -> Vec<(String, String)> {
        self.inner.unused.clone()
    }

    /// `[(destination, start_byte, end_byte, expected checkpoint tensor or None)]`.
    fn missing(&self) -> Vec<(String, u64, u64, Option<String>)> {
        self.inner
            .missing
            .iter()
            .map(|m| (m.dest.clone(), m.start, m.end, m.expected.clone()))
            .collect()
    }

    /// Destination names in plan order (the order `execute` expects buffers in).
    fn dest_names(&self) -> Vec<String> {
        self.inner.dests.iter().map(|d| d.name.clone()).collect()
    }

    /// Op counts by kind: copy, convert, dequant_int4, dequant_mxfp4, dequant_fp8.
    fn op_counts(&self) -> HashMap<&'static str, usize> {
        let mut m = HashMap::new();
        for op in &self.inner.ops {
            let k = match op.kind {
                OpKind::Copy => "copy",
                OpKind::Convert { .. } => "convert",
                OpKind::Dequant(q) => q.format.op_name(),
            };
            *m.entry(k).or_insert(0) += 1;
        }
        m
    }

    /// `[(tensor, destination, byte offset, bytes written)]` of every op (for inspection).
    fn ops(&self) -> Vec<(String, String, u64, u64)> {
        self.inner
            .ops
            .iter()
            .map(|op| {
                let d = &self.inner.dests[op.dest as usize];
                (
                    self.ckpt.entry(op.src).name.to_string(),
                    d.name.clone(),
                    op.dest_offset,
                    op.out_elems() * d.dtype.size(),
                )
            })
            .collect()
    }

    /// Executes ops `[start, end)` into `tensors`: a list with one tensor per destination
    /// (in `dest_names()` order), or a dict `{destination index: tensor}` holding at least
    /// the destinations those ops write. GIL released. Every tensor is checked at this
    /// call against the plan (contiguous, CPU, exactly the destination's bytes and element
    /// width, no two sharing memory) and its storage is held until the copy returns.
    #[pyo3(signature = (tensors, start=0, end=None))]
    fn execute(
        &self,
        py: Python<'_>,
        tensors: &Bound<'_, PyAny>,
        start: usize,
        end: Option<usize>,
    ) -> PyResult<()> {
        let end = end.unwrap_or(self.inner.ops.len());
        if start > end || end > self.inner.ops.len() {
            return Err(bad(
                py,
                format!(
                    "op range [{start}, {end}) outside the plan's {} ops",
                    self.inner.ops.len()
                ),
            ));
        }
        let given: Vec<(usize, Bound<'_, PyAny>)> = if let Ok(map) = tensors.cast::<PyDict>() {
            indexed(py, map)?
        } else {
            let list: Vec<Bound<'_, PyAny>> = tensors
                .try_iter()
                .and_then(|it| it.collect())
                .map_err(|_| {
                    bad(
                        py,
                        "tensors must be a list or a dict {destination index: tensor}".into(),
                    )
                })?;
            if list.len() != self.inner.dests.len() {
                return Err(bad(
                    py,
                    format!(
                        "{} tensors for {} destinations",
                        list.len(),
                        self.inner.dests.len()
                    ),
                ));
            }
            list.into_iter().enumerate().collect()
        };
        let (bufs, _live) = self.live_buffers(py, given, None)?;
        let bufs = Arc::new(bufs);
        // Batches of about CHECK_BYTES written bytes: between two, the GIL is taken back
        // and pending signals run, so Ctrl-C interrupts a long load (KeyboardInterrupt;
        // the destinations are then partly written, as after any failed load).
        let mut at = start;
        while at < end {
            let mut stop = at;
            let mut bytes = 0u64;
            while stop < end && (stop == at || bytes < CHECK_BYTES) {
                let op = &self.inner.ops[stop];
                bytes += op.out_elems() * self.inner.dests[op.dest as usize].dtype.size();
                stop += 1;
            }
            let (ckpt, plan, threads, bufs) = (
                self.ckpt.clone(),
                self.inner.clone(),
                self.threads,
                bufs.clone(),
            );
            detached(py, move || {
                let pool = threads::pool(threads)?;
                // SAFETY: every buffer was checked above against its live tensor (CPU,
                // contiguous, exactly the destination's size, pairwise disjoint), and
                // `_live` holds each tensor's storage until this call returns.
                unsafe {
                    execute_plan(&ckpt, &plan, at..stop, &bufs, &pool, ReadOptions::default())
                }
            })?;
            py.check_signals()?;
            at = stop;
        }
        Ok(())
    }

    /// The destination index of every op, in op order (ops of one destination are
    /// contiguous, so a run of destinations is a run of ops).
    fn op_dests(&self) -> Vec<u32> {
        self.inner.ops.iter().map(|op| op.dest).collect()
    }

    /// This plan replayed against `ckpt`, a later version of the checkpoint it was built
    /// for: returns `(plan, names no op reads)`. Ops whose sources `ckpt` lacks are dropped.
    fn rebind(&self, py: Python<'_>, ckpt: &Checkpoint) -> PyResult<(Plan, Vec<String>)> {
        let (old, new, plan) = (self.ckpt.clone(), ckpt.core(), self.inner.clone());
        let n2 = new.clone();
        let (rebound, unread) = detached(py, move || plan.rebind(&old, &n2))?;
        Ok((
            Plan {
                ckpt: new,
                inner: Arc::new(rebound),
                threads: self.threads,
            },
            unread,
        ))
    }

    /// `(source tensor, scale tensor or None)` of every op.
    fn op_sources(&self) -> Vec<(String, Option<String>)> {
        self.inner
            .ops
            .iter()
            .map(|op| {
                let scale = op.kind.scale().map(|s| self.ckpt.entry(s).name.to_string());
                (self.ckpt.entry(op.src).name.to_string(), scale)
            })
            .collect()
    }

    /// Executes the ops `which` (distinct indices) all-or-nothing (staged, then
    /// committed) into `tensors` (a dict `{destination index: tensor}`), GIL released;
    /// checked as `execute`. `arena` is an optional uint8 CPU tensor used as the staging
    /// buffer when large enough, disjoint from every destination.
    #[pyo3(signature = (which, tensors, arena=None))]
    fn execute_atomic(
        &self,
        py: Python<'_>,
        which: Vec<usize>,
        tensors: &Bound<'_, PyDict>,
        arena: Option<Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        self.check_which(py, &which)?;
        let given = indexed(py, tensors)?;
        let (bufs, live) = self.live_buffers(py, given, arena.as_ref())?;
        let arena = arena.as_ref().map(|_| {
            let a = live.last().expect("the arena is the last live buffer");
            DestBuf {
                ptr: a.ptr as *mut u8,
                len: a.len,
            }
        });
        let (ckpt, plan, threads) = (self.ckpt.clone(), self.inner.clone(), self.threads);
        detached(py, move || {
            let pool = threads::pool(threads)?;
            let _live = live;
            // SAFETY: as `execute`: live, checked, pairwise disjoint buffers (the arena
            // included), their storages held by `_live` until this returns.
            unsafe { execute_atomic(&ckpt, &plan, &which, &bufs, arena, &pool) }
        })
    }

    /// Refuses an update `ckpt` (only its tensors named in `only`, if given) that sends
    /// part of a quantized weight this plan's checkpoint stores (`MissingTensorError`
    /// naming the absent part).
    #[pyo3(signature = (ckpt, only=None))]
    fn check_units(
        &self,
        py: Python<'_>,
        ckpt: &Checkpoint,
        only: Option<Vec<String>>,
    ) -> PyResult<()> {
        let new = ckpt.core();
        let present: HashSet<&str> = match &only {
            Some(o) => o.iter().map(String::as_str).collect(),
            None => new.iter().map(|(_, e)| &*e.name).collect(),
        };
        check_units(&present, &self.ckpt, &new.display_path()).map_err(|e| to_pyerr(py, e))
    }

    /// The ops `which` as a device executor's descriptor table: little-endian int64 rows of
    /// `OP_TABLE_COLS` columns (see `kimi_loader_core::exec::op_table`).
    fn op_table<'py>(&self, py: Python<'py>, which: Vec<usize>) -> PyResult<Bound<'py, PyBytes>> {
        self.check_which(py, &which)?;
        let rows = op_table(&self.ckpt, &self.inner, &which).map_err(|e| to_pyerr(py, e))?;
        let bytes: Vec<u8> = rows.iter().flat_map(|v| v.to_le_bytes()).collect();
        Ok(PyBytes::new(py, &bytes))
    }

    /// Where the outputs of the ops `which` go: little-endian int64 triples `(destination
    /// index, byte offset, bytes)`, one per op in `which` order (any checkpoint kind; for
    /// copying a host-staged arena into destinations the Rust executor cannot write).
    fn op_layout<'py>(&self, py: Python<'py>, which: Vec<usize>) -> PyResult<Bound<'py, PyBytes>> {
        self.check_which(py, &which)?;
        let mut bytes = Vec::with_capacity(which.len() * 24);
        for &k in &which {
            let op = &self.inner.ops[k];
            let size = op.out_elems() * self.inner.dests[op.dest as usize].dtype.size();
            for v in [u64::from(op.dest), op.dest_offset, size] {
                bytes.extend_from_slice(&(v as i64).to_le_bytes());
            }
        }
        Ok(PyBytes::new(py, &bytes))
    }

    /// Bytes that staging the ops `which` takes (the sum of their outputs).
    fn staged_bytes(&self, py: Python<'_>, which: Vec<usize>) -> PyResult<u64> {
        self.check_which(py, &which)?;
        staged_bytes(&self.inner, &which).map_err(|e| to_pyerr(py, e))
    }

    /// The first half of `execute_atomic`, for updates that arrive in parts: executes the
    /// ops `which` into `arena` (a uint8 CPU tensor of at least `staged_bytes(which)`),
    /// each op's output contiguous in `which` order; no destination is touched. GIL
    /// released.
    fn stage(&self, py: Python<'_>, which: Vec<usize>, arena: Bound<'_, PyAny>) -> PyResult<()> {
        self.check_which(py, &which)?;
        let nbytes: u64 = arena
            .getattr("nbytes")
            .and_then(|v| v.extract())
            .unwrap_or(0);
        let a = live_tensor(&arena, nbytes, None, "staging arena")?;
        check_writable(py, &[("staging arena", a.ptr, a.len)])?;
        let buf = DestBuf {
            ptr: a.ptr as *mut u8,
            len: a.len,
        };
        let (ckpt, plan, threads) = (self.ckpt.clone(), self.inner.clone(), self.threads);
        detached(py, move || {
            let pool = threads::pool(threads)?;
            let _live = a;
            // SAFETY: the arena is a live, writable CPU tensor held by `_live`; a fresh
            // staging tensor is not memory the checkpoint reads from.
            unsafe { stage_ops(&ckpt, &plan, &which, buf, &pool) }
        })
    }

    /// The second half: copies what `stage(which, arena)` left in `arena` into
    /// `tensors` (`{destination index: tensor}`, checked as in `execute`). GIL released.
    fn commit(
        &self,
        py: Python<'_>,
        which: Vec<usize>,
        tensors: &Bound<'_, PyDict>,
        arena: Bound<'_, PyAny>,
    ) -> PyResult<()> {
        self.check_which(py, &which)?;
        let need = staged_bytes(&self.inner, &which).map_err(|e| to_pyerr(py, e))?;
        let given = indexed(py, tensors)?;
        let (bufs, live) = self.live_buffers(py, given, Some(&arena))?;
        let a = live.last().expect("the arena is the last live buffer");
        if a.len < need {
            return Err(bad(
                py,
                format!("staging arena of {} bytes, {need} staged", a.len),
            ));
        }
        let arena = DestBuf {
            ptr: a.ptr as *mut u8,
            len: a.len,
        };
        let targets = staging_targets(&self.inner, &which, &bufs).map_err(|e| to_pyerr(py, e))?;
        let threads = self.threads;
        detached(py, move || {
            let pool = threads::pool(threads)?;
            let _live = live;
            // SAFETY: the targets lie in live, checked, pairwise disjoint destinations
            // (the arena apart from them), storages held by `_live`; the arena holds what
            // `stage` wrote for the same ops in the same order (the caller's protocol: a
            // stale arena writes stale bytes, never out of bounds).
            unsafe { commit_staged(&targets, arena, &pool) };
            Ok(())
        })
    }
}

impl Plan {
    /// The core plan (for change selection).
    pub fn core(&self) -> Arc<CorePlan> {
        self.inner.clone()
    }

    fn check_which(&self, py: Python<'_>, which: &[usize]) -> PyResult<()> {
        let mut seen = vec![false; self.inner.ops.len()];
        for &k in which {
            match seen.get_mut(k) {
                None => {
                    return Err(bad(
                        py,
                        format!("op index {k} out of range ({})", seen.len()),
                    ))
                }
                Some(s) if *s => return Err(bad(py, format!("op index {k} given twice"))),
                Some(s) => *s = true,
            }
        }
        Ok(())
    }

    /// Checked buffers for `given` `(destination index, tensor)` pairs (and the staging
    /// `arena`, returned last in the live list).
    fn live_buffers(
        &self,
        py: Python<'_>,
        given: Vec<(usize, Bound<'_, PyAny>)>,
        arena: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<(Vec<Option<DestBuf>>, Vec<LiveBuffer>)> {
        let n = self.inner.dests.len();
        let mut bufs: Vec<Option<DestBuf>> = vec![None; n];
        let mut live = Vec::with_capacity(given.len() + 1);
        let mut spans = Vec::with_capacity(given.len() + 1);
        for (i, t) in given {
            let Some(d) = self.inner.dests.get(i) else {
                return Err(bad(py, format!("destination index {i} out of range ({n})")));
            };
            if t.is_none() {
                continue;
            }
            let b = live_tensor(
                &t,
                d.nbytes(),
                Some(d.dtype),
                &format!("destination '{}'", d.name),
            )?;
            bufs[i] = Some(DestBuf {
                ptr: b.ptr as *mut u8,
                len: b.len,
            });
            spans.push((d.name.as_str(), b.ptr, b.len));
            live.push(b);
        }
        if let Some(a) = arena {
            let nbytes: u64 = a.getattr("nbytes").and_then(|v| v.extract()).unwrap_or(0);
            let b = live_tensor(a, nbytes, None, "staging arena")?;
            spans.push(("staging arena", b.ptr, b.len));
            live.push(b);
        }
        check_disjoint(py, &spans)?;
        check_writable(py, &spans)?;
        Ok((bufs, live))
    }
}

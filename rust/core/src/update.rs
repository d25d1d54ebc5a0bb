//! Change selection for hot-reload: which ops of a (rebound) plan read tensors whose
//! bytes differ from what the model holds, found by hashing the sources in parallel and
//! comparing with the hashes kept from the last update. Cost: hashing the sources that
//! were sent, plus linear passes over the plan's ops in Rust; nothing per tensor crosses
//! into Python.

use std::collections::{BTreeSet, HashMap, HashSet};

use rayon::ThreadPool;

use crate::checkpoint::TensorId;
use crate::exec::hash_tensors;
use crate::plan::Plan;
use crate::quant::QuantFormat;
use crate::{Checkpoint, Error, Result};

/// Refuses an update that sends part of a quantized weight: for every name in `present`
/// whose suffix belongs to a format's tensors ([`QuantFormat::suffixes`]) that `known`
/// stores (at least two of them), every part `known` has must be present. The error
/// names the absent part. One pass over the names, then a few lookups per module.
pub fn check_units(
    present: &HashSet<&str>,
    known: &Checkpoint,
    file: &std::path::Path,
) -> Result<()> {
    // every suffix of every format, one bit each
    let mut suffixes: Vec<&str> = Vec::new();
    for s in QuantFormat::ALL.iter().flat_map(|f| f.suffixes()) {
        if !suffixes.contains(s) {
            suffixes.push(s);
        }
    }
    debug_assert!(suffixes.len() <= 8);
    let bit = |suffix: &str| suffixes.iter().position(|s| *s == suffix).map(|i| 1u8 << i);
    let mut by_base: HashMap<&str, u8> = HashMap::new();
    for &name in present {
        if let Some((base, suffix)) = name.rsplit_once('.') {
            if let Some(b) = bit(suffix) {
                *by_base.entry(base).or_default() |= b;
            }
        }
    }
    let mut buf = String::new();
    for (base, sent) in by_base {
        let mut stored = 0u8;
        for (i, s) in suffixes.iter().enumerate() {
            buf.clear();
            buf.push_str(base);
            buf.push('.');
            buf.push_str(s);
            if known.find(&buf).is_some() {
                stored |= 1 << i;
            }
        }
        for format in QuantFormat::ALL {
            let u = format
                .suffixes()
                .iter()
                .filter_map(|s| bit(s))
                .fold(0u8, |a, b| a | b);
            let parts = stored & u;
            if sent & u == 0 || parts.count_ones() < 2 {
                continue; // not sent, or not this format in this checkpoint
            }
            let absent = parts & !sent;
            if absent != 0 {
                let missing = suffixes[absent.trailing_zeros() as usize];
                let given = suffixes[(parts & sent).trailing_zeros() as usize];
                return Err(Error::MissingTensor {
                    file: file.to_path_buf(),
                    tensor: format!("{base}.{missing}"),
                    hint: Some(format!(
                        "'{base}.{given}' is updated but this part of the same quantized weight \
                         is not: the parts of a quantized weight are updated together"
                    )),
                });
            }
        }
    }
    Ok(())
}

/// What an update changes.
#[derive(Debug, Default)]
pub struct Selection {
    /// op indices (of the plan selected on) whose sources changed, ascending
    pub which: Vec<usize>,
    /// every source hashed: `(name, xxh3-64)`
    pub hashed: Vec<(String, u64)>,
    /// how many of them changed
    pub changed: usize,
    pub bytes_hashed: u64,
    /// bytes the selected ops write
    pub bytes_changed: u64,
    /// decoder layers of the selected ops' destinations (for post-load processing)
    pub layers: BTreeSet<u64>,
}

/// The `i` of the first `layers.{i}.` in a name.
pub fn layer_of(name: &str) -> Option<u64> {
    let mut parts = name.split('.');
    while let Some(p) = parts.next() {
        if p == "layers" {
            let next = parts.clone().next()?;
            if !next.is_empty() && next.bytes().all(|b| b.is_ascii_digit()) {
                if let Ok(i) = next.parse() {
                    return Some(i);
                }
            }
        }
    }
    None
}

/// Hashes the sources of `plan`'s ops (those named in `only`, if given) in `ckpt` and
/// selects the ops that read a source whose hash differs from `held`.
pub fn select_changed(
    ckpt: &Checkpoint,
    plan: &Plan,
    only: Option<&HashSet<String>>,
    held: &HashMap<String, u64>,
    pool: &ThreadPool,
) -> Result<Selection> {
    let keep = |id: TensorId| only.is_none_or(|o| o.contains(&*ckpt.entry(id).name));
    let mut kept_ops = Vec::with_capacity(plan.ops.len());
    let mut ids: Vec<TensorId> = Vec::new();
    let mut seen: HashSet<TensorId> = HashSet::new();
    for (k, op) in plan.ops.iter().enumerate() {
        let srcs = [Some(op.src), op.kind.scale()];
        if !srcs.iter().flatten().any(|&id| keep(id)) {
            continue;
        }
        kept_ops.push(k);
        for id in srcs.into_iter().flatten() {
            if seen.insert(id) {
                ids.push(id);
            }
        }
    }
    ids.sort_unstable_by_key(|id| (id.shard, id.index));
    let hashes = hash_tensors(ckpt, &ids, pool)?;
    let mut changed_ids: HashSet<TensorId> = HashSet::new();
    let mut sel = Selection::default();
    for (&id, &h) in ids.iter().zip(&hashes) {
        let e = ckpt.entry(id);
        sel.bytes_hashed += e.nbytes();
        if held.get(&*e.name) != Some(&h) {
            changed_ids.insert(id);
        }
        sel.hashed.push((e.name.to_string(), h));
    }
    sel.changed = changed_ids.len();
    for k in kept_ops {
        let op = &plan.ops[k];
        if changed_ids.contains(&op.src)
            || op.kind.scale().is_some_and(|s| changed_ids.contains(&s))
        {
            let d = &plan.dests[op.dest as usize];
            sel.bytes_changed += op.out_elems() * d.dtype.size();
            if let Some(l) = layer_of(&d.name) {
                sel.layers.insert(l);
            }
            sel.which.push(k);
        }
    }
    Ok(sel)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_of_reads_the_first_layers_index() {
        assert_eq!(layer_of("model.layers.12.mlp.w13"), Some(12));
        assert_eq!(layer_of("language_model.model.layers.0.x"), Some(0));
        assert_eq!(layer_of("model.layers.x.mlp"), None);
        assert_eq!(layer_of("model.norm.weight"), None);
        assert_eq!(layer_of("layers"), None);
    }
}

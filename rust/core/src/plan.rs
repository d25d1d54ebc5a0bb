//! The copy plan: every checkpoint tensor resolved to a destination region, proven to
//! write every destination byte exactly once, computed before anything is copied.
//!
//! Each [`Op`] reads a 2-D slice of one checkpoint tensor (rows `[r0, r1)`, columns
//! `[c0, c1)` of its row-major `[dim0, rest]` view; for dequantizing ops, of the logical
//! weight) and writes it, converted if needed, to one *contiguous* byte range of one
//! destination. That holds for every layout here: a stacked or expert shard fills whole
//! rows of its block, and a TP slice is the rank's whole local block. So completeness is
//! a tiling check of byte intervals per destination.

/// Hash maps keyed by names and small tuples, hashed with foldhash.
type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// A shape on the stack (checked once per op).
type Dims = smallvec::SmallVec<[u64; 4]>;

use std::borrow::Cow;

use crate::checkpoint::{Checkpoint, TensorId};
use crate::convert::is_float;
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::mapping::{Resolved, Rules, TpSplit};
pub use crate::quant::Dequant;
use crate::quant::{check_weight_shape, QuantFormat, QuantParams, Role, QUANT_SUFFIXES};

/// A destination tensor of the model (a parameter or a persistent buffer).
#[derive(Debug, Clone)]
pub struct DestSpec {
    pub name: String,
    pub shape: Vec<u64>,
    pub dtype: Dtype,
}

impl DestSpec {
    pub fn nbytes(&self) -> u64 {
        self.shape.iter().product::<u64>() * self.dtype.size()
    }
}

/// What an op does to the bytes it reads.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OpKind {
    /// Same dtype: plain bytes.
    Copy,
    /// Float to float conversion.
    Convert { from: Dtype, to: Dtype },
    /// A quantized weight and its scale -> dense, as its format says (the formats and
    /// their row dequantizers live in `quant.rs`).
    Dequant(Dequant),
}

impl OpKind {
    /// The scale tensor a dequantizing op reads besides its source.
    pub fn scale(&self) -> Option<TensorId> {
        match *self {
            OpKind::Dequant(q) => Some(q.scale),
            OpKind::Copy | OpKind::Convert { .. } => None,
        }
    }

    /// Points a dequantizing op at another scale tensor (no-op for the others).
    pub fn set_scale(&mut self, to: TensorId) {
        match self {
            OpKind::Dequant(q) => q.scale = to,
            OpKind::Copy | OpKind::Convert { .. } => {}
        }
    }
}

#[derive(Debug, Clone)]
pub struct Op {
    pub kind: OpKind,
    pub src: TensorId,
    /// Columns of the (logical) source row.
    pub src_cols: u64,
    pub rows: (u64, u64),
    pub cols: (u64, u64),
    pub dest: u32,
    /// Byte offset of the first written byte in the destination.
    pub dest_offset: u64,
}

impl Op {
    pub fn out_elems(&self) -> u64 {
        (self.rows.1 - self.rows.0) * (self.cols.1 - self.cols.0)
    }
}

/// A destination byte range that no op writes, with the checkpoint tensor expected there.
#[derive(Debug, Clone)]
pub struct Missing {
    pub dest: String,
    pub start: u64,
    pub end: u64,
    pub expected: Option<String>,
}

#[derive(Debug, Default)]
pub struct Plan {
    pub ops: Vec<Op>,
    pub dests: Vec<DestSpec>,
    /// Checkpoint tensors consumed by some op (including scales of dequantizing ops and
    /// ct-int4 `weight_shape` companions).
    pub used: usize,
    /// `(tensor, reason)` skipped by a declared rule.
    pub ignored: Vec<(String, String)>,
    /// Tensors that belong to experts held by other expert-parallel ranks.
    pub other_rank: usize,
    /// `(tensor, what it resolved to)` with no destination: an error when strict.
    pub unused: Vec<(String, String)>,
    /// Destination ranges no op writes: an error when strict.
    pub missing: Vec<Missing>,
    pub bytes_read: u64,
    pub bytes_written: u64,
}

/// One checkpoint tensor headed for a destination, before offsets are known.
struct Piece {
    src: TensorId,
    kind: PieceKind,
    /// Logical `[rows, cols]` of the source.
    rows: u64,
    cols: u64,
    /// Trailing dims of the source beyond dim 0 (for shape checks).
    rest: Vec<u64>,
    dest: u32,
    expert: Option<u32>,
    order: u32,
    /// Shards of the stacked destination (1 when not stacked).
    shards: u32,
    split: TpSplit,
    /// An unfused part: its first source row and the heads whose pair-interleaved rows
    /// it reorders (0: none); `counted` is false for every part but the first, so a
    /// tensor counts as used once.
    row0: u64,
    rope_heads: u32,
    counted: bool,
}

#[derive(Clone, Copy)]
enum PieceKind {
    Plain,
    Dequant(OpKind),
}

#[derive(Default)]
struct Group {
    data: Option<TensorId>,
    scale: Option<TensorId>,
    shape: Option<TensorId>,
    expert: Option<u32>,
    order: u32,
    shards: u32,
    split: Option<TpSplit>,
}

fn quantized_data_dtype(d: Dtype) -> bool {
    QuantFormat::of_data(d).is_some()
}

/// Options that are not naming rules.
#[derive(Debug, Clone, Copy, Default)]
pub struct PlanOptions {
    /// The quantized formats' parameters from the config (FP8 block, group sizes).
    pub quant: QuantParams,
}

fn unsupported(ckpt: &Checkpoint, id: TensorId, reason: String) -> Error {
    Error::Unsupported {
        file: ckpt.shard(id).path.clone(),
        reason: format!("tensor '{}': {reason}", ckpt.entry(id).name),
    }
}

/// `[rows, cols]` view of a stored shape.
fn as_2d(shape: &[u64]) -> (u64, u64) {
    match shape {
        [] => (1, 1),
        [n] => (*n, 1),
        [r, rest @ ..] => (*r, rest.iter().product()),
    }
}

/// Builds the plan, in stages that each read the shared [`Ctx`]:
///
/// 1. [`resolve_stage`]: every checkpoint name to a destination (or a declared skip, another
///    rank, or no place), quantized tensors gathered into dequantization groups;
/// 2. [`group_stage`]: each group checked against its format (scale dtype and grid,
///    `weight_shape` values) and turned into one piece;
/// 3. [`slice_stage`]: pieces placed at their shard / expert offset, sliced for this TP
///    rank, shape-checked exactly, emitted as ops;
/// 4. [`check_coverage`]: the ops tile every destination exactly once (overlaps are a
///    [`Error::Plan`], gaps are reported as missing).
///
/// Replaying a plan against a later checkpoint is [`Plan::rebind`]. Hard errors (shape
/// mismatches, impossible TP splits, incomplete dequantization groups, overlaps) fail
/// here; missing and unused tensors are reported in the plan for the caller to judge.
pub fn build_plan(
    ckpt: &Checkpoint,
    rules: &Rules,
    dests: Vec<DestSpec>,
    opts: PlanOptions,
    pool: &rayon::ThreadPool,
) -> Result<Plan> {
    check_options(rules, &opts)?;
    let mut plan = Plan::default();
    let rewrite_used = {
        let ctx = Ctx::new(ckpt, rules, &dests, &opts);
        let mut staged = resolve_stage(&ctx, &mut plan, pool)?;
        group_stage(&ctx, &mut staged, &mut plan)?;
        slice_stage(&ctx, &mut staged.pieces, &mut plan)?;
        staged.rewrite_used
    };
    plan.dests = dests;
    let rewrites_used: Vec<(String, String)> = rules
        .rewrites
        .iter()
        .zip(&rewrite_used)
        .filter(|(_, used)| **used)
        .map(|(rw, _)| rw.clone())
        .collect();
    check_coverage(ckpt, rules, &mut plan, &rewrites_used)?;
    Ok(plan)
}

fn check_options(rules: &Rules, opts: &PlanOptions) -> Result<()> {
    rules.check_parallel()?;
    let q = &opts.quant;
    if q.fp8_block.0 == 0 || q.fp8_block.1 == 0 {
        return Err(Error::InvalidArgument {
            reason: format!("fp8 block size {:?} must be positive", q.fp8_block),
        });
    }
    if q.int4_group == Some(0) || q.mxfp4_group == Some(0) {
        return Err(Error::InvalidArgument {
            reason: "quantization group sizes must be positive".into(),
        });
    }
    Ok(())
}

/// What every stage reads: the checkpoint, the rules, the options and the destinations,
/// indexed once.
struct Ctx<'a> {
    ckpt: &'a Checkpoint,
    rules: &'a Rules,
    opts: &'a PlanOptions,
    dests: &'a [DestSpec],
    /// destination name -> index
    index: FastMap<&'a str, u32>,
    /// each destination's TP split, looked up once
    dest_split: Vec<TpSplit>,
    /// each destination's declared shard rows, looked up once
    dest_shard_rows: Vec<Option<&'a [u64]>>,
    /// stacked-rule key -> number of shards it stacks
    shard_counts: FastMap<&'a str, u32>,
    /// position of each shard's first tensor in storage order
    first_of_shard: Vec<usize>,
}

impl<'a> Ctx<'a> {
    fn new(
        ckpt: &'a Checkpoint,
        rules: &'a Rules,
        dests: &'a [DestSpec],
        opts: &'a PlanOptions,
    ) -> Self {
        Ctx {
            ckpt,
            rules,
            opts,
            dests,
            index: dests
                .iter()
                .enumerate()
                .map(|(i, d)| (d.name.as_str(), i as u32))
                .collect(),
            dest_split: dests.iter().map(|d| rules.split_of(&d.name)).collect(),
            dest_shard_rows: dests
                .iter()
                .map(|d| rules.shard_rows.get(&d.name).map(Vec::as_slice))
                .collect(),
            shard_counts: rules.shard_counts(),
            first_of_shard: ckpt
                .shards
                .iter()
                .scan(0, |at, s| {
                    let first = *at;
                    *at += s.header.tensors.len();
                    Some(first)
                })
                .collect(),
        }
    }

    /// Position of a tensor in storage order (shard-major).
    fn position(&self, id: TensorId) -> usize {
        self.first_of_shard[id.shard as usize] + id.index as usize
    }
}

/// The output of [`resolve_stage`], consumed by the later stages.
struct Staged {
    pieces: Vec<Piece>,
    /// dequantization groups by `(destination, expert slot, shard order)`
    groups: FastMap<(u32, Option<u32>, u32), Group>,
    /// the `weight_shape` value checks, by storage position (taken where consumed)
    shape_checks: Vec<Option<(TensorId, Result<()>)>>,
    /// prefix rewrites this checkpoint actually uses (to name missing tensors its way)
    rewrite_used: Vec<bool>,
}

/// Stage 1: resolves every checkpoint name (in parallel), then sorts each tensor into a
/// plain piece, a dequantization group, a consumed `weight_shape`, or the plan's
/// ignored / other-rank / unused lists.
fn resolve_stage(ctx: &Ctx<'_>, plan: &mut Plan, pool: &rayon::ThreadPool) -> Result<Staged> {
    use rayon::prelude::*;
    let Ctx {
        ckpt,
        rules,
        dests,
        index,
        dest_split,
        shard_counts,
        ..
    } = ctx;
    let (ckpt, rules) = (*ckpt, *rules);
    let tensors: Vec<_> = ckpt.iter().collect();
    let resolved: Vec<Resolved> = pool.install(|| {
        tensors
            .par_iter()
            .map(|(_, e)| rules.resolve(&e.name))
            .collect()
    });
    // compressed-tensors `weight_shape` companions hold values, not only a shape: their
    // small reads (one pread each, ~70k at Kimi-K2.5 scale) run in parallel here, checked
    // against their packed sibling; each result is surfaced where the tensor is consumed.
    let shape_checks: Vec<Option<(TensorId, Result<()>)>> = pool.install(|| {
        tensors
            .par_iter()
            .map(|&(id, e)| {
                let base = e.name.strip_suffix("weight_shape")?;
                let packed = ckpt.find(&format!("{base}weight_packed"))?;
                let pe = ckpt.entry(packed);
                (pe.shape.len() == 2 && pe.dtype == Dtype::I32).then(|| {
                    (
                        packed,
                        check_weight_shape(ckpt, id, pe.shape[0], pe.shape[1] * 8),
                    )
                })
            })
            .collect()
    });
    let mut staged = Staged {
        pieces: Vec::with_capacity(ckpt.len()),
        groups: FastMap::default(),
        shape_checks,
        rewrite_used: vec![false; rules.rewrites.len()],
    };
    let Staged {
        pieces,
        groups,
        shape_checks,
        rewrite_used,
    } = &mut staged;
    let position = |id: TensorId| ctx.position(id);
    for ((id, e), resolved) in tensors.into_iter().zip(resolved) {
        let name = &*e.name;
        let (param, expert, order, split, stack_key) = match resolved {
            Resolved::Ignored(reason) => {
                plan.ignored.push((name.to_owned(), reason));
                continue;
            }
            Resolved::OtherRank => {
                plan.other_rank += 1;
                continue;
            }
            Resolved::Unplaced(reason) => {
                plan.unused.push((name.to_owned(), reason));
                continue;
            }
            Resolved::Param {
                param,
                expert,
                order,
                split,
                stack_key,
                ..
            } => (param, expert, order, split, stack_key),
        };
        let shards = stack_key
            .and_then(|k| shard_counts.get(k).copied())
            .unwrap_or(1);
        if let Some(k) = rules
            .rewrites
            .iter()
            .position(|(f, _)| name.starts_with(f.as_str()))
        {
            rewrite_used[k] = true;
        }
        let direct = index.get(param.as_str()).copied();
        let dequant_target = |logical: &str| {
            index
                .get(logical)
                .copied()
                .filter(|&d| is_float(dests[d as usize].dtype))
        };
        // A quantized tensor headed for a dense destination joins a dequantization group.
        let role = if let Some(d) =
            direct.filter(|&d| is_float(dests[d as usize].dtype) && quantized_data_dtype(e.dtype))
        {
            Some((d, Role::Data))
        } else if direct.is_none() {
            QUANT_SUFFIXES
                .iter()
                .find(|(s, _)| param.ends_with(s))
                .and_then(|(s, role)| {
                    let logical = format!("{}weight", &param[..param.len() - s.len()]);
                    dequant_target(&logical).map(|d| (d, *role))
                })
        } else {
            None
        };
        if let Some((d, role)) = role {
            let g = groups.entry((d, expert, order)).or_default();
            let slot = match role {
                Role::Data => &mut g.data,
                Role::Scale => &mut g.scale,
                Role::Shape => &mut g.shape,
            };
            if let Some(prev) = slot.replace(id) {
                return Err(Error::InvalidArgument {
                    reason: format!(
                        "tensors '{}' and '{name}' both map to {} of '{param}'",
                        ckpt.entry(prev).name,
                        match role {
                            Role::Data => "the data",
                            Role::Scale => "the scale",
                            Role::Shape => "the shape",
                        }
                    ),
                });
            }
            g.expert = expert;
            g.order = order;
            g.split = split;
            g.shards = shards;
            continue;
        }
        // A compressed-tensors `weight_shape` whose packed weight is copied as it is:
        // checked against the packed shape, then consumed (the layout needs no copy).
        if direct.is_none() && param.ends_with("weight_shape") {
            if let Some((_, checked)) = shape_checks[position(id)].take() {
                checked?;
                plan.used += 1;
                continue;
            }
        }
        if direct.is_none() {
            if let Some(rule) = rules
                .unfused
                .iter()
                .find(|r| param.contains(r.fragment.as_str()))
            {
                unfuse(ctx, plan, pieces, id, &param, rule)?;
                continue;
            }
        }
        let Some(d) = direct else {
            plan.unused
                .push((name.to_owned(), format!("no destination '{param}'")));
            continue;
        };
        let dest = &dests[d as usize];
        check_loadable(ckpt, id, dest)?;
        let (rows, cols) = as_2d(&e.shape);
        pieces.push(Piece {
            src: id,
            kind: PieceKind::Plain,
            rows,
            cols,
            rest: e.shape.iter().skip(1).copied().collect(),
            dest: d,
            expert,
            order,
            shards,
            split: split.unwrap_or(dest_split[d as usize]),
            row0: 0,
            rope_heads: 0,
            counted: true,
        });
    }

    Ok(staged)
}

/// A stored tensor goes into a destination of its own dtype, or is converted between
/// float dtypes (e8m0 scales included).
fn check_loadable(ckpt: &Checkpoint, id: TensorId, dest: &DestSpec) -> Result<()> {
    let e = ckpt.entry(id);
    if e.dtype == dest.dtype
        || (is_float(dest.dtype) && (is_float(e.dtype) || e.dtype == Dtype::F8E8M0))
    {
        return Ok(());
    }
    Err(unsupported(
        ckpt,
        id,
        format!(
            "dtype {} cannot be loaded into '{}' of dtype {}",
            e.dtype, dest.name, dest.dtype
        ),
    ))
}

/// One checkpoint tensor cut into the parameters of an [`UnfuseRule`](crate::mapping::UnfuseRule):
/// one piece per part whose parameter exists (the absent ones are reported as missing by
/// the coverage check of their destinations, or as unused when none exists).
fn unfuse(
    ctx: &Ctx<'_>,
    plan: &mut Plan,
    pieces: &mut Vec<Piece>,
    id: TensorId,
    param: &str,
    rule: &crate::mapping::UnfuseRule,
) -> Result<()> {
    let (ckpt, dests) = (ctx.ckpt, ctx.dests);
    let e = ckpt.entry(id);
    let n = rule.parts.len() as u64;
    let (rows, cols) = as_2d(&e.shape);
    if n == 0 || e.shape.is_empty() || !rows.is_multiple_of(n) {
        return Err(unsupported(
            ckpt,
            id,
            format!("dim 0 ({rows}) cannot be cut into {n} equal parts"),
        ));
    }
    let part_rows = rows / n;
    let mut first = true;
    for (k, (replacement, heads)) in rule.parts.iter().enumerate() {
        let target = param.replacen(rule.fragment.as_str(), replacement, 1);
        let Some(&d) = ctx.index.get(target.as_str()) else {
            continue;
        };
        let dest = &dests[d as usize];
        check_loadable(ckpt, id, dest)?;
        if *heads > 0 && !part_rows.is_multiple_of(2 * *heads as u64) {
            return Err(unsupported(
                ckpt,
                id,
                format!("{part_rows} rows of '{target}' are not {heads} heads of pairs"),
            ));
        }
        pieces.push(Piece {
            src: id,
            kind: PieceKind::Plain,
            rows: part_rows,
            cols,
            rest: e.shape.iter().skip(1).copied().collect(),
            dest: d,
            expert: None,
            order: 0,
            shards: 1,
            split: ctx.dest_split[d as usize],
            row0: k as u64 * part_rows,
            rope_heads: *heads,
            counted: std::mem::take(&mut first),
        });
    }
    if first {
        plan.unused.push((
            e.name.to_string(),
            format!("no destination for any part of '{param}'"),
        ));
    }
    Ok(())
}

/// Stage 2: each dequantization group, checked against its format, becomes one piece.
fn group_stage(ctx: &Ctx<'_>, staged: &mut Staged, plan: &mut Plan) -> Result<()> {
    let Ctx {
        ckpt,
        opts,
        dests,
        dest_split,
        ..
    } = ctx;
    let ckpt = *ckpt;
    let Staged {
        pieces,
        groups,
        shape_checks,
        ..
    } = staged;
    let position = |id: TensorId| ctx.position(id);
    for ((d, expert, order), g) in std::mem::take(groups) {
        let dest = &dests[d as usize];
        let Some(data) = g.data else {
            let some = g.scale.or(g.shape).expect("a group has a member");
            plan.unused.push((
                ckpt.entry(some).name.to_string(),
                format!(
                    "quantization companion without its weight (for '{}')",
                    dest.name
                ),
            ));
            continue;
        };
        let de = ckpt.entry(data);
        let Some(scale) = g.scale else {
            return Err(unsupported(
                ckpt,
                data,
                "quantized weight without its scale tensor".into(),
            ));
        };
        let Some(format) = QuantFormat::of_data(de.dtype) else {
            return Err(unsupported(
                ckpt,
                data,
                format!("dtype {} is not a quantized weight format", de.dtype),
            ));
        };
        let (kind, cols) = format.op_kind(ckpt, data, scale, &opts.quant, dest.dtype)?;
        let r = de.shape[0];
        if let Some(shape) = g.shape {
            match shape_checks[position(shape)].take() {
                Some((packed, checked)) if packed == data => checked?,
                _ => check_weight_shape(ckpt, shape, r, cols)?,
            }
            plan.used += 1;
        }
        plan.used += 1; // the scale
        pieces.push(Piece {
            src: data,
            kind: PieceKind::Dequant(kind),
            rows: r,
            cols,
            rest: vec![cols],
            dest: d,
            expert,
            order,
            shards: g.shards,
            split: g.split.unwrap_or(dest_split[d as usize]),
            row0: 0,
            rope_heads: 0,
            counted: true,
        });
    }

    Ok(())
}

/// Stage 3: places every piece at its shard / expert offset, slices it for this TP rank
/// (the MoE TP group for experts), checks its exact shape, and emits the ops.
fn slice_stage(ctx: &Ctx<'_>, pieces: &mut [Piece], plan: &mut Plan) -> Result<()> {
    let Ctx {
        ckpt,
        rules,
        dests,
        dest_shard_rows,
        ..
    } = ctx;
    let (ckpt, rules) = (*ckpt, *rules);
    // Stacked and expert shards: group by (destination, expert block), place in order.
    pieces.sort_unstable_by_key(|p| (p.dest, p.expert, p.order, p.src.shard, p.src.index));
    let mut i = 0;
    while i < pieces.len() {
        let mut j = i;
        while j < pieces.len()
            && pieces[j].dest == pieces[i].dest
            && pieces[j].expert == pieces[i].expert
        {
            j += 1;
        }
        let dest = &dests[pieces[i].dest as usize];
        let block_shape: Vec<u64> = match pieces[i].expert {
            Some(_) => dest.shape.iter().skip(1).copied().collect(),
            None => dest.shape.clone(),
        };
        let (block_rows, block_cols) = as_2d(&block_shape);
        let block_bytes = block_rows * block_cols * dest.dtype.size();
        let expert_slots = if pieces[i].expert.is_some() {
            dest.shape.first().copied().unwrap_or(0)
        } else {
            1
        };
        // expert parameters are sliced across the MoE tensor-parallel group
        let (tp, rank) = rules.tp_of(pieces[i].expert.is_some());
        let shards = pieces[i].shards.max(1) as u64;
        let stacked = shards > 1 || j - i > 1 || pieces[i].order > 0 || pieces[i].expert.is_some();
        let shard_rows = shard_rows_of(
            dest_shard_rows[pieces[i].dest as usize],
            dest,
            block_rows,
            shards,
            stacked,
        )?;
        for p in &pieces[i..j] {
            let Some(&expected_rows) = shard_rows.get(p.order as usize) else {
                return Err(unsupported(
                    ckpt,
                    p.src,
                    format!(
                        "shard {} of '{}', which stacks {} shard(s)",
                        p.order,
                        dest.name,
                        shard_rows.len()
                    ),
                ));
            };
            // every shard has its own place, whether or not the others are present
            let row_at: u64 = shard_rows[..p.order as usize].iter().sum();
            let e = ckpt.entry(p.src);
            // vectors (norms, biases, weight_shape) are replicated
            let split = if tp == 1 || e.shape.len() <= 1 {
                TpSplit::Replicated
            } else {
                p.split
            };
            let (rows, cols) = match split {
                TpSplit::Replicated => ((0, p.rows), (0, p.cols)),
                TpSplit::Column => {
                    if p.rows % tp != 0 {
                        return Err(unsupported(
                            ckpt,
                            p.src,
                            format!("dim 0 ({}) is not divisible by tp_size={tp}", p.rows),
                        ));
                    }
                    let n = p.rows / tp;
                    ((rank * n, rank * n + n), (0, p.cols))
                }
                TpSplit::Row => {
                    if e.shape.len() != 2 && matches!(p.kind, PieceKind::Plain) {
                        ((0, p.rows), (0, p.cols)) // vectors and scalars are replicated
                    } else {
                        // a slice of the input dim keeps whole scale groups / blocks
                        let align = match p.kind {
                            PieceKind::Dequant(OpKind::Dequant(q)) => q.block.1,
                            _ => 1,
                        };
                        if !p.cols.is_multiple_of(tp) || !(p.cols / tp).is_multiple_of(align) {
                            return Err(unsupported(
                                ckpt,
                                p.src,
                                format!("dim 1 ({}) cannot be split into tp_size={tp} parts aligned to {align}", p.cols),
                            ));
                        }
                        let n = p.cols / tp;
                        ((0, p.rows), (rank * n, rank * n + n))
                    }
                }
            };
            let local_rows = rows.1 - rows.0;
            let local_cols = cols.1 - cols.0;
            // the local slice must have exactly the shape its shard implies
            let found: Dims = match (p.kind, split) {
                (PieceKind::Dequant(_), _) | (_, TpSplit::Row) => {
                    [local_rows, local_cols].into_iter().collect()
                }
                _ if e.shape.is_empty() => Dims::new(),
                _ => std::iter::once(local_rows)
                    .chain(p.rest.iter().copied())
                    .collect(),
            };
            let mut expected: Dims = block_shape.iter().copied().collect();
            if let Some(first) = expected.first_mut() {
                *first = expected_rows;
            }
            let scalar = !stacked
                && found.iter().product::<u64>() == 1
                && expected.iter().product::<u64>() == 1;
            let slot_ok = p.expert.is_none_or(|x| (x as u64) < expert_slots);
            if (found != expected && !scalar) || !slot_ok {
                let why = if !slot_ok {
                    format!("expert slot {} of {expert_slots}", p.expert.unwrap_or(0))
                } else if stacked {
                    format!("shard {} of {} stacked", p.order, shard_rows.len())
                } else {
                    String::new()
                };
                return Err(Error::shape(
                    &ckpt.shard(p.src).path,
                    &e.name,
                    Some(&dest.name),
                    why,
                    expected.to_vec(),
                    found.to_vec(),
                ));
            }
            let kind = match p.kind {
                PieceKind::Dequant(k) => k,
                PieceKind::Plain if e.dtype == dest.dtype => OpKind::Copy,
                PieceKind::Plain => OpKind::Convert {
                    from: e.dtype,
                    to: dest.dtype,
                },
            };
            let dest_offset = p.expert.unwrap_or(0) as u64 * block_bytes
                + row_at * block_cols * dest.dtype.size();
            let mut emit = |op: Op| {
                plan.bytes_read += bytes_read(ckpt, &op);
                plan.bytes_written += op.out_elems() * dest.dtype.size();
                plan.ops.push(op);
            };
            if p.row0 > 0 || p.rope_heads > 0 {
                if split != TpSplit::Replicated {
                    return Err(unsupported(
                        ckpt,
                        p.src,
                        format!("'{}' is cut from a fused tensor and cannot also be split across TP ranks", dest.name),
                    ));
                }
                if p.rope_heads == 0 {
                    emit(Op {
                        kind,
                        src: p.src,
                        src_cols: p.cols,
                        rows: (p.row0, p.row0 + p.rows),
                        cols,
                        dest: p.dest,
                        dest_offset,
                    });
                } else {
                    // rows taken two at a time: pair row `q` is source rows 2q, 2q + 1;
                    // head h's even rows go to its first half, its odd rows to the second
                    let head = p.rows / p.rope_heads as u64;
                    let half = head / 2;
                    let row_bytes = p.cols * dest.dtype.size();
                    for h in 0..p.rope_heads as u64 {
                        let pair0 = (p.row0 + h * head) / 2;
                        for j in 0..2 {
                            emit(Op {
                                kind,
                                src: p.src,
                                src_cols: 2 * p.cols,
                                rows: (pair0, pair0 + half),
                                cols: (j * p.cols, (j + 1) * p.cols),
                                dest: p.dest,
                                dest_offset: dest_offset + (h * head + j * half) * row_bytes,
                            });
                        }
                    }
                }
            } else {
                emit(Op {
                    kind,
                    src: p.src,
                    src_cols: p.cols,
                    rows,
                    cols,
                    dest: p.dest,
                    dest_offset,
                });
            }
            if p.counted {
                plan.used += 1;
            }
        }
        i = j;
    }
    Ok(())
}

/// The local rows of each shard of a destination block: declared by the model, or equal
/// parts for an undeclared stacked destination, or the whole block.
fn shard_rows_of<'a>(
    declared: Option<&'a [u64]>,
    dest: &DestSpec,
    block_rows: u64,
    shards: u64,
    stacked: bool,
) -> Result<Cow<'a, [u64]>> {
    if let Some(rows) = declared {
        if rows.iter().sum::<u64>() != block_rows {
            return Err(Error::InvalidArgument {
                reason: format!(
                    "the declared shard rows {rows:?} of '{}' do not add up to its {block_rows} rows",
                    dest.name
                ),
            });
        }
        return Ok(Cow::Borrowed(rows));
    }
    if !stacked || shards <= 1 {
        return Ok(Cow::Owned(vec![block_rows]));
    }
    if !block_rows.is_multiple_of(shards) {
        return Err(Error::InvalidArgument {
            reason: format!(
                "'{}' stacks {shards} shards but its {block_rows} rows do not split evenly: \
                 the model must declare the rows of each shard (shard_rows)",
                dest.name
            ),
        });
    }
    Ok(Cow::Owned(vec![block_rows / shards; shards as usize]))
}

fn bytes_read(ckpt: &Checkpoint, op: &Op) -> u64 {
    let e = ckpt.entry(op.src);
    let rows = op.rows.1 - op.rows.0;
    let cols = op.cols.1 - op.cols.0;
    match op.kind {
        OpKind::Copy | OpKind::Convert { .. } => rows * cols * e.dtype.size(),
        OpKind::Dequant(q) => q.bytes_read(rows, cols),
    }
}

/// Proves the ops tile every destination exactly once; records gaps as missing.
fn check_coverage(
    ckpt: &Checkpoint,
    rules: &Rules,
    plan: &mut Plan,
    rewrites: &[(String, String)],
) -> Result<()> {
    let mut by_dest: Vec<Vec<(u64, u64, usize)>> = vec![Vec::new(); plan.dests.len()];
    for (k, op) in plan.ops.iter().enumerate() {
        let size = plan.dests[op.dest as usize].dtype.size();
        by_dest[op.dest as usize].push((op.dest_offset, op.dest_offset + op.out_elems() * size, k));
    }
    for (d, ranges) in by_dest.iter_mut().enumerate() {
        ranges.sort_unstable();
        let dest = &plan.dests[d];
        let total = dest.nbytes();
        let mut at = 0u64;
        let mut prev: Option<usize> = None;
        for &(s, e, k) in ranges.iter() {
            if s < at {
                let other = prev
                    .map(|p| ckpt.entry(plan.ops[p].src).name.to_string())
                    .unwrap_or_default();
                let src = plan.ops[k].src;
                return Err(Error::Plan {
                    file: ckpt.shard(src).path.clone(),
                    tensor: Some(ckpt.entry(src).name.to_string()),
                    destination: dest.name.clone(),
                    kind: "overlap",
                    reason: format!(
                        "tensors '{other}' and '{}' both write bytes [{s}, {at})",
                        ckpt.entry(src).name
                    ),
                });
            }
            if s > at {
                plan.missing.push(Missing {
                    dest: dest.name.clone(),
                    start: at,
                    end: s,
                    expected: None,
                });
            }
            at = e;
            prev = Some(k);
        }
        if at > total {
            let src = prev.map(|p| plan.ops[p].src);
            return Err(Error::Plan {
                file: src.map_or_else(|| ckpt.display_path(), |s| ckpt.shard(s).path.clone()),
                tensor: src.map(|s| ckpt.entry(s).name.to_string()),
                destination: dest.name.clone(),
                kind: "past_end",
                reason: format!("writes byte {at} of a {total}-byte destination"),
            });
        }
        if at < total {
            plan.missing.push(Missing {
                dest: dest.name.clone(),
                start: at,
                end: total,
                expected: None,
            });
        }
    }
    // Name the checkpoint tensor each gap is waiting for, where the rules can say.
    for m in &mut plan.missing {
        m.expected = expected_name(
            rules,
            plan.dests.iter().find(|d| d.name == m.dest),
            m.start,
            rewrites,
        );
    }
    Ok(())
}

/// Which shard of a stacked block holds byte `at` of the block (`block` bytes).
fn order_at(rules: &Rules, dest: &DestSpec, at: u64, block: u64, shards: u64) -> u32 {
    let Some(rows) = rules.shard_rows.get(&dest.name) else {
        return (at * shards.max(1) / block.max(1)) as u32;
    };
    let total: u64 = rows.iter().sum();
    let row = at * total / block.max(1);
    let mut acc = 0;
    for (k, r) in rows.iter().enumerate() {
        acc += r;
        if row < acc {
            return k as u32;
        }
    }
    rows.len().saturating_sub(1) as u32
}

/// The checkpoint name that would have filled byte `start` of `dest`: inverts the expert,
/// stacked and prefix rules.
fn expected_name(
    rules: &Rules,
    dest: Option<&DestSpec>,
    start: u64,
    rewrites: &[(String, String)],
) -> Option<String> {
    let dest = dest?;
    // Undo the rewrite whose target is the longest prefix of the name, preferring the
    // rewrites this checkpoint used; a checkpoint that uses none is not prefixed at all.
    let un_rewrite = |n: String| {
        let longest = |set: &'_ [(String, String)]| {
            set.iter()
                .filter(|(_, to)| n.starts_with(to.as_str()))
                .max_by_key(|(_, to)| to.len())
                .cloned()
        };
        let best = longest(rewrites).or_else(|| {
            if rewrites.is_empty() {
                None
            } else {
                longest(&rules.rewrites)
            }
        });
        match best {
            Some((from, to)) => format!("{from}{}", &n[to.len()..]),
            None => n,
        }
    };
    // expert parameters: which expert block, which shard (halves for two shards)
    for rule in rules.experts.values() {
        let Some(at) = dest.name.find(rule.param_prefix.as_str()) else {
            continue;
        };
        let block = dest.nbytes() / dest.shape.first().copied().unwrap_or(1).max(1);
        let slot = (start / block.max(1)) as u32;
        let shards = rules
            .experts
            .values()
            .filter(|r| r.param_prefix == rule.param_prefix && r.expert == 0)
            .count() as u64;
        let order = order_at(rules, dest, start % block.max(1), block, shards);
        let lo = rules.expert_range().map_or(0, |r| r.0);
        let local_count = rules.expert_range().map_or(u32::MAX, |r| r.1 - r.0);
        let global = if slot >= local_count {
            rules.fused_shared_slot?
        } else {
            lo + slot
        };
        let r = rules.experts.iter().find(|(_, r)| {
            r.param_prefix == rule.param_prefix && r.expert == global && r.order == order
        })?;
        let frag = r.0.as_str();
        let name = format!(
            "{}{}{}",
            &dest.name[..at],
            frag,
            &dest.name[at + rule.param_prefix.len()..]
        );
        let name = if rules.fused_shared_slot == Some(global) {
            name.replace(&format!("experts.{global}."), "shared_experts.")
        } else {
            name
        };
        return Some(un_rewrite(name));
    }
    for rule in &rules.stacked {
        if let Some(at) = dest.name.find(rule.param.as_str()) {
            let shards = rules
                .stacked
                .iter()
                .filter(|r| r.param == rule.param)
                .count() as u64;
            let order = order_at(rules, dest, start, dest.nbytes(), shards);
            let r = rules
                .stacked
                .iter()
                .find(|r| r.param == rule.param && r.order == order)?;
            let name = format!(
                "{}{}{}",
                &dest.name[..at],
                r.ckpt,
                &dest.name[at + rule.param.len()..]
            );
            return Some(un_rewrite(name));
        }
    }
    Some(un_rewrite(dest.name.clone()))
}

impl Plan {
    /// The same plan against `new`, a later version of the checkpoint (an RL trainer's new
    /// shards): every op's sources are looked up by name in `new` and must keep their
    /// dtype and shape. Ops whose sources are all absent are dropped (a partial update);
    /// an op with only some of its sources present (a weight without its scale) is an
    /// error. Returns the rebound plan and the names in `new` that no op reads (for the
    /// caller to re-plan or reject).
    pub fn rebind(&self, old: &Checkpoint, new: &Checkpoint) -> Result<(Plan, Vec<String>)> {
        let look = |id: TensorId, dest: u32| -> Result<Option<TensorId>> {
            let e = old.entry(id);
            match new.find(&e.name) {
                None => Ok(None),
                Some(nid) => {
                    let ne = new.entry(nid);
                    if ne.dtype != e.dtype || ne.shape != e.shape {
                        return Err(Error::shape(
                            &new.shard(nid).path,
                            &e.name,
                            Some(&self.dests[dest as usize].name),
                            format!(
                                "{} mismatch: the model was planned for {} {:?}, this tensor is {} {:?}",
                                if ne.dtype != e.dtype { "dtype" } else { "shape" },
                                e.dtype,
                                e.shape.as_slice(),
                                ne.dtype,
                                ne.shape.as_slice()
                            ),
                            e.shape.to_vec(),
                            ne.shape.to_vec(),
                        ));
                    }
                    Ok(Some(nid))
                }
            }
        };
        let mut read = vec![vec![false; 0]; new.shards.len()];
        for (s, sh) in new.shards.iter().enumerate() {
            read[s] = vec![false; sh.header.tensors.len()];
        }
        let mut ops = Vec::with_capacity(self.ops.len());
        for op in &self.ops {
            let src = look(op.src, op.dest)?;
            let scale_old = op.kind.scale();
            let scale_new = match scale_old {
                Some(s) => look(s, op.dest)?,
                None => None,
            };
            match (src, scale_old, scale_new) {
                (None, _, None) => continue,
                (Some(_), Some(_), None) | (None, Some(_), Some(_)) => {
                    let (present, absent) = if src.is_some() {
                        (op.src, scale_old.expect("scale"))
                    } else {
                        (scale_old.expect("scale"), op.src)
                    };
                    return Err(Error::MissingTensor {
                        file: new.display_path(),
                        tensor: old.entry(absent).name.to_string(),
                        hint: Some(format!(
                            "'{}' is updated, and it is dequantized together with this tensor",
                            old.entry(present).name
                        )),
                    });
                }
                _ => {}
            }
            let src = src.expect("present");
            read[src.shard as usize][src.index as usize] = true;
            let mut kind = op.kind;
            if let Some(s) = scale_new {
                read[s.shard as usize][s.index as usize] = true;
                kind.set_scale(s);
            }
            ops.push(Op {
                kind,
                src,
                ..op.clone()
            });
        }
        let unread: Vec<String> = new
            .iter()
            .filter(|(id, _)| !read[id.shard as usize][id.index as usize])
            .map(|(_, e)| e.name.to_string())
            .collect();
        let bytes_written = ops
            .iter()
            .map(|o| o.out_elems() * self.dests[o.dest as usize].dtype.size())
            .sum();
        let bytes_read = ops.iter().map(|o| bytes_read(new, o)).sum();
        Ok((
            Plan {
                ops,
                dests: self.dests.clone(),
                used: 0,
                bytes_read,
                bytes_written,
                ..Plan::default()
            },
            unread,
        ))
    }
}

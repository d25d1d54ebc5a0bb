//! The executor: parallel `pread`s from shards straight into destination memory.
//!
//! Copies are cut into chunks so that one large tensor keeps every thread busy, and
//! chunks are issued in file order within each shard. Reading with `pread` rather than
//! through the map means the source pages are never faulted into this process and a
//! shard truncated while in use yields an I/O error rather than `SIGBUS`.

use rayon::prelude::*;
use rayon::ThreadPool;

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};

/// Default chunk size for one `pread`.
pub const DEFAULT_CHUNK: usize = 8 << 20;

const HUGE_PAGE: usize = 2 << 20;

/// How to execute a batch of reads.
#[derive(Debug, Clone, Copy)]
pub struct ReadOptions {
    /// Bytes per `pread` (at least 4 KiB).
    pub chunk: usize,
    /// Advise transparent huge pages on the 2 MiB-aligned interior of each destination
    /// before writing it (fresh destinations then fault in 2 MiB at a time). Off by
    /// default: on the VMs measured (THP `madvise` mode, `defrag=madvise`) a huge-page
    /// fault costs ~3x its 4 KiB pages (a first `from_pretrained` of 1.45 GB: 2.5 s with,
    /// 1.4 s without). `KIMI_LOADER_HUGE_PAGES=1` turns it on.
    pub huge_pages: bool,
    /// Fault each chunk's destination pages in with one `MADV_POPULATE_WRITE` right
    /// before writing the chunk, instead of one page fault at a time inside `pread`'s or
    /// the converter's copy: faults of one thread overlap reads of the others, and the
    /// zeroed pages are still in cache when the chunk lands. Already-present pages are
    /// untouched; kernels without it (before 5.14) ignore it. `KIMI_LOADER_PREFAULT=0`
    /// turns it off (for measurements).
    pub prefault: bool,
}

impl Default for ReadOptions {
    fn default() -> Self {
        let env = |k: &str| std::env::var(k).ok();
        ReadOptions {
            chunk: DEFAULT_CHUNK,
            huge_pages: env("KIMI_LOADER_HUGE_PAGES").is_some_and(|v| v == "1"),
            prefault: env("KIMI_LOADER_PREFAULT").is_none_or(|v| v != "0"),
        }
    }
}

/// Destination chunks smaller than this are left to fault as they are written (a call
/// costs more than the few faults it saves).
const PREFAULT_MIN: usize = 64 << 10;

/// Faults in every page of `dst` (`MADV_POPULATE_WRITE`), contents unchanged. Errors (an
/// old kernel, a range that is not anonymous or file memory) are ignored: the write that
/// follows faults the pages in anyway.
fn populate(dst: &mut [u8]) {
    const MADV_POPULATE_WRITE: libc::c_int = 23;
    const PAGE: usize = 4096;
    if dst.len() < PREFAULT_MIN {
        return;
    }
    let at = dst.as_mut_ptr() as usize;
    let (start, end) = (at / PAGE * PAGE, (at + dst.len()).next_multiple_of(PAGE));
    // SAFETY: MADV_POPULATE_WRITE faults pages in as if written, without changing their
    // contents; every page of [start, end) holds a byte of `dst`, which we may write.
    unsafe {
        libc::madvise(start as *mut libc::c_void, end - start, MADV_POPULATE_WRITE);
    }
}

/// Advises huge pages for the 2 MiB-aligned part of `[addr, addr + len)`.
fn advise_huge_pages(addr: usize, len: usize) {
    let start = addr.next_multiple_of(HUGE_PAGE);
    let end = (addr + len) / HUGE_PAGE * HUGE_PAGE;
    if end > start {
        // SAFETY: madvise with MADV_HUGEPAGE only changes how the kernel backs the
        // range; it never changes its contents or validity. The range lies inside a
        // destination the caller guarantees is valid and writable.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
        }
    }
}

/// One contiguous byte range of a shard to copy into destination memory.
#[derive(Debug, Clone, Copy)]
pub struct ReadTask {
    pub shard: u32,
    /// Absolute file offset of the first byte.
    pub offset: u64,
    pub len: u64,
    /// Destination address; `len` bytes from here must be writable.
    pub dst: *mut u8,
}

// SAFETY: a `ReadTask` is only a description; the contract of `read_tasks` requires the
// destinations to be valid, disjoint and not accessed by anyone else while it runs, so
// sending the addresses to worker threads cannot create a data race.
unsafe impl Send for ReadTask {}
// SAFETY: see `Send` above; shared references to a task never write through `dst`.
unsafe impl Sync for ReadTask {}

/// Executes `tasks` on `pool`.
///
/// # Safety
/// Every `tasks[i].dst` must point to `tasks[i].len` writable bytes that stay valid for
/// the duration of the call, the destination ranges must not overlap, and nothing else
/// may read or write them until this returns.
pub unsafe fn read_tasks(
    ckpt: &Checkpoint,
    tasks: &[ReadTask],
    pool: &ThreadPool,
    opts: ReadOptions,
) -> Result<()> {
    let chunk = opts.chunk.max(4096) as u64;
    for t in tasks {
        let shard = ckpt
            .shards
            .get(t.shard as usize)
            .ok_or_else(|| Error::InvalidArgument {
                reason: format!("shard {} out of range", t.shard),
            })?;
        if t.offset
            .checked_add(t.len)
            .is_none_or(|e| e > shard.file_len)
        {
            return Err(Error::InvalidArgument {
                reason: format!(
                    "byte range [{}, +{}) is outside {}",
                    t.offset,
                    t.len,
                    shard.path.display()
                ),
            });
        }
    }
    if opts.huge_pages {
        for t in tasks.iter().filter(|t| t.len as usize >= HUGE_PAGE) {
            advise_huge_pages(t.dst as usize, t.len as usize);
        }
    }
    let mut pieces: Vec<ReadTask> = Vec::with_capacity(tasks.len());
    for t in tasks {
        let mut done = 0u64;
        while done < t.len {
            let n = chunk.min(t.len - done);
            pieces.push(ReadTask {
                shard: t.shard,
                offset: t.offset + done,
                len: n,
                // SAFETY: `done < t.len`, so the address stays inside the caller's range.
                dst: unsafe { t.dst.add(done as usize) },
            });
            done += n;
        }
    }
    pieces.sort_unstable_by_key(|p| (p.shard, p.offset));
    pool.install(|| {
        pieces.par_iter().with_max_len(1).try_for_each(|p| {
            // SAFETY: per this function's contract the range is valid, writable and
            // disjoint from every other piece, so this is the only live reference to it.
            let dst = unsafe { std::slice::from_raw_parts_mut(p.dst, p.len as usize) };
            if opts.prefault {
                populate(dst);
            }
            ckpt.shards[p.shard as usize].read_at(p.offset, dst)
        })
    })
}

// ---------------------------------------------------------------------------------------
// Plan execution

use std::cell::RefCell;

use crate::convert::convert;
use crate::plan::{Op, OpKind, Plan};
use crate::shard::Shard;

/// A destination buffer: `len` writable bytes at `ptr`.
#[derive(Debug, Clone, Copy)]
pub struct DestBuf {
    pub ptr: *mut u8,
    pub len: u64,
}

// SAFETY: see `ReadTask`; `execute_plan`'s contract makes the buffers exclusively ours.
unsafe impl Send for DestBuf {}
// SAFETY: as above.
unsafe impl Sync for DestBuf {}

thread_local! {
    static BOUNCE: RefCell<(Vec<u8>, Vec<u8>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Where the rows of a row-major tensor lie in its shard, and which bytes of each row
/// to keep.
#[derive(Clone, Copy)]
struct RowSpan {
    /// Absolute file offset of row 0.
    base: u64,
    /// Bytes per stored row.
    stride: u64,
    /// First kept byte within a row, and how many bytes are kept.
    seg: u64,
    seg_len: u64,
}

/// Reads rows `[r0, r1)` of `span`, packing the kept bytes of each row back to back into
/// `out`: one `pread` when whole rows are kept, one per row otherwise.
fn read_rows(shard: &Shard, span: RowSpan, r0: u64, r1: u64, out: &mut [u8]) -> Result<()> {
    let RowSpan {
        base,
        stride,
        seg,
        seg_len,
    } = span;
    if seg == 0 && seg_len == stride {
        return shard.read_at(
            base + r0 * stride,
            &mut out[..((r1 - r0) * stride) as usize],
        );
    }
    for (k, r) in (r0..r1).enumerate() {
        let at = k * seg_len as usize;
        shard.read_at(base + r * stride + seg, &mut out[at..at + seg_len as usize])?;
    }
    Ok(())
}

fn grow(buf: &mut Vec<u8>, n: usize) -> &mut [u8] {
    if buf.len() < n {
        buf.resize(n, 0);
    }
    &mut buf[..n]
}

/// Executes rows `[r0, r1)` of `op` into `dst` (the op's destination bytes for those rows).
fn run_rows(
    ckpt: &Checkpoint,
    op: &Op,
    r0: u64,
    r1: u64,
    dst: &mut [u8],
    out_elem: u64,
) -> Result<()> {
    let e = ckpt.entry(op.src);
    let shard = ckpt.shard(op.src);
    let base = shard.abs_offset(e);
    let (c0, c1) = op.cols;
    let n = (c1 - c0) as usize;
    // the kept columns of each source row, for ops that read elements as stored
    let plain = |es: u64| RowSpan {
        base,
        stride: op.src_cols * es,
        seg: c0 * es,
        seg_len: (c1 - c0) * es,
    };
    match op.kind {
        OpKind::Copy => read_rows(shard, plain(e.dtype.size()), r0, r1, dst),
        OpKind::Convert { from, to } => BOUNCE.with_borrow_mut(|(a, _)| {
            let buf = grow(a, ((r1 - r0) * (c1 - c0) * from.size()) as usize);
            read_rows(shard, plain(from.size()), r0, r1, buf)?;
            convert(buf, from, dst, to, ((r1 - r0) * (c1 - c0)) as usize);
            Ok(())
        }),
        OpKind::Dequant(q) => {
            // the format says how many bytes a span of columns takes; the scale grid is
            // `ceil(rows / block.0) x ceil(cols / block.1)` for every format
            let se = ckpt.entry(q.scale);
            let ss = ckpt.shard(q.scale);
            let f = q.format;
            let (seg, seg_len) = (f.data_bytes(c0), f.data_bytes(c1 - c0));
            let sb = q.scale_dtype.size();
            let (sc0, sc1) = (c0 / q.block.1, c1.div_ceil(q.block.1));
            let slen = (sc1 - sc0) * sb;
            let (br0, br1) = (r0 / q.block.0, (r1 - 1) / q.block.0 + 1);
            BOUNCE.with_borrow_mut(|(a, b)| {
                let rows = (r1 - r0) as usize;
                let data = grow(a, rows * seg_len as usize);
                read_rows(
                    shard,
                    RowSpan {
                        base,
                        stride: f.data_bytes(op.src_cols),
                        seg,
                        seg_len,
                    },
                    r0,
                    r1,
                    data,
                )?;
                let scales = grow(b, ((br1 - br0) * slen) as usize);
                read_rows(
                    ss,
                    RowSpan {
                        base: ss.abs_offset(se),
                        stride: op.src_cols.div_ceil(q.block.1) * sb,
                        seg: sc0 * sb,
                        seg_len: slen,
                    },
                    br0,
                    br1,
                    scales,
                )?;
                let ob = n * out_elem as usize;
                for k in 0..rows {
                    let srow = (((r0 + k as u64) / q.block.0 - br0) * slen) as usize;
                    f.dequant_row(
                        &data[k * seg_len as usize..(k + 1) * seg_len as usize],
                        &scales[srow..srow + slen as usize],
                        q.scale_dtype,
                        q.block.1 as usize,
                        n,
                        &mut dst[k * ob..(k + 1) * ob],
                        q.to,
                    );
                }
                Ok(())
            })
        }
    }
}

/// Executes `plan.ops[range]` into `dests` (indexed like `plan.dests`; only the
/// destinations the ops in `range` write need a buffer), in parallel on `pool`. Large ops
/// are cut into row blocks of about `chunk` output bytes.
///
/// # Safety
/// Each given `dests[i]` must point to `plan.dests[i].nbytes()` writable bytes that stay
/// valid, are not aliased by another entry, and are not accessed by anyone else until this
/// returns.
pub unsafe fn execute_plan(
    ckpt: &Checkpoint,
    plan: &Plan,
    range: std::ops::Range<usize>,
    dests: &[Option<DestBuf>],
    pool: &ThreadPool,
    opts: ReadOptions,
) -> Result<()> {
    if dests.len() != plan.dests.len() {
        return Err(Error::InvalidArgument {
            reason: format!(
                "{} destination slots for {} destinations",
                dests.len(),
                plan.dests.len()
            ),
        });
    }
    for (d, spec) in dests.iter().zip(&plan.dests) {
        if let Some(d) = d {
            if d.len != spec.nbytes() || (d.ptr.is_null() && d.len > 0) {
                return Err(Error::InvalidArgument {
                    reason: format!(
                        "buffer for '{}' has {} bytes, expected {}",
                        spec.name,
                        d.len,
                        spec.nbytes()
                    ),
                });
            }
        }
    }
    let ops = plan
        .ops
        .get(range.clone())
        .ok_or_else(|| Error::InvalidArgument {
            reason: format!("op range {range:?} outside 0..{}", plan.ops.len()),
        })?;
    if let Some(op) = ops.iter().find(|op| dests[op.dest as usize].is_none()) {
        return Err(Error::InvalidArgument {
            reason: format!(
                "no buffer given for '{}'",
                plan.dests[op.dest as usize].name
            ),
        });
    }
    if opts.huge_pages {
        for d in dests
            .iter()
            .flatten()
            .filter(|d| d.len as usize >= HUGE_PAGE)
        {
            advise_huge_pages(d.ptr as usize, d.len as usize);
        }
    }
    // work items: (op index, first row, end row)
    let mut items: Vec<(usize, u64, u64)> = Vec::with_capacity(ops.len());
    for (k, op) in ops.iter().enumerate() {
        let row_bytes = (op.cols.1 - op.cols.0) * plan.dests[op.dest as usize].dtype.size();
        let step = (opts.chunk as u64 / row_bytes.max(1)).max(1);
        let mut r = op.rows.0;
        while r < op.rows.1 {
            let end = (r + step).min(op.rows.1);
            items.push((k, r, end));
            r = end;
        }
    }
    pool.install(|| {
        items
            .par_iter()
            .with_max_len(1)
            .try_for_each(|&(k, r0, r1)| {
                let op = &ops[k];
                let elem = plan.dests[op.dest as usize].dtype.size();
                let row_bytes = (op.cols.1 - op.cols.0) * elem;
                let start = op.dest_offset + (r0 - op.rows.0) * row_bytes;
                let len = (r1 - r0) * row_bytes;
                let buf = dests[op.dest as usize].expect("checked above");
                debug_assert!(start + len <= buf.len);
                // SAFETY: the plan's coverage check proved that ops write disjoint ranges
                // inside each destination, items of one op cover disjoint row blocks, and the
                // caller guarantees the buffers are valid and exclusively ours.
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(buf.ptr.add(start as usize), len as usize)
                };
                if opts.prefault {
                    populate(dst);
                }
                run_rows(ckpt, op, r0, r1, dst, elem)
                    .map_err(|e| with_tensor(e, &ckpt.entry(op.src).name))
            })
    })
}

fn with_tensor(e: Error, name: &str) -> Error {
    match e {
        Error::Io {
            file,
            tensor: None,
            source,
        } => Error::Io {
            file,
            tensor: Some(name.to_owned()),
            source,
        },
        other => other,
    }
}

/// xxh3-64 of every tensor in `ids`, read with `pread` in parallel (no mapping is
/// touched, so a shard truncated meanwhile is an error, not a fault).
pub fn hash_tensors(
    ckpt: &Checkpoint,
    ids: &[crate::checkpoint::TensorId],
    pool: &ThreadPool,
) -> Result<Vec<u64>> {
    const STEP: usize = 4 << 20;
    pool.install(|| {
        ids.par_iter()
            .map(|&id| {
                let e = ckpt.entry(id);
                let shard = ckpt.shard(id);
                let mut h = xxhash_rust::xxh3::Xxh3::new();
                BOUNCE.with_borrow_mut(|(a, _)| {
                    let mut done = 0u64;
                    while done < e.nbytes() {
                        let n = (e.nbytes() - done).min(STEP as u64) as usize;
                        let buf = grow(a, n);
                        shard
                            .read_at(shard.abs_offset(e) + done, buf)
                            .map_err(|err| with_tensor(err, &e.name))?;
                        h.update(buf);
                        done += n as u64;
                    }
                    Ok(h.digest())
                })
            })
            .collect()
    })
}

/// Executes the ops `which` of `plan` all-or-nothing: every op first writes into its own
/// staging buffer; only when all of them succeeded are the staged bytes copied into the
/// destinations. A read error (a corrupt or truncated shard) leaves every destination
/// untouched. Staging is carved from `arena` when it is large enough (so a caller that
/// keeps one avoids faulting in fresh memory on every update), else allocated here; peak
/// extra memory is the bytes of the executed ops.
///
/// # Safety
/// As [`execute_plan`] for the destinations the ops in `which` write; `arena`, if given,
/// must be writable, alive for the call and disjoint from every destination.
pub unsafe fn execute_atomic(
    ckpt: &Checkpoint,
    plan: &Plan,
    which: &[usize],
    dests: &[Option<DestBuf>],
    arena: Option<DestBuf>,
    pool: &ThreadPool,
) -> Result<()> {
    let targets = staging_targets(plan, which, dests)?;
    let total = staged_bytes(plan, which)?;
    let mut owned: Vec<u8> = Vec::new();
    let arena = match arena {
        Some(a) if a.len >= total => a,
        _ => {
            owned.resize(total as usize, 0);
            DestBuf {
                ptr: owned.as_mut_ptr(),
                len: total,
            }
        }
    };
    // SAFETY: the arena is live, writable and disjoint from the destinations (caller's
    // contract, or `owned`, ours); the destinations were checked by `staging_targets`.
    unsafe {
        stage_ops(ckpt, plan, which, arena, pool)?;
        commit_staged(&targets, arena, pool);
    }
    Ok(())
}

/// Bytes the ops `which` stage: the sum of their outputs.
pub fn staged_bytes(plan: &Plan, which: &[usize]) -> Result<u64> {
    which.iter().try_fold(0u64, |acc, &k| {
        let op = plan.ops.get(k).ok_or_else(|| Error::InvalidArgument {
            reason: format!("op {k} out of range"),
        })?;
        Ok(acc + op.out_elems() * plan.dests[op.dest as usize].dtype.size())
    })
}

/// `(destination buffer, byte offset, bytes)` of each op of `which`, checked against the
/// plan's destinations.
pub fn staging_targets(
    plan: &Plan,
    which: &[usize],
    dests: &[Option<DestBuf>],
) -> Result<Vec<(DestBuf, u64, u64)>> {
    let mut targets = Vec::with_capacity(which.len());
    for &k in which {
        let op = plan.ops.get(k).ok_or_else(|| Error::InvalidArgument {
            reason: format!("op {k} out of range"),
        })?;
        let spec = &plan.dests[op.dest as usize];
        let Some(buf) = dests.get(op.dest as usize).copied().flatten() else {
            return Err(Error::InvalidArgument {
                reason: format!("no buffer given for '{}'", spec.name),
            });
        };
        if buf.len != spec.nbytes() {
            return Err(Error::InvalidArgument {
                reason: format!(
                    "buffer for '{}' has {} bytes, expected {}",
                    spec.name,
                    buf.len,
                    spec.nbytes()
                ),
            });
        }
        targets.push((buf, op.dest_offset, op.out_elems() * spec.dtype.size()));
    }
    Ok(targets)
}

/// Executes the ops `which` into `arena`, each op's output contiguous and in `which`
/// order (the layout [`commit_staged`] reads). Nothing but the arena is written.
///
/// # Safety
/// `arena` must be writable, alive for the call, at least [`staged_bytes`] long and not
/// overlap memory the checkpoint reads from.
pub unsafe fn stage_ops(
    ckpt: &Checkpoint,
    plan: &Plan,
    which: &[usize],
    arena: DestBuf,
    pool: &ThreadPool,
) -> Result<()> {
    let total = staged_bytes(plan, which)?;
    if arena.len < total {
        return Err(Error::InvalidArgument {
            reason: format!("staging arena of {} bytes, {total} needed", arena.len),
        });
    }
    let mut staged_plan = Plan {
        dests: Vec::with_capacity(which.len()),
        ..Plan::default()
    };
    let mut bufs = Vec::with_capacity(which.len());
    let mut off = 0u64;
    for &k in which {
        let op = &plan.ops[k];
        let spec = &plan.dests[op.dest as usize];
        let n = op.out_elems();
        // each op becomes the whole of a private one-op destination
        staged_plan.dests.push(crate::plan::DestSpec {
            name: spec.name.clone(),
            shape: vec![n],
            dtype: spec.dtype,
        });
        staged_plan.ops.push(Op {
            dest: (staged_plan.dests.len() - 1) as u32,
            dest_offset: 0,
            ..op.clone()
        });
        let len = n * spec.dtype.size();
        // SAFETY: `off + len <= total <= arena.len`: inside the arena.
        let ptr = unsafe { arena.ptr.add(off as usize) };
        bufs.push(Some(DestBuf { ptr, len }));
        off += len;
    }
    // SAFETY: the staging ranges are disjoint slices of the arena, which the caller
    // guarantees live, writable and apart from every source.
    unsafe {
        execute_plan(
            ckpt,
            &staged_plan,
            0..staged_plan.ops.len(),
            &bufs,
            pool,
            ReadOptions::default(),
        )
    }
}

/// Copies what [`stage_ops`] left in `arena` into the destinations `targets` (from
/// [`staging_targets`] of the same ops, same order), in parallel. Cannot fail.
///
/// # Safety
/// `arena` holds the staged bytes (alive for the call); every target range lies in a
/// live destination, and the ranges are pairwise disjoint (the plan's coverage proof
/// makes the ranges of different ops disjoint).
pub unsafe fn commit_staged(targets: &[(DestBuf, u64, u64)], arena: DestBuf, pool: &ThreadPool) {
    let mut starts = Vec::with_capacity(targets.len());
    let mut off = 0u64;
    for t in targets {
        starts.push(off);
        off += t.2;
    }
    debug_assert!(off <= arena.len);
    let base = arena.ptr as usize; // (an address is Sync; the pointer is not)
    pool.install(|| {
        targets
            .par_iter()
            .zip(starts.par_iter())
            .for_each(|(&(buf, dst_off, len), &src_off)| {
                // SAFETY: `src_off + len <= arena.len` (the staged layout); the destination
                // range lies inside a live destination (caller's contract), disjoint from
                // the other ops' ranges and from the arena.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        (base as *const u8).add(src_off as usize),
                        buf.ptr.add(dst_off as usize),
                        len as usize,
                    )
                };
            })
    });
}

/// Columns of one row of [`op_table`].
pub const OP_TABLE_COLS: usize = 18;

/// The dtype codes of [`op_table`]'s dtype columns.
pub fn float_code(d: crate::Dtype) -> i64 {
    match d {
        crate::Dtype::BF16 => 1,
        crate::Dtype::F16 => 2,
        crate::Dtype::F32 => 3,
        crate::Dtype::U8 | crate::Dtype::F8E8M0 => 4,
        _ => 0,
    }
}

/// The ops `which` as a descriptor table for a device executor, one row of
/// [`OP_TABLE_COLS`] integers each: `[kind (0 copy, 1 convert, 2 dequantize), source
/// address of row 0, source row bytes, r0, r1, c0, c1, source element bytes,
/// destination element bytes, destination index, destination byte offset, (from code
/// << 8) | to code, scale address of row 0, scale row bytes, block rows, block columns,
/// format (1 ct-int4, 2 MXFP4, 3 FP8 block), scale dtype code]`. The output of an op is
/// rows `r0..r1` x (logical) columns `c0..c1` of its source, contiguous at the
/// destination offset. Only memory checkpoints have addresses: other sources are an
/// error naming the tensor.
pub fn op_table(ckpt: &Checkpoint, plan: &Plan, which: &[usize]) -> Result<Vec<i64>> {
    let mut out = Vec::with_capacity(which.len() * OP_TABLE_COLS);
    for &k in which {
        let op = plan.ops.get(k).ok_or_else(|| Error::InvalidArgument {
            reason: format!("op {k} out of range"),
        })?;
        let e = ckpt.entry(op.src);
        let shard = ckpt.shard(op.src);
        let unsupported = |why: &str| Error::Unsupported {
            file: shard.path.clone(),
            reason: format!("tensor '{}': {why}", e.name),
        };
        let address = |id: crate::checkpoint::TensorId| {
            let sh = ckpt.shard(id);
            sh.address_at(sh.abs_offset(ckpt.entry(id))).ok_or_else(|| {
                unsupported("the device executor reads tensors handed over in memory only")
            })
        };
        let dest = &plan.dests[op.dest as usize];
        let es = e.dtype.size();
        let mut scale = [0i64; 6];
        let (kind, conv, row_bytes) = match op.kind {
            OpKind::Copy => (0, 0, op.src_cols * es),
            OpKind::Convert { from, to } if float_code(from) > 0 && float_code(to) > 0 => (
                1,
                (float_code(from) << 8) | float_code(to),
                op.src_cols * es,
            ),
            OpKind::Convert { .. } => {
                return Err(unsupported("this conversion has no device kernel"))
            }
            OpKind::Dequant(q) => {
                let (fmt, sdt) = (
                    match q.format {
                        crate::quant::QuantFormat::Int4 => 1,
                        crate::quant::QuantFormat::Mxfp4 => 2,
                        crate::quant::QuantFormat::Fp8Block => 3,
                    },
                    float_code(q.scale_dtype),
                );
                if sdt == 0 || float_code(q.to) == 0 {
                    return Err(unsupported("this dequantization has no device kernel"));
                }
                let se = ckpt.entry(q.scale);
                let scale_cols = se.shape.get(1).copied().unwrap_or(1);
                scale = [
                    address(q.scale)? as i64,
                    (scale_cols * q.scale_dtype.size()) as i64,
                    q.block.0 as i64,
                    q.block.1 as i64,
                    fmt,
                    sdt,
                ];
                (2, float_code(q.to), q.format.data_bytes(op.src_cols))
            }
        };
        out.extend_from_slice(&[
            kind,
            address(op.src)? as i64,
            row_bytes as i64,
            op.rows.0 as i64,
            op.rows.1 as i64,
            op.cols.0 as i64,
            op.cols.1 as i64,
            es as i64,
            dest.dtype.size() as i64,
            op.dest as i64,
            op.dest_offset as i64,
            conv,
        ]);
        out.extend_from_slice(&scale);
    }
    Ok(out)
}

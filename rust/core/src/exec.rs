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
    /// before writing it. Fresh destinations then fault in 2 MiB at a time instead of
    /// 4 KiB (what numpy does for its own large arrays); already-populated memory is
    /// unaffected. Advisory only: failures are ignored.
    pub huge_pages: bool,
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions {
            chunk: DEFAULT_CHUNK,
            huge_pages: true,
        }
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
            ckpt.shards[p.shard as usize].read_at(p.offset, dst)
        })
    })
}

//! One safetensors file: its validated header and a private (copy-on-write) memory map;
//! or, for updates handed over as tensors, a set of memory regions read in place
//! ([`Shard::from_memory`]), behind the same [`Shard::read_at`].

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use memmap2::{MmapOptions, MmapRaw};

use crate::error::{Error, Result};
use crate::header::{header_len, parse_header, Header, Name, NameArena, TensorEntry};

/// Largest header buffer kept per thread between shards (real headers are < 1 MB).
const KEEP_BUF: usize = 8 << 20;

thread_local! {
    static HEADER_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

pub struct Shard {
    /// the file, or for a memory shard its label (e.g. `<update_from_tensors>`)
    pub path: PathBuf,
    pub file_len: u64,
    pub header: Header,
    backing: Backing,
}

enum Backing {
    File {
        file: File,
        map: MmapRaw,
    },
    /// `(start, end, address)`: the virtual offsets `start..end` (consecutive, like a
    /// file's data section; the header's tensors, or views into them, lie inside) are the
    /// bytes at `address..`.
    Memory {
        regions: Vec<(u64, u64, usize)>,
        /// what keeps the regions alive (the caller's tensors); `None` once released
        keep: std::sync::RwLock<Option<Box<dyn std::any::Any + Send + Sync>>>,
        /// the regions are device memory (CUDA): the host never reads them; only a device
        /// executor does, from the addresses ([`Shard::address_at`])
        on_device: bool,
    },
}

/// One tensor handed over in memory: [`Shard::from_memory`].
pub struct MemTensor {
    pub name: String,
    pub dtype: crate::Dtype,
    pub shape: Vec<u64>,
    pub ptr: usize,
    pub len: u64,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard")
            .field("path", &self.path)
            .field("file_len", &self.file_len)
            .field("tensors", &self.header.tensors.len())
            .finish()
    }
}

/// Opens `path` for reading without ever blocking, and refuses anything but a regular
/// file. `O_NONBLOCK` makes opening a FIFO (or a device) return at once instead of waiting
/// for a writer; it has no effect on reads of a regular file.
pub(crate) fn open_regular(path: &Path) -> Result<(File, std::fs::Metadata)> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::Unsupported {
            file: path.to_path_buf(),
            reason: "not a regular file".into(),
        });
    }
    // back to blocking reads for the regular file (some filesystems honour the flag)
    let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
    // SAFETY: `fd` is the open descriptor owned by `file`, alive for both calls;
    // F_GETFL / F_SETFL only read and set its status flags.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
    }
    Ok((file, meta))
}

impl Shard {
    /// Opens, validates and maps one shard. The header is read with `pread`, not through
    /// the map, so a file truncated between `stat` and parse yields an error, never a
    /// fault.
    pub fn open(path: &Path) -> Result<Shard> {
        let (file, meta) = open_regular(path)?;
        let file_len = meta.len();
        let mut prefix = [0u8; 8];
        let got = if file_len >= 8 {
            file.read_exact_at(&mut prefix, 0)
                .map_err(|e| Error::io(path, e))?;
            8
        } else {
            0
        };
        let n = header_len(path, &prefix[..got], file_len)?;
        let data_start = 8 + n;
        // The JSON is read into a per-thread buffer that is reused from shard to shard,
        // so its pages are faulted in once per thread, not once per shard.
        let header = HEADER_BUF.with_borrow_mut(|json| {
            json.clear();
            json.resize(n as usize, 0);
            file.read_exact_at(json, 8)
                .map_err(|e| Error::io(path, e))?;
            let header = parse_header(path, json, data_start, file_len - data_start);
            if json.capacity() > KEEP_BUF {
                *json = Vec::new();
            }
            header
        })?;
        // SAFETY: the map is private (MAP_PRIVATE, copy-on-write): writes through views
        // handed out to Python never reach the file. The file may still be modified or
        // truncated by another process while mapped; reads of a truncated region would
        // fault, which is why the core never reads tensor data through the map (it uses
        // pread) and why only explicit zero-copy views (`Checkpoint.get_tensor`) touch it.
        let map = unsafe { MmapOptions::new().len(file_len as usize).map_copy(&file) }
            .map_err(|e| Error::io(path, e))?;
        Ok(Shard {
            path: path.to_path_buf(),
            file_len,
            header,
            backing: Backing::File {
                file,
                map: MmapRaw::from(map),
            },
        })
    }

    /// A shard whose tensors are memory regions read in place (no file, no copy).
    /// Each tensor's `len` must be exactly its shape's bytes; names must be unique (the
    /// checkpoint checks). `keep` is held until [`Shard::release`] or drop.
    ///
    /// # Safety
    /// Every region `ptr..ptr + len` must stay valid for reads, and unchanged, until the
    /// shard is released or dropped (`keep` is meant to own that memory).
    pub unsafe fn from_memory(
        label: &str,
        tensors: Vec<MemTensor>,
        keep: Box<dyn std::any::Any + Send + Sync>,
        on_device: bool,
    ) -> Result<Shard> {
        let path = PathBuf::from(label);
        let mut entries = Vec::with_capacity(tensors.len());
        let mut regions = Vec::with_capacity(tensors.len());
        let bytes = tensors.iter().map(|t| t.name.len()).sum();
        let mut names = NameArena::with_capacity(bytes, tensors.len());
        let unnamed = Name::from("");
        let mut at = 0u64;
        for t in tensors {
            let numel = t.shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
            let want = numel.and_then(|n| n.checked_mul(t.dtype.size()));
            if want != Some(t.len) || (t.ptr == 0 && t.len > 0) {
                return Err(Error::shape(
                    &path,
                    &t.name,
                    None,
                    format!("{} bytes of {} for this shape", t.len, t.dtype),
                    t.shape.clone(),
                    t.shape,
                ));
            }
            let hash = crate::header::name_hash(&t.name);
            names.push(&t.name);
            entries.push(TensorEntry {
                name: unnamed.clone(),
                hash,
                dtype: t.dtype,
                shape: t.shape.into_iter().collect(),
                start: at,
                end: at + t.len,
            });
            regions.push((at, at + t.len, t.ptr));
            at += t.len;
        }
        for (e, name) in entries.iter_mut().zip(names.finish()) {
            e.name = name;
        }
        Ok(Shard {
            path,
            file_len: at,
            header: Header {
                tensors: entries,
                metadata: Vec::new(),
                data_start: 0,
                data_len: at,
            },
            backing: Backing::Memory {
                regions,
                keep: std::sync::RwLock::new(Some(keep)),
                on_device,
            },
        })
    }

    /// Drops what keeps a memory shard's regions alive; later reads fail (the names,
    /// dtypes and shapes stay, for plans built against them). No-op for a file.
    pub fn release(&self) {
        if let Backing::Memory { keep, .. } = &self.backing {
            keep.write().unwrap_or_else(|p| p.into_inner()).take();
        }
    }

    /// The address of the byte at virtual offset `offset` of a memory shard (`None`: a
    /// file, released, or outside every region). For device executors.
    pub fn address_at(&self, offset: u64) -> Option<usize> {
        let Backing::Memory { regions, keep, .. } = &self.backing else {
            return None;
        };
        keep.read().ok()?.as_ref()?;
        let k = regions.partition_point(|r| r.1 <= offset);
        let &(start, end, address) = regions.get(k)?;
        (start <= offset && offset < end).then(|| address + (offset - start) as usize)
    }

    /// Whether this shard's memory is on a device.
    pub fn on_device(&self) -> bool {
        matches!(
            self.backing,
            Backing::Memory {
                on_device: true,
                ..
            }
        )
    }

    /// Whether this shard reads memory regions rather than a file.
    pub fn is_memory(&self) -> bool {
        matches!(self.backing, Backing::Memory { .. })
    }

    /// Base address of the private mapping of the whole file (header included); null for
    /// a memory shard.
    pub fn map_ptr(&self) -> *mut u8 {
        match &self.backing {
            Backing::File { map, .. } => map.as_mut_ptr(),
            Backing::Memory { .. } => std::ptr::null_mut(),
        }
    }

    /// Length of the mapping (the file length at open time); 0 for a memory shard.
    pub fn map_len(&self) -> usize {
        match &self.backing {
            Backing::File { map, .. } => map.len(),
            Backing::Memory { .. } => 0,
        }
    }

    /// Absolute file offset of a tensor's first byte.
    pub fn abs_offset(&self, t: &TensorEntry) -> u64 {
        self.header.data_start + t.start
    }

    /// Reads `dst.len()` bytes at absolute file offset `offset` with `pread` (for a
    /// memory shard: copies them from the tensor's region; a read never spans tensors).
    pub fn read_at(&self, offset: u64, dst: &mut [u8]) -> Result<()> {
        let file = match &self.backing {
            Backing::File { file, .. } => file,
            Backing::Memory {
                on_device: true, ..
            } => {
                return Err(Error::InvalidArgument {
                    reason: format!(
                        "{}: the tensors are in device memory: only the device executor reads them",
                        self.path.display()
                    ),
                })
            }
            Backing::Memory { regions, keep, .. } => {
                return self.read_memory(regions, keep, offset, dst)
            }
        };
        file.read_exact_at(dst, offset).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Error::Io {
                    file: self.path.clone(),
                    tensor: None,
                    source: std::io::Error::new(
                        e.kind(),
                        format!(
                            "file ends before byte {} (was {} bytes when opened): truncated while in use?",
                            offset + dst.len() as u64,
                            self.file_len
                        ),
                    ),
                }
            } else {
                Error::io(&self.path, e)
            }
        })
    }

    fn read_memory(
        &self,
        regions: &[(u64, u64, usize)],
        keep: &std::sync::RwLock<Option<Box<dyn std::any::Any + Send + Sync>>>,
        offset: u64,
        dst: &mut [u8],
    ) -> Result<()> {
        let k = regions.partition_point(|r| r.1 <= offset);
        let end = offset + dst.len() as u64;
        let Some(&(start, _, address)) = regions.get(k).filter(|r| r.0 <= offset && end <= r.1)
        else {
            return Err(Error::Internal {
                reason: format!(
                    "{}: read of bytes {offset}..{end} outside any tensor",
                    self.path.display()
                ),
            });
        };
        // a read lock is held for the copy (readers share it), so `release` cannot free
        // the memory under it
        let alive = keep.read().unwrap_or_else(|p| p.into_inner());
        if alive.is_none() {
            return Err(Error::InvalidArgument {
                reason: format!(
                    "{}: the tensors were released (the update they came with has ended)",
                    self.path.display(),
                ),
            });
        }
        let src = address + (offset - start) as usize;
        // SAFETY: `src..src + dst.len()` lies inside region `k` (checked above: offset..end
        // within its start..end), which `from_memory`'s caller keeps valid and
        // unchanged while `keep` holds it (the read lock held here keeps it from release); the
        // region is the caller's memory and `dst` is ours, so they do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr(), dst.len()) };
        drop(alive);
        Ok(())
    }
}

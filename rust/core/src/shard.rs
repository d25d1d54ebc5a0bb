//! One safetensors file: its validated header and a private (copy-on-write) memory map.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use memmap2::{MmapOptions, MmapRaw};

use crate::error::{Error, Result};
use crate::header::{header_len, parse_header, Header, TensorEntry};

/// Largest header buffer kept per thread between shards (real headers are < 1 MB).
const KEEP_BUF: usize = 8 << 20;

thread_local! {
    static HEADER_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

pub struct Shard {
    pub path: PathBuf,
    pub file: File,
    pub file_len: u64,
    pub header: Header,
    map: MmapRaw,
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
            file,
            file_len,
            header,
            map: MmapRaw::from(map),
        })
    }

    /// Base address of the private mapping of the whole file (header included).
    pub fn map_ptr(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }

    /// Length of the mapping (the file length at open time).
    pub fn map_len(&self) -> usize {
        self.map.len()
    }

    /// Absolute file offset of a tensor's first byte.
    pub fn abs_offset(&self, t: &TensorEntry) -> u64 {
        self.header.data_start + t.start
    }

    /// Reads `dst.len()` bytes at absolute file offset `offset` with `pread`.
    pub fn read_at(&self, offset: u64, dst: &mut [u8]) -> Result<()> {
        self.file.read_exact_at(dst, offset).map_err(|e| {
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
}

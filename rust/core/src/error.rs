//! One error type for the whole core. Every variant names the file and, where one is
//! involved, the tensor; the Python bindings map each variant to one exception class of
//! the `kimi_loader.KimiLoaderError` hierarchy.

use std::fmt;
use std::path::{Path, PathBuf};

/// What exactly is wrong with a safetensors header (kept machine-readable so tests and
/// the Python side can tell the cases apart without parsing messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderProblem {
    /// The file is shorter than the 8-byte length prefix.
    TooSmall,
    /// The declared header length exceeds [`crate::header::MAX_HEADER_LEN`].
    TooLarge,
    /// The declared header length runs past the end of the file.
    PastEnd,
    /// The header bytes are not valid UTF-8.
    NotUtf8,
    /// The header is not valid JSON of the expected shape.
    Json,
    /// A key appears twice in one JSON object.
    DuplicateKey,
    /// A tensor entry names a dtype this library does not know.
    UnknownDtype,
    /// The shape's element count times the dtype size overflows 64 bits.
    Overflow,
    /// The shape's byte size differs from the byte range in `data_offsets`.
    ShapeBytesMismatch,
    /// `data_offsets` are reversed or point outside the data section.
    OutOfBounds,
    /// Two tensors share bytes.
    Overlap,
    /// Bytes of the data section are covered by no tensor (a gap or trailing bytes).
    Gap,
}

impl HeaderProblem {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TooSmall => "too_small",
            Self::TooLarge => "too_large",
            Self::PastEnd => "past_end",
            Self::NotUtf8 => "not_utf8",
            Self::Json => "json",
            Self::DuplicateKey => "duplicate_key",
            Self::UnknownDtype => "unknown_dtype",
            Self::Overflow => "overflow",
            Self::ShapeBytesMismatch => "shape_bytes_mismatch",
            Self::OutOfBounds => "out_of_bounds",
            Self::Overlap => "overlap",
            Self::Gap => "gap",
        }
    }
}

impl fmt::Display for HeaderProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What is inconsistent between an index file and its shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexProblem {
    /// The index file is not valid JSON of the expected shape.
    Json,
    /// The index names a shard file that does not exist (or is not a plain file name).
    MissingShard,
    /// The index maps a tensor to a shard that does not contain it.
    TensorNotInShard,
    /// A shard holds a tensor that the index does not list (or maps elsewhere).
    TensorNotInIndex,
    /// The same tensor name is stored in two shards.
    DuplicateTensor,
}

impl IndexProblem {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Json => "json",
            Self::MissingShard => "missing_shard",
            Self::TensorNotInShard => "tensor_not_in_shard",
            Self::TensorNotInIndex => "tensor_not_in_index",
            Self::DuplicateTensor => "duplicate_tensor",
        }
    }
}

/// The details of a shape mismatch (boxed: errors stay small on the happy path).
#[derive(Debug)]
pub struct Shapes {
    /// The destination parameter the tensor was going to, if any.
    pub destination: Option<String>,
    /// Which rule implied `expected` (e.g. "shard 1 of 2 stacked").
    pub detail: Option<String>,
    pub expected: Vec<u64>,
    pub found: Vec<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory given by the user (or named by an index) does not exist.
    #[error("{}: no such file or directory{}", .file.display(), fmt_hint(.looked_for))]
    NotFound {
        file: PathBuf,
        /// What was looked for there, when `file` is a directory.
        looked_for: Option<String>,
    },

    /// Any other I/O failure (permissions, a read that came up short, ...).
    #[error("{}: {source}{}", .file.display(), fmt_tensor(.tensor))]
    Io {
        file: PathBuf,
        tensor: Option<String>,
        #[source]
        source: std::io::Error,
    },

    /// The safetensors header of a shard is malformed.
    #[error("{}: invalid safetensors header ({problem}){}: {reason}", .file.display(), fmt_tensor(.tensor))]
    Header {
        file: PathBuf,
        tensor: Option<String>,
        problem: HeaderProblem,
        reason: String,
    },

    /// The index and the shards disagree.
    #[error("{}: index inconsistent with shards ({}){}: {reason}", .file.display(), .problem.as_str(), fmt_tensor(.tensor))]
    Index {
        file: PathBuf,
        tensor: Option<String>,
        problem: IndexProblem,
        reason: String,
    },

    /// A tensor that was asked for is not in the checkpoint.
    #[error("{}: tensor '{tensor}' not found{}", .file.display(), fmt_hint(.hint))]
    MissingTensor {
        file: PathBuf,
        tensor: String,
        hint: Option<String>,
    },

    /// A tensor's shape or size differs from what the destination expects. `tensor` is
    /// the checkpoint name alone; `destination` the parameter it was going to (if any);
    /// `detail` says which rule implied `expected`.
    #[error("{}: tensor '{tensor}'{}{}: {}",
            .file.display(), fmt_dest(&.shapes.destination), fmt_hint(&.shapes.detail),
            fmt_mismatch(.shapes))]
    ShapeMismatch {
        file: PathBuf,
        tensor: String,
        shapes: Box<Shapes>,
    },

    /// The checkpoint layout or format is not one this library supports.
    #[error("{}: unsupported: {reason}", .file.display())]
    Unsupported { file: PathBuf, reason: String },

    /// The copy plan is inconsistent: two checkpoint tensors write the same destination
    /// bytes (`kind` "overlap"), or an op writes past a destination's end ("past_end").
    #[error("{}: copy plan for '{destination}': {reason}{}", .file.display(), fmt_tensor(.tensor))]
    Plan {
        file: PathBuf,
        tensor: Option<String>,
        destination: String,
        kind: &'static str,
        reason: String,
    },

    /// A caller passed an argument that cannot be honoured.
    #[error("invalid argument: {reason}")]
    InvalidArgument { reason: String },

    /// A bug in this library (a panic caught at the boundary); the operation did not
    /// complete. Please report it.
    #[error("internal error (a bug in kimi_loader, please report it): {reason}")]
    Internal { reason: String },
}

fn fmt_tensor(t: &Option<String>) -> String {
    match t {
        Some(t) => format!(", tensor '{t}'"),
        None => String::new(),
    }
}

fn fmt_mismatch(s: &Shapes) -> String {
    if s.found == s.expected {
        // same shape: the detail says what differs (e.g. the dtype)
        format!("shape {:?} as expected", s.found)
    } else {
        format!(
            "shape mismatch: checkpoint has {:?}, expected {:?}",
            s.found, s.expected
        )
    }
}

fn fmt_dest(d: &Option<String>) -> String {
    match d {
        Some(d) => format!(" -> '{d}'"),
        None => String::new(),
    }
}

fn fmt_hint(h: &Option<String>) -> String {
    match h {
        Some(h) => format!(" ({h})"),
        None => String::new(),
    }
}

impl Error {
    /// Wraps an I/O error for `file`; a missing file becomes [`Error::NotFound`].
    pub fn io(file: &Path, source: std::io::Error) -> Self {
        if source.kind() == std::io::ErrorKind::NotFound {
            Error::NotFound {
                file: file.to_path_buf(),
                looked_for: None,
            }
        } else {
            Error::Io {
                file: file.to_path_buf(),
                tensor: None,
                source,
            }
        }
    }

    pub fn header(
        file: &Path,
        tensor: Option<&str>,
        problem: HeaderProblem,
        reason: impl Into<String>,
    ) -> Self {
        Error::Header {
            file: file.to_path_buf(),
            tensor: tensor.map(str::to_owned),
            problem,
            reason: reason.into(),
        }
    }

    /// A shape mismatch of checkpoint tensor `tensor` (the name alone).
    pub fn shape(
        file: &Path,
        tensor: &str,
        destination: Option<&str>,
        detail: impl Into<String>,
        expected: Vec<u64>,
        found: Vec<u64>,
    ) -> Self {
        let detail: String = detail.into();
        Error::ShapeMismatch {
            file: file.to_path_buf(),
            tensor: tensor.to_owned(),
            shapes: Box::new(Shapes {
                destination: destination.map(str::to_owned),
                detail: (!detail.is_empty()).then_some(detail),
                expected,
                found,
            }),
        }
    }

    pub fn index(
        file: &Path,
        tensor: Option<&str>,
        problem: IndexProblem,
        reason: impl Into<String>,
    ) -> Self {
        Error::Index {
            file: file.to_path_buf(),
            tensor: tensor.map(str::to_owned),
            problem,
            reason: reason.into(),
        }
    }

    /// The file this error is about, if any.
    pub fn file(&self) -> Option<&Path> {
        match self {
            Error::NotFound { file, .. }
            | Error::Io { file, .. }
            | Error::Header { file, .. }
            | Error::Index { file, .. }
            | Error::MissingTensor { file, .. }
            | Error::ShapeMismatch { file, .. }
            | Error::Plan { file, .. }
            | Error::Unsupported { file, .. } => Some(file),
            Error::InvalidArgument { .. } | Error::Internal { .. } => None,
        }
    }

    /// The tensor this error is about, if any.
    pub fn tensor(&self) -> Option<&str> {
        match self {
            Error::Io { tensor, .. }
            | Error::Header { tensor, .. }
            | Error::Plan { tensor, .. }
            | Error::Index { tensor, .. } => tensor.as_deref(),
            Error::MissingTensor { tensor, .. } | Error::ShapeMismatch { tensor, .. } => {
                Some(tensor)
            }
            _ => None,
        }
    }

    /// The destination parameter this error is about, if any.
    pub fn destination(&self) -> Option<&str> {
        match self {
            Error::ShapeMismatch { shapes, .. } => shapes.destination.as_deref(),
            Error::Plan { destination, .. } => Some(destination),
            _ => None,
        }
    }

    /// `(expected, found)` shapes of a shape mismatch.
    pub fn shapes(&self) -> Option<(&[u64], &[u64])> {
        match self {
            Error::ShapeMismatch { shapes, .. } => Some((&shapes.expected, &shapes.found)),
            _ => None,
        }
    }

    /// A short machine-readable sub-kind (the header or index problem), if any.
    pub fn kind(&self) -> Option<&'static str> {
        match self {
            Error::Header { problem, .. } => Some(problem.as_str()),
            Error::Index { problem, .. } => Some(problem.as_str()),
            Error::Plan { kind, .. } => Some(kind),
            _ => None,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

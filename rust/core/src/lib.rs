//! kimi_loader core: pure Rust, no Python.
//!
//! Table of contents (reader -> plan -> executor):
//! - [`error`]: the one error type, naming files and tensors.
//! - [`dtype`]: safetensors dtypes and sizes.
//! - [`json`]: a strict, allocation-light JSON scanner for headers and indexes.
//! - [`header`]: parse and validate one safetensors header.
//! - [`shard`]: one mapped, validated shard file.
//! - [`index`]: the `model.safetensors.index.json` file.
//! - [`checkpoint`]: all shards of a checkpoint, opened in parallel, cross-checked.
//! - [`census`]: what a checkpoint holds, counted in one pass (for `inspect`).
//! - [`mapping`]: checkpoint name -> destination name rules (data, linear time).
//! - [`plan`]: the copy plan, with its proof that every destination byte is written once.
//! - [`quant`]: the quantized formats (one registry: tensors, scales, dequant op).
//! - [`convert`]: dtype conversions and bit-exact dequantizers.
//! - [`exec`]: parallel reads and plan execution into destination memory.
//! - [`update`]: change selection for hot-reload (hash, compare, pick ops).
//! - [`threads`]: thread pool sizing (`KIMI_LOADER_THREADS`).

pub mod census;
pub mod checkpoint;
pub mod convert;
pub mod dtype;
pub mod error;
pub mod exec;
pub mod header;
pub mod index;
pub mod json;
pub mod mapping;
pub mod plan;
pub mod quant;
pub mod quantize;
pub mod shard;
pub mod threads;
pub mod update;

pub use checkpoint::{Checkpoint, TensorId};
pub use dtype::Dtype;
pub use error::{Error, HeaderProblem, IndexProblem, Result};
pub use header::{Header, TensorEntry, MAX_HEADER_LEN};
pub use shard::Shard;

//! Times the phases of opening a checkpoint: `cargo run --release --example open_phases -- DIR`.
use std::path::{Path, PathBuf};
use std::time::Instant;

use kimi_loader_core::{index, Checkpoint, Shard};

fn main() {
    let dir = PathBuf::from(std::env::args().nth(1).expect("usage: open_phases DIR"));
    let t = Instant::now();
    let text = std::fs::read_to_string(dir.join(index::INDEX_FILE)).unwrap();
    let read = t.elapsed();
    let t = Instant::now();
    let ix = index::parse_index(Path::new("index"), &text).unwrap();
    let parse = t.elapsed();
    let t = Instant::now();
    let shards: Vec<Shard> = ix
        .files
        .iter()
        .map(|f| Shard::open(&dir.join(f)).unwrap())
        .collect();
    let shards_1t = t.elapsed();
    let n: usize = shards.iter().map(|s| s.header.tensors.len()).sum();
    let t = Instant::now();
    let c = Checkpoint::open(std::slice::from_ref(&dir), None).unwrap();
    let full = t.elapsed();
    println!(
        "index read {read:?} parse {parse:?} ({} entries); {} shards 1 thread {shards_1t:?} ({n} tensors); full open {full:?} ({})",
        ix.entries.len(),
        shards.len(),
        c.len()
    );
}

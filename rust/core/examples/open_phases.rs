//! Times the phases of opening a checkpoint: `cargo run --release --example open_phases -- DIR`.
use std::path::{Path, PathBuf};
use std::time::Instant;

use kimi_loader_core::{index, threads, Checkpoint};

fn main() {
    let dir = PathBuf::from(std::env::args().nth(1).expect("usage: open_phases DIR"));
    let text = std::fs::read_to_string(dir.join(index::INDEX_FILE)).unwrap();
    let pool = threads::pool(None).unwrap();
    for _ in 0..3 {
        let t = Instant::now();
        let _ = std::str::from_utf8(text.as_bytes()).unwrap();
        let utf8 = t.elapsed();
        let t = Instant::now();
        let seq = index::parse_index(Path::new("index"), &text, None).unwrap();
        let seq_t = t.elapsed();
        let t = Instant::now();
        let par = index::parse_index(Path::new("index"), &text, Some(&pool)).unwrap();
        let par_t = t.elapsed();
        assert_eq!(seq.entries.len(), par.entries.len());
        let t = Instant::now();
        let c = Checkpoint::open(std::slice::from_ref(&dir), None).unwrap();
        let full = t.elapsed();
        let timings = c.timings;
        let t = Instant::now();
        drop(c);
        let dropped = t.elapsed();
        println!(
            "utf8 {utf8:?}; index sequential {seq_t:?} parallel {par_t:?} ({} entries); open {full:?} {timings:?}; drop {dropped:?}",
            seq.entries.len(),
        );
    }
}

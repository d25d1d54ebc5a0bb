//! Throughput of the row dequantizers on warm buffers (no I/O, no faults), next to a
//! memcpy of the same output bytes (the ceiling):
//! `cargo run --release -p kimi-loader-core --example dequant_speed`.
use std::time::Instant;

use kimi_loader_core::convert::{dequant_int4_row, dequant_mxfp4_row};
use kimi_loader_core::dtype::Dtype;

fn main() {
    let (rows, cols, group) = (2048usize, 1024usize, 32usize);
    let packed: Vec<u8> = (0..rows * cols / 2)
        .map(|i| (i.wrapping_mul(2654435761) >> 7) as u8)
        .collect();
    let scales: Vec<u8> = (0..rows * cols / group)
        .flat_map(|i| (0x3c00u16 + (i % 97) as u16).to_le_bytes())
        .collect();
    let e8: Vec<u8> = (0..rows * cols / group)
        .map(|i| 120 + (i % 9) as u8)
        .collect();
    for (name, to) in [("bf16", Dtype::BF16), ("f32", Dtype::F32)] {
        let mut out = vec![0u8; rows * cols * to.size() as usize];
        let same = vec![1u8; out.len()];
        let mut copy = f64::MAX;
        for _ in 0..7 {
            let t = Instant::now();
            out.copy_from_slice(std::hint::black_box(&same));
            copy = copy.min(t.elapsed().as_secs_f64());
        }
        println!(
            "memcpy -> {name:4}: {:6.2} GB/s",
            out.len() as f64 / copy / 1e9
        );
        let ob = cols * to.size() as usize;
        let sb = cols / group * 2;
        for fmt in ["int4", "mxfp4"] {
            let mut best = f64::MAX;
            for _ in 0..7 {
                let t = Instant::now();
                for r in 0..rows {
                    let o = &mut out[r * ob..(r + 1) * ob];
                    let p = &packed[r * cols / 2..(r + 1) * cols / 2];
                    if fmt == "int4" {
                        dequant_int4_row(
                            p,
                            &scales[r * sb..(r + 1) * sb],
                            Dtype::BF16,
                            group,
                            cols,
                            o,
                            to,
                        );
                    } else {
                        dequant_mxfp4_row(
                            p,
                            &e8[r * cols / group..(r + 1) * cols / group],
                            group,
                            cols,
                            o,
                            to,
                        );
                    }
                }
                best = best.min(t.elapsed().as_secs_f64());
            }
            println!(
                "{fmt:6} -> {name:4}: {:6.2} GB/s of output ({:.2}x of memcpy)",
                out.len() as f64 / best / 1e9,
                copy / best
            );
        }
    }
}

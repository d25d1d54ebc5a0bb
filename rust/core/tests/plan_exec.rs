//! Planner and executor tests on small checkpoints written here (no Python): every op
//! kind (copy, convert, int4 / FP8 / MXFP4 dequantization), stacked and expert
//! destinations, TP / EP / MoE-TP slices, overlaps and gaps, and a property test that a
//! plan's ops tile each destination exactly and the executor reproduces a plain
//! reference.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use half::bf16;
use kimi_loader_core::exec::{execute_plan, DestBuf, ReadOptions};
use kimi_loader_core::mapping::{ExpertRule, Rules, StackedRule, TpSplit};
use kimi_loader_core::plan::{build_plan, DestSpec, Plan, PlanOptions};
use kimi_loader_core::{threads, Checkpoint, Dtype, Error};
use proptest::prelude::*;

/// `(name, dtype, shape, bytes)`
type T = (String, &'static str, Vec<u64>, Vec<u8>);

fn tensor(name: &str, dtype: &'static str, shape: &[u64], bytes: Vec<u8>) -> T {
    (name.to_string(), dtype, shape.to_vec(), bytes)
}

fn bf16_tensor(name: &str, shape: &[u64], seed: u32) -> T {
    let n: u64 = shape.iter().product();
    let bytes = (0..n)
        .flat_map(|i| {
            bf16::from_f32(((i as u32).wrapping_mul(7).wrapping_add(seed) % 97) as f32 - 48.0)
                .to_le_bytes()
        })
        .collect();
    tensor(name, "BF16", shape, bytes)
}

fn write_checkpoint(tag: &str, tensors: &[T]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kimi-plan-test-{}-{tag}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let mut header = serde_json::Map::new();
    let mut off = 0usize;
    for (name, dtype, shape, data) in tensors {
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [off, off + data.len()]}),
        );
        off += data.len();
    }
    let text = serde_json::to_string(&header).unwrap();
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    for t in tensors {
        out.extend_from_slice(&t.3);
    }
    fs::write(dir.join("model.safetensors"), out).unwrap();
    dir
}

fn open(dir: &Path) -> Checkpoint {
    Checkpoint::open(&[dir.to_path_buf()], Some(2)).unwrap()
}

fn dest(name: &str, shape: &[u64], dtype: Dtype) -> DestSpec {
    DestSpec {
        name: name.into(),
        shape: shape.to_vec(),
        dtype,
    }
}

fn plan(ck: &Checkpoint, rules: &Rules, dests: Vec<DestSpec>) -> Result<Plan, Error> {
    let pool = threads::pool(Some(2)).unwrap();
    build_plan(ck, rules, dests, PlanOptions::default(), &pool)
}

/// One buffer per destination of `plan`, filled with a marker byte.
fn fresh(plan: &Plan) -> Vec<Vec<u8>> {
    plan.dests
        .iter()
        .map(|d| vec![0xAB; d.nbytes() as usize])
        .collect()
}

/// The executor's view of `out` (each buffer stays where it is while the views are used).
fn dest_bufs(out: &mut [Vec<u8>]) -> Vec<Option<DestBuf>> {
    out.iter_mut()
        .map(|b| {
            Some(DestBuf {
                ptr: b.as_mut_ptr(),
                len: b.len() as u64,
            })
        })
        .collect()
}

/// Executes every op of `plan`; returns each destination's bytes.
fn run(ck: &Checkpoint, plan: &Plan) -> Vec<Vec<u8>> {
    let mut out = fresh(plan);
    let bufs = dest_bufs(&mut out);
    let pool = threads::pool(Some(2)).unwrap();
    // SAFETY: every buffer is a live Vec of exactly its destination's size, disjoint from
    // the others, untouched until execute_plan returns.
    unsafe {
        execute_plan(
            ck,
            plan,
            0..plan.ops.len(),
            &bufs,
            &pool,
            ReadOptions::default(),
        )
    }
    .unwrap();
    out
}

fn bytes_of(ck: &Checkpoint, name: &str) -> Vec<u8> {
    let (id, e) = ck.get(name).unwrap();
    let mut v = vec![0u8; e.nbytes() as usize];
    ck.shard(id)
        .read_at(ck.shard(id).abs_offset(e), &mut v)
        .unwrap();
    v
}

/// Rows `[r0, r1)` and columns `[c0, c1)` of a row-major `[rows, cols]` matrix of
/// `elem`-byte elements.
fn slice2d(
    b: &[u8],
    cols: usize,
    elem: usize,
    (r0, r1): (usize, usize),
    (c0, c1): (usize, usize),
) -> Vec<u8> {
    (r0..r1)
        .flat_map(|r| b[(r * cols + c0) * elem..(r * cols + c1) * elem].to_vec())
        .collect()
}

#[test]
fn plain_copy_and_convert() {
    let dir = write_checkpoint(
        "copy",
        &[
            bf16_tensor("a.weight", &[4, 6], 1),
            bf16_tensor("b.weight", &[5], 2),
        ],
    );
    let ck = open(&dir);
    let p = plan(
        &ck,
        &Rules::default(),
        vec![
            dest("a.weight", &[4, 6], Dtype::BF16),
            dest("b.weight", &[5], Dtype::F32),
        ],
    )
    .unwrap();
    assert!(p.missing.is_empty() && p.unused.is_empty());
    let out = run(&ck, &p);
    assert_eq!(out[0], bytes_of(&ck, "a.weight"));
    let want: Vec<u8> = bytes_of(&ck, "b.weight")
        .chunks(2)
        .flat_map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32().to_le_bytes())
        .collect();
    assert_eq!(out[1], want);
}

fn stacked_rules() -> Rules {
    Rules {
        stacked: vec![
            StackedRule {
                param: "gate_up_proj".into(),
                ckpt: "gate_proj".into(),
                order: 0,
            },
            StackedRule {
                param: "gate_up_proj".into(),
                ckpt: "up_proj".into(),
                order: 1,
            },
        ],
        tp_rules: vec![
            ("gate_up_proj.".into(), TpSplit::Column),
            ("down_proj.".into(), TpSplit::Row),
        ],
        ..Rules::default()
    }
}

#[test]
fn stacked_pieces_land_at_their_shard_offset_and_tp_slices() {
    let dir = write_checkpoint(
        "stacked",
        &[
            bf16_tensor("mlp.up_proj.weight", &[8, 4], 3),
            bf16_tensor("mlp.gate_proj.weight", &[8, 4], 4),
            bf16_tensor("mlp.down_proj.weight", &[4, 8], 5),
        ],
    );
    let ck = open(&dir);
    for (tp, rank) in [(1u32, 0u32), (2, 0), (2, 1), (4, 3)] {
        let rules = Rules {
            tp_size: tp,
            tp_rank: rank,
            ..stacked_rules()
        };
        let t = tp as u64;
        let p = plan(
            &ck,
            &rules,
            vec![
                dest("mlp.gate_up_proj.weight", &[16 / t, 4], Dtype::BF16),
                dest("mlp.down_proj.weight", &[4, 8 / t], Dtype::BF16),
            ],
        )
        .unwrap();
        assert!(p.missing.is_empty(), "{:?}", p.missing);
        let out = run(&ck, &p);
        let (n, r) = (8 / tp as usize, rank as usize);
        let mut want = slice2d(
            &bytes_of(&ck, "mlp.gate_proj.weight"),
            4,
            2,
            (r * n, r * n + n),
            (0, 4),
        );
        want.extend(slice2d(
            &bytes_of(&ck, "mlp.up_proj.weight"),
            4,
            2,
            (r * n, r * n + n),
            (0, 4),
        ));
        assert_eq!(
            out[0], want,
            "gate rows first, then up (tp {tp} rank {rank})"
        );
        assert_eq!(
            out[1],
            slice2d(
                &bytes_of(&ck, "mlp.down_proj.weight"),
                8,
                2,
                (0, 4),
                (r * n, r * n + n)
            )
        );
    }
}

#[test]
fn a_stacked_piece_of_the_wrong_height_names_tensor_and_destination() {
    let dir = write_checkpoint(
        "stacked-bad",
        &[
            bf16_tensor("mlp.up_proj.weight", &[12, 4], 3),
            bf16_tensor("mlp.gate_proj.weight", &[4, 4], 4),
        ],
    );
    let ck = open(&dir);
    let err = plan(
        &ck,
        &stacked_rules(),
        vec![dest("mlp.gate_up_proj.weight", &[16, 4], Dtype::BF16)],
    )
    .unwrap_err();
    match &err {
        Error::ShapeMismatch { tensor, shapes, .. } => {
            assert!(
                tensor == "mlp.gate_proj.weight" || tensor == "mlp.up_proj.weight",
                "{err}"
            );
            assert_eq!(
                shapes.destination.as_deref(),
                Some("mlp.gate_up_proj.weight")
            );
            assert_eq!(shapes.expected, vec![8, 4]);
        }
        other => panic!("{other}"),
    }
}

fn expert_rules(num: u32) -> Rules {
    let mut experts = HashMap::new();
    for e in 0..num {
        for (proj, prefix, order, split) in [
            ("gate_proj", "experts.w13_", 0, TpSplit::Column),
            ("up_proj", "experts.w13_", 1, TpSplit::Column),
            ("down_proj", "experts.w2_", 0, TpSplit::Row),
        ] {
            experts.insert(
                format!("experts.{e}.{proj}."),
                ExpertRule {
                    param_prefix: prefix.into(),
                    expert: e,
                    order,
                    split,
                },
            );
        }
    }
    Rules {
        experts,
        num_experts: Some(num),
        ..Rules::default()
    }
}

fn expert_checkpoint(tag: &str, e: u32, inter: u64, h: u64) -> PathBuf {
    let mut ts = vec![];
    for x in 0..e {
        ts.push(bf16_tensor(
            &format!("mlp.experts.{x}.gate_proj.weight"),
            &[inter, h],
            10 + x,
        ));
        ts.push(bf16_tensor(
            &format!("mlp.experts.{x}.up_proj.weight"),
            &[inter, h],
            40 + x,
        ));
        ts.push(bf16_tensor(
            &format!("mlp.experts.{x}.down_proj.weight"),
            &[h, inter],
            70 + x,
        ));
    }
    write_checkpoint(tag, &ts)
}

/// The plain reference for expert parameters on one rank.
fn expert_reference(
    ck: &Checkpoint,
    lo: u32,
    hi: u32,
    inter: usize,
    h: usize,
    mt: usize,
    mr: usize,
) -> [Vec<u8>; 2] {
    let n = inter / mt;
    let (mut w13, mut w2) = (vec![], vec![]);
    for x in lo..hi {
        for proj in ["gate_proj", "up_proj"] {
            let b = bytes_of(ck, &format!("mlp.experts.{x}.{proj}.weight"));
            w13.extend(slice2d(&b, h, 2, (mr * n, mr * n + n), (0, h)));
        }
        let b = bytes_of(ck, &format!("mlp.experts.{x}.down_proj.weight"));
        w2.extend(slice2d(&b, inter, 2, (0, h), (mr * n, mr * n + n)));
    }
    [w13, w2]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Any EP / MoE-TP split of any expert count: the plan tiles every destination
    /// exactly once, the other ranks' experts are counted, and the bytes equal the
    /// plain reference.
    #[test]
    fn expert_plans_tile_and_match_the_reference(
        ep_pow in 0u32..3, mt_pow in 0u32..3, per_rank in 1u32..3, rank_seed in 0u32..64,
    ) {
        let (ep, mt) = (1u32 << ep_pow, 1u32 << mt_pow);
        let e = ep * per_rank;
        let (inter, h) = (8u64, 4u64);
        let dir = expert_checkpoint(&format!("prop-{ep}-{mt}-{per_rank}-{rank_seed}"), e, inter, h);
        let ck = open(&dir);
        let (er, mr) = (rank_seed % ep, (rank_seed / ep) % mt);
        let rules = Rules { ep_size: ep, ep_rank: er, moe_tp_size: mt, moe_tp_rank: mr, ..expert_rules(e) };
        let local = (e / ep) as u64;
        let n = inter / mt as u64;
        let p = plan(&ck, &rules, vec![
            dest("mlp.experts.w13_weight", &[local, 2 * n, h], Dtype::BF16),
            dest("mlp.experts.w2_weight", &[local, h, n], Dtype::BF16),
        ]).unwrap();
        prop_assert!(p.missing.is_empty() && p.unused.is_empty());
        prop_assert_eq!(p.other_rank as u32, 3 * (e - e / ep));
        let mut covered = vec![0u64; 2];
        for op in &p.ops {
            covered[op.dest as usize] += op.out_elems() * 2;
        }
        prop_assert_eq!(covered, vec![p.dests[0].nbytes(), p.dests[1].nbytes()]);
        let out = run(&ck, &p);
        let (lo, hi) = (er * e / ep, (er + 1) * e / ep);
        let want = expert_reference(&ck, lo, hi, inter as usize, h as usize, mt as usize, mr as usize);
        prop_assert_eq!(&out[0], &want[0]);
        prop_assert_eq!(&out[1], &want[1]);
        let _ = fs::remove_dir_all(&dir);
    }
}

#[test]
fn two_tensors_on_the_same_bytes_is_a_plan_error_and_gaps_are_missing() {
    let dir = write_checkpoint(
        "overlap",
        &[
            bf16_tensor("x.weight", &[4], 1),
            bf16_tensor("y.weight", &[4], 2),
        ],
    );
    let ck = open(&dir);
    let mut renames = HashMap::new();
    renames.insert("y.weight".to_string(), Some("x.weight".to_string()));
    let rules = Rules {
        renames,
        ..Rules::default()
    };
    match plan(&ck, &rules, vec![dest("x.weight", &[4], Dtype::BF16)]) {
        Err(Error::Plan {
            kind, destination, ..
        }) => assert_eq!((kind, destination.as_str()), ("overlap", "x.weight")),
        other => panic!("{other:?}"),
    }
    // a destination no tensor writes is reported missing (not an error: strictness is the caller's)
    let p = plan(
        &ck,
        &Rules::default(),
        vec![
            dest("x.weight", &[4], Dtype::BF16),
            dest("y.weight", &[4], Dtype::BF16),
            dest("z.weight", &[3], Dtype::BF16),
        ],
    )
    .unwrap();
    assert_eq!(p.missing.len(), 1);
    assert_eq!(
        (
            p.missing[0].dest.as_str(),
            p.missing[0].start,
            p.missing[0].end
        ),
        ("z.weight", 0, 6)
    );
}

/// compressed-tensors' packing: value q in [-8, 7] stored as q + 8, 8 per int32, LSB first.
fn pack_int4(q: &[i32]) -> Vec<u8> {
    q.chunks(8)
        .flat_map(|c| {
            let w = c
                .iter()
                .enumerate()
                .fold(0u32, |w, (j, &v)| w | (((v + 8) as u32) << (4 * j)));
            w.to_le_bytes()
        })
        .collect()
}

#[test]
fn dequantizing_ops_match_their_formulas() {
    let (rows, cols, group) = (2usize, 64usize, 32usize);
    let q: Vec<i32> = (0..rows * cols).map(|i| (i % 16) as i32 - 8).collect();
    let scales: Vec<f32> = (0..rows * cols / group).map(|i| 0.5 + i as f32).collect();
    let scale_bytes: Vec<u8> = scales
        .iter()
        .flat_map(|s| bf16::from_f32(*s).to_le_bytes())
        .collect();
    // FP8 e4m3: 0x38 = 1.0, 0x40 = 2.0, 0xC0 = -2.0 (bias 7)
    let fp8: Vec<u8> = (0..rows * cols)
        .map(|i| [0x38u8, 0x40, 0xC0][i % 3])
        .collect();
    let inv: Vec<u8> = [3.0f32].iter().flat_map(|v| v.to_le_bytes()).collect();
    // MXFP4: byte = low nibble (even element) | high nibble << 4; E2M1 code 2 = 1.0, 11 = -1.5
    let mx: Vec<u8> = vec![0x2 | (0xB << 4); rows * cols / 2];
    let mx_scale: Vec<u8> = vec![128u8; rows * cols / group]; // 2^(128-127) = 2
    let dir = write_checkpoint(
        "dequant",
        &[
            tensor(
                "i.weight_packed",
                "I32",
                &[rows as u64, (cols / 8) as u64],
                pack_int4(&q),
            ),
            tensor(
                "i.weight_scale",
                "BF16",
                &[rows as u64, (cols / group) as u64],
                scale_bytes,
            ),
            tensor(
                "i.weight_shape",
                "I64",
                &[2],
                [rows as i64, cols as i64]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            tensor("f.weight", "F8_E4M3", &[rows as u64, cols as u64], fp8),
            tensor("f.weight_scale_inv", "F32", &[1, 1], inv),
            tensor("m.weight", "U8", &[rows as u64, (cols / 2) as u64], mx),
            tensor(
                "m.weight_scale",
                "U8",
                &[rows as u64, (cols / group) as u64],
                mx_scale,
            ),
        ],
    );
    let ck = open(&dir);
    let shape = [rows as u64, cols as u64];
    let p = plan(
        &ck,
        &Rules::default(),
        vec![
            dest("i.weight", &shape, Dtype::F32),
            dest("f.weight", &shape, Dtype::F32),
            dest("m.weight", &shape, Dtype::F32),
        ],
    )
    .unwrap();
    assert!(
        p.missing.is_empty() && p.unused.is_empty(),
        "{:?} {:?}",
        p.missing,
        p.unused
    );
    let out = run(&ck, &p);
    let f32s = |b: &Vec<u8>| {
        b.chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect::<Vec<_>>()
    };
    let want_int4: Vec<f32> = (0..rows * cols)
        .map(|i| {
            q[i] as f32
                * bf16::from_f32(scales[(i / cols) * (cols / group) + (i % cols) / group]).to_f32()
        })
        .collect();
    assert_eq!(f32s(&out[0]), want_int4);
    let want_fp8: Vec<f32> = (0..rows * cols)
        .map(|i| [1.0f32, 2.0, -2.0][i % 3] * 3.0)
        .collect();
    assert_eq!(f32s(&out[1]), want_fp8);
    let want_mx: Vec<f32> = (0..rows * cols)
        .map(|i| if i % 2 == 0 { 2.0 } else { -3.0 })
        .collect();
    assert_eq!(f32s(&out[2]), want_mx);
}

#[test]
fn atomic_execution_is_all_or_nothing() {
    use kimi_loader_core::exec::execute_atomic;

    let dir = write_checkpoint(
        "atomic",
        &[
            bf16_tensor("a.weight", &[64, 64], 1),
            bf16_tensor("b.weight", &[64, 64], 2),
        ],
    );
    let ck = open(&dir);
    let p = plan(
        &ck,
        &Rules::default(),
        vec![
            dest("a.weight", &[64, 64], Dtype::BF16),
            dest("b.weight", &[64, 64], Dtype::BF16),
        ],
    )
    .unwrap();
    let pool = threads::pool(Some(2)).unwrap();
    // success: the same bytes as a direct execution, through a caller's arena
    let mut out = fresh(&p);
    let bufs = dest_bufs(&mut out);
    let mut arena = vec![0u8; 1 << 16];
    let a = Some(DestBuf {
        ptr: arena.as_mut_ptr(),
        len: arena.len() as u64,
    });
    let which: Vec<usize> = (0..p.ops.len()).collect();
    // SAFETY: `out` and `arena` are live, disjoint Vecs of the sizes given, untouched
    // until the call returns.
    unsafe { execute_atomic(&ck, &p, &which, &bufs, a, &pool) }.unwrap();
    assert_eq!(out, run(&ck, &p));

    // a shard truncated after planning: the read of `b` fails, and `a` is not written either
    let file = dir.join("model.safetensors");
    let len = fs::metadata(&file).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    let mut out = fresh(&p);
    let bufs = dest_bufs(&mut out);
    // SAFETY: as above, without an arena.
    let err = unsafe { execute_atomic(&ck, &p, &which, &bufs, None, &pool) }.unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
    assert!(
        out.iter().all(|b| b.iter().all(|&x| x == 0xAB)),
        "a destination was written"
    );
}

#[test]
fn memory_checkpoints_read_in_place_until_released() {
    use kimi_loader_core::shard::MemTensor;
    use kimi_loader_core::{Checkpoint, Dtype};

    let a: Vec<u8> = (0..64u8).collect();
    let b: Vec<u8> = (100..132u8).collect();
    let t = |name: &str, v: &Vec<u8>, shape: Vec<u64>| MemTensor {
        name: name.into(),
        dtype: Dtype::BF16,
        shape,
        ptr: v.as_ptr() as usize,
        len: v.len() as u64,
    };
    // SAFETY: `a` and `b` outlive the checkpoint and are not modified.
    let ck = unsafe {
        Checkpoint::from_memory(
            "<mem>",
            vec![t("a", &a, vec![4, 8]), t("b", &b, vec![16])],
            Box::new(()),
            false,
        )
    }
    .unwrap();
    let (id, e) = ck.get("b").unwrap();
    let mut out = vec![0u8; 8];
    ck.shard(id)
        .read_at(ck.shard(id).abs_offset(e) + 4, &mut out)
        .unwrap();
    assert_eq!(out, b[4..12]);
    // a read past the tensor is refused, not served from the neighbour
    let (ida, ea) = ck.get("a").unwrap();
    let mut big = vec![0u8; 65];
    assert!(ck
        .shard(ida)
        .read_at(ck.shard(ida).abs_offset(ea), &mut big)
        .is_err());
    ck.release();
    let err = ck.shard(id).read_at(0, &mut out).unwrap_err().to_string();
    assert!(err.contains("released"), "{err}");
    // a wrong byte count, and a name given twice, are errors naming the tensor
    let bad = unsafe {
        Checkpoint::from_memory("<mem>", vec![t("a", &a, vec![4, 9])], Box::new(()), false)
    };
    assert!(bad.unwrap_err().to_string().contains("'a'"));
    let twice = unsafe {
        Checkpoint::from_memory(
            "<mem>",
            vec![t("a", &a, vec![32]), t("a", &b, vec![16])],
            Box::new(()),
            false,
        )
    };
    assert!(twice.unwrap_err().to_string().contains("'a' given twice"));
}

#[test]
fn an_unfused_tensor_feeds_its_parts_with_rope_rows_reordered() {
    // wqkv [3 * 6, 5]: 3 heads of 2 pairs per part; q and k reordered, v as stored
    let (heads, head, cols) = (3u64, 4u64, 5u64);
    let d = heads * head;
    let ck = open(&write_checkpoint(
        "unfuse",
        &[
            bf16_tensor("blk.wqkv.weight", &[3 * d, cols], 3),
            bf16_tensor("blk.wqkv.bias", &[3 * d], 5),
        ],
    ));
    let rules = Rules {
        unfused: vec![kimi_loader_core::mapping::UnfuseRule {
            fragment: ".wqkv.".into(),
            parts: vec![
                (".q_proj.".into(), heads as u32),
                (".k_proj.".into(), heads as u32),
                (".v_proj.".into(), 0),
            ],
        }],
        ..Rules::default()
    };
    let mut dests = vec![];
    for p in ["q", "k", "v"] {
        dests.push(dest(
            &format!("blk.{p}_proj.weight"),
            &[d, cols],
            Dtype::BF16,
        ));
        dests.push(dest(&format!("blk.{p}_proj.bias"), &[d], Dtype::F32));
    }
    let plan = plan(&ck, &rules, dests).unwrap();
    assert!(plan.missing.is_empty() && plan.unused.is_empty());
    assert_eq!(plan.used, 2, "each fused tensor counts once");
    let out = run(&ck, &plan);
    let w = bytes_of(&ck, "blk.wqkv.weight");
    let b = bytes_of(&ck, "blk.wqkv.bias");
    // destination row r of part k: interleaved pairs -> halves within each head
    let src_row = |k: u64, r: u64| -> u64 {
        let (h, i) = (r / head, r % head);
        let within = if k == 2 {
            i
        } else if i < head / 2 {
            2 * i
        } else {
            2 * (i - head / 2) + 1
        };
        k * d + h * head + within
    };
    for k in 0..3u64 {
        let rows: Vec<u8> = (0..d)
            .flat_map(|r| {
                let s = src_row(k, r) as usize;
                slice2d(&w, cols as usize, 2, (s, s + 1), (0, cols as usize))
            })
            .collect();
        assert_eq!(out[2 * k as usize], rows, "weight part {k}");
        let bias: Vec<u8> = (0..d)
            .flat_map(|r| {
                let s = src_row(k, r) as usize;
                let v = bf16::from_le_bytes([b[2 * s], b[2 * s + 1]]).to_f32();
                v.to_le_bytes()
            })
            .collect();
        assert_eq!(
            out[2 * k as usize + 1],
            bias,
            "bias part {k} (converted to f32)"
        );
    }
    // a head count that does not divide the part is refused naming the tensor
    let bad = Rules {
        unfused: vec![kimi_loader_core::mapping::UnfuseRule {
            fragment: ".wqkv.".into(),
            parts: vec![
                (".q_proj.".into(), 5),
                (".k_proj.".into(), 5),
                (".v_proj.".into(), 0),
            ],
        }],
        ..Rules::default()
    };
    let err = plan_err(&ck, &bad);
    assert!(err.contains("blk.wqkv"), "{err}");
}

fn plan_err(ck: &Checkpoint, rules: &Rules) -> String {
    let dests = ["q", "k", "v"]
        .iter()
        .map(|p| dest(&format!("blk.{p}_proj.weight"), &[12, 5], Dtype::BF16))
        .collect();
    plan(ck, rules, dests).unwrap_err().to_string()
}

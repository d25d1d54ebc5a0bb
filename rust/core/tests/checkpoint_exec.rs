//! Integration tests: open multi-shard checkpoints from disk and read tensors with the
//! parallel executor, including chunked and huge-page destinations and a shard that is
//! truncated while open.

use std::fs;
use std::path::{Path, PathBuf};

use kimi_loader_core::exec::{read_tasks, ReadOptions, ReadTask};
use kimi_loader_core::{threads, Checkpoint, Error, IndexProblem};

/// Writes one safetensors file holding U8 tensors `(name, bytes)` back to back.
fn write_shard(path: &Path, tensors: &[(&str, Vec<u8>)]) {
    let mut header = serde_json::Map::new();
    let mut off = 0usize;
    for (name, data) in tensors {
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": "U8", "shape": [data.len()], "data_offsets": [off, off + data.len()]}),
        );
        off += data.len();
    }
    let text = serde_json::to_string(&header).unwrap();
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    for (_, data) in tensors {
        out.extend_from_slice(data);
    }
    fs::write(path, out).unwrap();
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kimi-loader-test-{}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}

/// `(shard file name, [(tensor name, bytes)])`.
type ShardSpec<'a> = (&'a str, Vec<(&'a str, Vec<u8>)>);

fn write_checkpoint(dir: &Path, shards: &[ShardSpec<'_>]) {
    let mut map = serde_json::Map::new();
    for (file, tensors) in shards {
        write_shard(&dir.join(file), tensors);
        for (n, _) in tensors {
            map.insert(n.to_string(), serde_json::json!(file));
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

#[test]
fn reads_every_tensor_exactly() {
    let dir = tmpdir("read");
    let big = pattern(5 << 20, 7); // spans several 2 MiB pages and read chunks
    write_checkpoint(
        &dir,
        &[
            (
                "a.safetensors",
                vec![("x", pattern(1000, 1)), ("big", big.clone())],
            ),
            (
                "b.safetensors",
                vec![("y", pattern(3, 2)), ("empty", vec![])],
            ),
        ],
    );
    let ck = Checkpoint::open(std::slice::from_ref(&dir), Some(2)).unwrap();
    assert_eq!(ck.len(), 4);
    let names = ["x", "big", "y", "empty"];
    let mut bufs: Vec<Vec<u8>> = names
        .iter()
        .map(|n| vec![0u8; ck.get(n).unwrap().1.nbytes() as usize])
        .collect();
    let tasks: Vec<ReadTask> = names
        .iter()
        .zip(bufs.iter_mut())
        .map(|(n, buf)| {
            let (id, e) = ck.get(n).unwrap();
            ReadTask {
                shard: id.shard,
                offset: ck.shard(id).abs_offset(e),
                len: e.nbytes(),
                dst: buf.as_mut_ptr(),
            }
        })
        .collect();
    let pool = threads::pool(Some(2)).unwrap();
    let opts = ReadOptions {
        chunk: 64 << 10,
        ..ReadOptions::default()
    };
    // SAFETY: each destination is a distinct Vec of exactly `len` bytes, alive and
    // untouched for the duration of the call.
    unsafe { read_tasks(&ck, &tasks, &pool, opts) }.unwrap();
    assert_eq!(bufs[0], pattern(1000, 1));
    assert_eq!(bufs[1], big);
    assert_eq!(bufs[2], pattern(3, 2));
    assert!(bufs[3].is_empty());
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn a_shard_truncated_while_open_is_an_io_error_not_a_crash() {
    let dir = tmpdir("trunc");
    write_checkpoint(&dir, &[("a.safetensors", vec![("w", pattern(1 << 20, 3))])]);
    let ck = Checkpoint::open(std::slice::from_ref(&dir), None).unwrap();
    let (id, e) = ck.get("w").unwrap();
    // Another process truncates the shard in place after it was opened.
    fs::OpenOptions::new()
        .write(true)
        .open(dir.join("a.safetensors"))
        .unwrap()
        .set_len(4096)
        .unwrap();
    let mut buf = vec![0u8; e.nbytes() as usize];
    let task = ReadTask {
        shard: id.shard,
        offset: ck.shard(id).abs_offset(e),
        len: e.nbytes(),
        dst: buf.as_mut_ptr(),
    };
    let pool = threads::pool(None).unwrap();
    // SAFETY: `buf` is a live, exclusively owned destination of `len` bytes.
    let err = unsafe { read_tasks(&ck, &[task], &pool, ReadOptions::default()) }.unwrap_err();
    match &err {
        Error::Io { file, .. } => assert!(file.ends_with("a.safetensors")),
        other => panic!("expected an I/O error, got {other:?}"),
    }
    assert!(err.to_string().contains("truncated"), "{err}");
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn index_problems_name_the_shard_and_tensor() {
    let dir = tmpdir("index");
    write_checkpoint(&dir, &[("a.safetensors", vec![("w", pattern(4, 0))])]);
    write_shard(
        &dir.join("a.safetensors"),
        &[("w", pattern(4, 0)), ("extra", pattern(2, 0))],
    );
    let err = Checkpoint::open(std::slice::from_ref(&dir), None).unwrap_err();
    match &err {
        Error::Index {
            file,
            tensor,
            problem,
            ..
        } => {
            assert!(file.ends_with("a.safetensors"));
            assert_eq!(tensor.as_deref(), Some("extra"));
            assert_eq!(*problem, IndexProblem::TensorNotInIndex);
        }
        other => panic!("expected an index error, got {other:?}"),
    }
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn out_of_range_tasks_are_rejected_before_any_read() {
    let dir = tmpdir("range");
    write_checkpoint(&dir, &[("a.safetensors", vec![("w", pattern(16, 0))])]);
    let ck = Checkpoint::open(std::slice::from_ref(&dir), None).unwrap();
    let mut buf = vec![0u8; 64];
    let pool = threads::pool(None).unwrap();
    for task in [
        ReadTask {
            shard: 0,
            offset: 0,
            len: 10_000,
            dst: buf.as_mut_ptr(),
        },
        ReadTask {
            shard: 9,
            offset: 0,
            len: 1,
            dst: buf.as_mut_ptr(),
        },
        ReadTask {
            shard: 0,
            offset: u64::MAX,
            len: 2,
            dst: buf.as_mut_ptr(),
        },
    ] {
        // SAFETY: rejected before any write; `buf` is live either way.
        let err = unsafe { read_tasks(&ck, &[task], &pool, ReadOptions::default()) }.unwrap_err();
        assert!(matches!(err, Error::InvalidArgument { .. }), "{err:?}");
    }
    assert!(buf.iter().all(|&b| b == 0));
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn prefaulting_and_huge_pages_change_no_byte_around_the_destination() {
    // the fault-in advice works on whole pages: a destination that starts and ends inside
    // a page shares those pages with bytes that are not ours, which must stay as they were
    let dir = tmpdir("prefault");
    let data = pattern((3 << 20) + 12345, 9);
    write_checkpoint(&dir, &[("a.safetensors", vec![("w", data.clone())])]);
    let ck = Checkpoint::open(std::slice::from_ref(&dir), None).unwrap();
    let (id, e) = ck.get("w").unwrap();
    let pool = threads::pool(Some(2)).unwrap();
    for (prefault, huge_pages) in [(true, false), (true, true), (false, true), (false, false)] {
        // a fresh, never-written allocation around the destination, except for two
        // guard regions that are written with a marker
        let mut region = vec![0u8; data.len() + (8 << 20)];
        let at = 4097; // neither page- nor huge-page-aligned
        region[..at].fill(0xAB);
        let end = at + data.len();
        region[end..end + 5000].fill(0xCD);
        let task = ReadTask {
            shard: id.shard,
            offset: ck.shard(id).abs_offset(e),
            len: e.nbytes(),
            // SAFETY: `at + len` lies inside `region`.
            dst: unsafe { region.as_mut_ptr().add(at) },
        };
        let opts = ReadOptions {
            chunk: 1 << 20,
            prefault,
            huge_pages,
        };
        // SAFETY: the destination is `len` bytes inside `region`, alive and untouched by
        // anyone else during the call.
        unsafe { read_tasks(&ck, &[task], &pool, opts) }.unwrap();
        assert_eq!(&region[at..end], &data[..], "{prefault} {huge_pages}");
        assert!(region[..at].iter().all(|&b| b == 0xAB));
        assert!(region[end..end + 5000].iter().all(|&b| b == 0xCD));
        assert!(region[end + 5000..].iter().all(|&b| b == 0));
    }
    let _ = fs::remove_dir_all(&dir);
}

/// Many names (enough for the name table to be built in parts, in parallel) in four
/// shards, with a pretty-printed index (parsed in parallel stretches).
fn many_names_checkpoint(tag: &str, edit: impl Fn(&mut Vec<(String, String)>)) -> PathBuf {
    let dir = tmpdir(tag);
    let names: Vec<String> = (0..24_000).map(|i| format!("model.layers.{i}.w")).collect();
    let mut index = Vec::new();
    for s in 0..4 {
        let file = format!("s{s}.safetensors");
        let tensors: Vec<(&str, Vec<u8>)> = names[s * 6000..(s + 1) * 6000]
            .iter()
            .map(|n| (n.as_str(), vec![s as u8; 2]))
            .collect();
        write_shard(&dir.join(&file), &tensors);
        index.extend(tensors.iter().map(|(n, _)| (n.to_string(), file.clone())));
    }
    edit(&mut index);
    let map: serde_json::Map<String, serde_json::Value> = index
        .into_iter()
        .map(|(n, f)| (n, serde_json::Value::String(f)))
        .collect();
    let text = serde_json::to_string_pretty(&serde_json::json!({"weight_map": map})).unwrap();
    fs::write(dir.join("model.safetensors.index.json"), text).unwrap();
    dir
}

fn index_error(dir: &Path, threads: usize) -> (String, String, IndexProblem) {
    match Checkpoint::open(&[dir.to_path_buf()], Some(threads)).unwrap_err() {
        Error::Index {
            file,
            tensor,
            problem,
            ..
        } => (
            file.file_name().unwrap().to_string_lossy().into_owned(),
            tensor.unwrap_or_default(),
            problem,
        ),
        other => panic!("expected an index error, got {other:?}"),
    }
}

#[test]
fn many_names_open_and_every_index_problem_is_found_the_same_way_on_any_thread_count() {
    let dir = many_names_checkpoint("many-ok", |_| {});
    for threads in [1, 2, 3] {
        let ck = Checkpoint::open(std::slice::from_ref(&dir), Some(threads)).unwrap();
        assert_eq!(ck.len(), 24_000);
        for i in (0..24_000).step_by(7) {
            let id = ck.find(&format!("model.layers.{i}.w")).unwrap();
            assert_eq!(id.shard as usize, i / 6000);
            assert_eq!(&*ck.entry(id).name, format!("model.layers.{i}.w"));
        }
        assert!(ck.find("model.layers.24000.w").is_none());
    }
    let _ = fs::remove_dir_all(&dir);

    // (edit of the index, expected (file, tensor, problem)): with two problems, the
    // one first in the index's (sorted) order is reported, then unlisted tensors in
    // shard order.
    type Edit = fn(&mut Vec<(String, String)>);
    let cases: [(&str, Edit, (&str, &str, IndexProblem)); 4] = [
        (
            "wrong-shard",
            |ix| {
                ix[6001].1 = "s3.safetensors".into();
                ix[20].1 = "s2.safetensors".into();
            },
            (
                "s2.safetensors",
                "model.layers.20.w",
                IndexProblem::TensorNotInShard,
            ),
        ),
        (
            "unknown",
            |ix| {
                ix.push(("model.layers.99999.w".into(), "s1.safetensors".into()));
                ix.push(("model.layers.0000.w".into(), "s3.safetensors".into()));
            },
            (
                "s3.safetensors",
                "model.layers.0000.w",
                IndexProblem::TensorNotInShard,
            ),
        ),
        (
            "unlisted",
            |ix| {
                ix.remove(18_500);
                ix.remove(7000);
            },
            (
                "s1.safetensors",
                "model.layers.7000.w",
                IndexProblem::TensorNotInIndex,
            ),
        ),
        (
            "unlisted-and-wrong",
            |ix| {
                ix[23_999].1 = "s0.safetensors".into();
                ix.remove(100);
            },
            (
                "s0.safetensors",
                "model.layers.23999.w",
                IndexProblem::TensorNotInShard,
            ),
        ),
    ];
    for (tag, edit, (file, tensor, problem)) in cases {
        let dir = many_names_checkpoint(tag, edit);
        for threads in [1, 2, 3] {
            let got = index_error(&dir, threads);
            assert_eq!(
                got,
                (file.to_string(), tensor.to_string(), problem),
                "{tag}, {threads} threads"
            );
        }
        let _ = fs::remove_dir_all(&dir);
    }
}

#[test]
fn a_name_in_two_shards_is_found_first_in_shard_order_on_any_thread_count() {
    let dir = tmpdir("many-dup");
    let names: Vec<String> = (0..20_000).map(|i| format!("t.{i}")).collect();
    let mut shards: Vec<Vec<(&str, Vec<u8>)>> = (0..4)
        .map(|s| {
            names[s * 5000..(s + 1) * 5000]
                .iter()
                .map(|n| (n.as_str(), vec![1u8]))
                .collect()
        })
        .collect();
    // t.12345 (shard 2) again in shard 3, t.4000 (shard 0) again in shard 2
    shards[3].push(("t.12345", vec![2]));
    shards[2].push(("t.4000", vec![3]));
    let files: Vec<PathBuf> = (0..4)
        .map(|s| dir.join(format!("s{s}.safetensors")))
        .collect();
    for (f, t) in files.iter().zip(&shards) {
        write_shard(f, t);
    }
    for threads in [1, 2, 3] {
        match Checkpoint::open(&files, Some(threads)).unwrap_err() {
            Error::Index {
                file,
                tensor,
                problem,
                ..
            } => {
                assert_eq!(problem, IndexProblem::DuplicateTensor);
                assert_eq!(tensor.as_deref(), Some("t.4000"), "{threads} threads");
                assert!(file.ends_with("s2.safetensors"));
            }
            other => panic!("expected a duplicate-tensor error, got {other:?}"),
        }
    }
    let _ = fs::remove_dir_all(&dir);
}

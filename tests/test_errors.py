"""A corpus of bad checkpoints: each raises the right KimiLoaderError subclass, naming the
file (and the tensor where there is one). Nothing crashes or hangs."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import kimi_loader
from kimi_loader import (
    CheckpointNotFoundError,
    HeaderError,
    IndexMismatchError,
    KimiLoaderError,
    MissingTensorError,
)


def raw_file(path, header: bytes | str, data: bytes = b"", declared_len: int | None = None) -> str:
    if isinstance(header, str):
        header = header.encode()
    n = len(header) if declared_len is None else declared_len
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", n) + header + data)
    return os.fspath(path)


def entry(dtype="U8", shape=(4,), off=(0, 4)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(off)}


def hdr(**entries) -> str:
    return json.dumps(entries)


def sharded(
    tmp_path,
    shards: dict[str, dict[str, torch.Tensor]],
    weight_map: dict[str, str] | None = None,
    index_text: str | None = None,
) -> str:
    wm = {}
    for fname, tensors in shards.items():
        save_file(tensors, tmp_path / fname)
        wm.update(dict.fromkeys(tensors, fname))
    if weight_map is not None:
        wm = weight_map
    (tmp_path / "model.safetensors.index.json").write_text(
        index_text if index_text is not None else json.dumps({"metadata": {}, "weight_map": wm})
    )
    return os.fspath(tmp_path)


T = {"a": torch.zeros(2), "b": torch.ones(3)}

# (id, builder(tmp_path) -> path, exception class, kind, tensor named in the error)
SINGLE_FILE_CASES = [
    (
        "empty-file",
        lambda p: raw_file(p, b"", declared_len=0) and (p.write_bytes(b""), os.fspath(p))[1],
        HeaderError,
        "too_small",
        None,
    ),
    (
        "truncated-data",
        lambda p: raw_file(p, hdr(w=entry("F32", (4,), (0, 16))), b"\0" * 10),
        HeaderError,
        "out_of_bounds",
        "w",
    ),
    ("header-length-past-eof", lambda p: raw_file(p, "{}", declared_len=4096), HeaderError, "past_end", None),
    ("header-length-over-cap", lambda p: raw_file(p, "{}", declared_len=200_000_000), HeaderError, "too_large", None),
    ("invalid-json", lambda p: raw_file(p, '{"w": {"dtype": "U8",,}}'), HeaderError, "json", None),
    ("non-utf8", lambda p: raw_file(p, b'{"\xff\xfe": 1}'), HeaderError, "not_utf8", None),
    ("not-an-object", lambda p: raw_file(p, "[1, 2]"), HeaderError, "json", None),
    (
        "unknown-dtype",
        lambda p: raw_file(p, hdr(w=entry("Q4_K", (4,), (0, 4))), b"\0" * 4),
        HeaderError,
        "unknown_dtype",
        "w",
    ),
    (
        "shape-bytes-mismatch",
        lambda p: raw_file(p, hdr(w=entry("F32", (3,), (0, 16))), b"\0" * 16),
        HeaderError,
        "shape_bytes_mismatch",
        "w",
    ),
    (
        "offsets-outside-file",
        lambda p: raw_file(p, hdr(w=entry("U8", (10**12,), (0, 10**12))), b"\0" * 8),
        HeaderError,
        "out_of_bounds",
        "w",
    ),
    (
        "reversed-offsets",
        lambda p: raw_file(p, hdr(w=entry("U8", (0,), (8, 0))), b"\0" * 8),
        HeaderError,
        "out_of_bounds",
        "w",
    ),
    (
        "overlapping-tensors",
        lambda p: raw_file(p, hdr(a=entry("U8", (6,), (0, 6)), b=entry("U8", (4,), (4, 8))), b"\0" * 8),
        HeaderError,
        "overlap",
        "b",
    ),
    (
        "gap-between-tensors",
        lambda p: raw_file(p, hdr(a=entry("U8", (4,), (0, 4)), b=entry("U8", (2,), (6, 8))), b"\0" * 8),
        HeaderError,
        "gap",
        "b",
    ),
    ("trailing-bytes", lambda p: raw_file(p, hdr(a=entry("U8", (4,), (0, 4))), b"\0" * 9), HeaderError, "gap", None),
    (
        "overflowing-dims",
        lambda p: raw_file(p, hdr(w=entry("F32", (2**62, 2**62), (0, 8))), b"\0" * 8),
        HeaderError,
        "overflow",
        "w",
    ),
    (
        "dim-beyond-u64",
        lambda p: raw_file(p, '{"w":{"dtype":"U8","shape":[1e400],"data_offsets":[0,1]}}', b"\0"),
        HeaderError,
        "json",
        None,
    ),
    ("negative-dim", lambda p: raw_file(p, hdr(w=entry("U8", (-1,), (0, 1))), b"\0"), HeaderError, "json", None),
    (
        "duplicate-tensor-key",
        lambda p: raw_file(
            p,
            '{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"w":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}',
            b"\0\0",
        ),
        HeaderError,
        "duplicate_key",
        "w",
    ),
    ("missing-field", lambda p: raw_file(p, '{"w":{"dtype":"U8","shape":[1]}}', b"\0"), HeaderError, "json", "w"),
    ("deep-nesting", lambda p: raw_file(p, '{"__metadata__":' + "[" * 100_000 + "}"), HeaderError, "json", None),
    ("metadata-not-strings", lambda p: raw_file(p, '{"__metadata__":{"k":1}}'), HeaderError, "json", None),
]


@pytest.mark.parametrize("case", SINGLE_FILE_CASES, ids=[c[0] for c in SINGLE_FILE_CASES])
def test_bad_single_file(tmp_path, case):
    _id, build, cls, kind, tensor = case
    path = build(tmp_path / "bad.safetensors")
    with pytest.raises(cls) as ei:
        kimi_loader.open(path)
    e = ei.value
    assert isinstance(e, KimiLoaderError)
    assert e.kind == kind, str(e)
    assert e.file == path and "bad.safetensors" in str(e)
    if tensor is not None:
        assert e.tensor == tensor and f"'{tensor}'" in str(e)


INDEX_CASES = [
    (
        "index-names-missing-shard",
        lambda p: sharded(p, {"s1.safetensors": T}, {"a": "s1.safetensors", "b": "s2.safetensors"}),
        IndexMismatchError,
        "missing_shard",
        "s2.safetensors",
        "b",
    ),
    (
        "index-names-tensor-shard-lacks",
        lambda p: sharded(
            p, {"s1.safetensors": T}, {"a": "s1.safetensors", "b": "s1.safetensors", "c": "s1.safetensors"}
        ),
        IndexMismatchError,
        "tensor_not_in_shard",
        "s1.safetensors",
        "c",
    ),
    (
        "index-maps-tensor-to-wrong-shard",
        lambda p: sharded(
            p,
            {"s1.safetensors": {"a": T["a"]}, "s2.safetensors": {"b": T["b"]}},
            {"a": "s2.safetensors", "b": "s2.safetensors"},
        ),
        IndexMismatchError,
        "tensor_not_in_shard",
        "s2.safetensors",
        "a",
    ),
    (
        "shard-tensor-missing-from-index",
        lambda p: sharded(p, {"s1.safetensors": T}, {"a": "s1.safetensors"}),
        IndexMismatchError,
        "tensor_not_in_index",
        "s1.safetensors",
        "b",
    ),
    (
        "tensor-in-two-shards",
        lambda p: sharded(
            p,
            {"s1.safetensors": T, "s2.safetensors": {"b": torch.zeros(1), "c": torch.zeros(1)}},
            {"a": "s1.safetensors", "b": "s1.safetensors", "c": "s2.safetensors"},
        ),
        IndexMismatchError,
        "duplicate_tensor",
        "model.safetensors.index.json",
        "b",
    ),
    (
        "index-invalid-json",
        lambda p: sharded(p, {"s1.safetensors": T}, index_text='{"weight_map": {"a": }'),
        IndexMismatchError,
        "json",
        "model.safetensors.index.json",
        None,
    ),
    (
        "index-without-weight-map",
        lambda p: sharded(p, {"s1.safetensors": T}, index_text='{"metadata": {}}'),
        IndexMismatchError,
        "json",
        "model.safetensors.index.json",
        None,
    ),
    (
        "index-shard-outside-directory",
        lambda p: sharded(p, {"s1.safetensors": T}, {"a": "../s1.safetensors", "b": "s1.safetensors"}),
        IndexMismatchError,
        "missing_shard",
        "model.safetensors.index.json",
        "a",
    ),
    (
        "index-lists-tensor-twice",
        lambda p: sharded(
            p,
            {"s1.safetensors": T},
            index_text=('{"weight_map": {"a": "s1.safetensors", "b": "s1.safetensors", "a": "s1.safetensors"}}'),
        ),
        IndexMismatchError,
        "json",
        "model.safetensors.index.json",
        "a",
    ),
    (
        "bad-shard-behind-index",
        lambda p: (
            raw_file(p / "s2.safetensors", "{]"),
            sharded(p, {"s1.safetensors": T}, {"a": "s1.safetensors", "b": "s1.safetensors", "x": "s2.safetensors"}),
        )[1],
        HeaderError,
        "json",
        "s2.safetensors",
        None,
    ),
]


@pytest.mark.parametrize("case", INDEX_CASES, ids=[c[0] for c in INDEX_CASES])
def test_bad_index(tmp_path, case):
    _id, build, cls, kind, file_part, tensor = case
    path = build(tmp_path)
    with pytest.raises(cls) as ei:
        kimi_loader.open(path)
    e = ei.value
    assert e.kind == kind, str(e)
    assert e.file is not None and e.file.endswith(file_part), (e.file, str(e))
    assert file_part in str(e)
    if tensor is not None:
        assert e.tensor == tensor and f"'{tensor}'" in str(e)


def test_missing_paths_are_file_not_found(tmp_path):
    for p in (tmp_path / "nope", tmp_path / "nope.safetensors"):
        with pytest.raises(CheckpointNotFoundError) as ei:
            kimi_loader.open(p)
        assert isinstance(ei.value, FileNotFoundError) and "nope" in str(ei.value)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match=r"looked for model\.safetensors\.index\.json, model\.safetensors or"):
        kimi_loader.open(tmp_path / "empty_dir")
    with pytest.raises(kimi_loader.InvalidArgumentError):
        kimi_loader.open([])


def test_missing_tensor_names_it(tmp_path):
    save_file(T, tmp_path / "model.safetensors")
    with kimi_loader.open(tmp_path) as ck:
        with pytest.raises(MissingTensorError) as ei:
            ck.get_tensor("model.layers.0.mlp.gate.weight")
        assert isinstance(ei.value, KeyError) and ei.value.tensor == "model.layers.0.mlp.gate.weight"
        with pytest.raises(MissingTensorError):
            ck.tensor_info("zzz")


def test_shard_list_with_a_tensor_in_two_files(tmp_path):
    save_file(T, tmp_path / "x.safetensors")
    save_file({"b": torch.zeros(1)}, tmp_path / "y.safetensors")
    with pytest.raises(IndexMismatchError) as ei:
        kimi_loader.open([tmp_path / "x.safetensors", tmp_path / "y.safetensors"])
    assert ei.value.kind == "duplicate_tensor" and ei.value.tensor == "b"
    assert "x.safetensors" in str(ei.value) and "y.safetensors" in str(ei.value)


_PROBE = """
import sys, kimi_loader
for path in sys.argv[1:]:
    try:
        kimi_loader.open(path)
        print("OPENED", path)
    except kimi_loader.KimiLoaderError as e:
        print(type(e).__name__)
"""


def test_corpus_in_a_fresh_process_never_crashes(tmp_path):
    """The whole corpus through one fresh interpreter: it must exit normally (a crash
    would end it with a signal) within the time limit (no hang), with one typed error
    per case; and `kimi-loader inspect` exits with status 1 and a message."""
    paths = []
    for i, (_case_id, build, *_rest) in enumerate(SINGLE_FILE_CASES + [(c[0], c[1]) for c in INDEX_CASES]):
        d = tmp_path / f"c{i}"
        d.mkdir()
        paths.append(build(d / "bad.safetensors") if i < len(SINGLE_FILE_CASES) else build(d))
    r = subprocess.run([sys.executable, "-c", _PROBE, *paths], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split()
    assert len(lines) == len(paths) and all(line.endswith("Error") for line in lines), r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "kimi_loader.cli", "inspect", paths[0]], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 1 and "HeaderError" in r.stderr and "bad.safetensors" in r.stderr


def test_two_tensors_writing_the_same_bytes_is_a_plan_error(tmp_path):
    """`language_model.model.norm.weight` and a stray `model.norm.weight` both resolve to
    the model's `model.norm.weight`: a PlanError (kind "overlap") naming both and the
    destination, before any byte is copied."""
    from reference import as_bytes, rewrite

    from kimi_loader.models import for_config
    from kimi_loader.synth import make_checkpoint

    src = make_checkpoint(tmp_path / "src", quant="bf16")
    path = rewrite(src, tmp_path / "ck", add={"model.norm.weight": torch.ones(64, dtype=torch.bfloat16)})
    model = for_config(kimi_loader.open(path).config, dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(kimi_loader.PlanError) as e:
        kimi_loader.load_weights(model, path)
    assert e.value.kind == "overlap" and e.value.destination == "model.norm.weight"
    assert "language_model.model.norm.weight" in str(e.value) and "'model.norm.weight'" in str(e.value)
    assert all(torch.equal(as_bytes(v), as_bytes(before[k])) for k, v in model.state_dict().items())

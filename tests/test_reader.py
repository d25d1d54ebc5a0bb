"""kimi_loader.open / Checkpoint against safetensors.safe_open on generated checkpoints."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import kimi_loader
from conftest import PRESETS, QUANTS
from kimi_loader import _core


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _reference(path: str) -> dict[str, torch.Tensor]:
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    out = {}
    for f in files:
        with safe_open(os.path.join(path, f), framework="pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("quant", QUANTS)
def test_every_tensor_matches_safetensors(synth_dir, preset, quant):
    path = synth_dir(preset, quant)
    ref = _reference(path)
    with kimi_loader.open(path) as ck:
        assert len(ck.files) == 4
        assert sorted(ref) == ck.keys() and len(ck) == len(ref)
        copies = ck.read_tensors()
        for name, want in ref.items():
            got = ck.get_tensor(name)
            assert got.dtype == want.dtype and got.shape == want.shape, name
            assert torch.equal(_bytes(got), _bytes(want)), name
            assert torch.equal(_bytes(copies[name]), _bytes(want)), name
            info = ck.tensor_info(name)
            assert (info.dtype, info.shape, info.nbytes) == (
                want.dtype,
                tuple(want.shape),
                want.numel() * want.element_size(),
            )
        assert ck.quant_format == quant


def test_get_tensor_is_a_zero_copy_view_and_writes_stay_private(synth_dir):
    path = synth_dir("kimi-k2.5-tiny", "bf16")
    name = "language_model.model.embed_tokens.weight"
    with kimi_loader.open(path) as ck:
        info = ck.tensor_info(name)
        shard = ck.files.index(info.file)
        buf = ck.core.shard_buffer(shard)
        t = ck.get_tensor(name)
        # The view's data pointer is exactly the mapped bytes of the tensor: no copy.
        assert t.data_ptr() == buf.address + info.offset
        t2 = ck.get_tensor(name)
        assert t2.data_ptr() == t.data_ptr()
        before = t.clone()
        t.fill_(7.0)  # copy-on-write: the process sees the write ...
        assert torch.equal(ck.get_tensor(name), t)
    # ... and the file does not
    with safe_open(info.file, framework="pt") as h:
        assert torch.equal(h.get_tensor(name), before)
    with kimi_loader.open(path) as ck:
        assert torch.equal(ck.get_tensor(name), before)


def test_views_outlive_close(synth_dir):
    path = synth_dir("deepseek-v3-tiny", "bf16")
    ck = kimi_loader.open(path)
    t = ck.get_tensor("model.norm.weight")
    want = t.clone()
    ck.close()
    assert ck.closed
    assert torch.equal(t, want)
    with pytest.raises(kimi_loader.KimiLoaderError, match="closed"):
        ck.keys()


def test_tensor_info_offsets_point_at_the_bytes(synth_dir):
    path = synth_dir("deepseek-v3-tiny", "fp8-block")
    with kimi_loader.open(path) as ck:
        for info in ck.infos()[:50]:
            with open(info.file, "rb") as f:
                f.seek(info.offset)
                raw = f.read(info.nbytes)
            assert raw == bytes(_bytes(ck.get_tensor(info.name)).numpy())
            assert info.st_dtype in kimi_loader.formats.TORCH_DTYPES


def test_open_forms_directory_index_single_file_and_list(synth_dir, tmp_path):
    path = synth_dir("kimi-k2.5-tiny", "bf16")
    by_dir = kimi_loader.open(path)
    by_index = kimi_loader.open(os.path.join(path, "model.safetensors.index.json"))
    by_list = kimi_loader.open(by_dir.files)
    assert by_dir.keys() == by_index.keys() == by_list.keys()
    assert by_dir.config == by_index.config and by_dir.config["model_type"] == "kimi_k25"
    assert by_list.config is None and by_list.quant_format == "bf16"

    single = tmp_path / "single"
    single.mkdir()
    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}
    save_file(tensors, single / "model.safetensors", metadata={"format": "pt", "k": "v"})
    shutil.copy(os.path.join(path, "config.json"), single / "config.json")
    for p in (single, single / "model.safetensors"):
        with kimi_loader.open(p) as ck:
            assert ck.keys() == ["a", "b"] and "a" in ck and "zz" not in ck and 7 not in ck
            assert torch.equal(ck.get_tensor("a"), tensors["a"])
            assert ck.metadata() == {"format": "pt", "k": "v"}
    assert kimi_loader.open(single).config is not None


def test_read_tensors_into_given_buffers_and_size_checks(synth_dir):
    path = synth_dir("kimi-k2.5-tiny", "ct-int4")
    with kimi_loader.open(path) as ck:
        name = "language_model.model.layers.1.mlp.experts.3.down_proj.weight_packed"
        dst = torch.empty(ck.tensor_info(name).shape, dtype=torch.int32)
        out = ck.read_tensors([name], out={name: dst})
        assert out[name] is dst and torch.equal(dst, ck.get_tensor(name))
        with pytest.raises(kimi_loader.ShapeMismatchError, match="down_proj"):
            ck.read_tensors([name], out={name: torch.empty(3, dtype=torch.int32)})
        with pytest.raises(kimi_loader.MissingTensorError, match=r"no\.such"):
            ck.read_tensors(["no.such"])


def test_threads_argument_and_environment(synth_dir, monkeypatch):
    path = synth_dir("kimi-k2.5-tiny", "bf16")
    assert _core.resolve_threads(3) == 3
    monkeypatch.setenv("KIMI_LOADER_THREADS", "5")
    assert _core.resolve_threads() == 5
    assert len(kimi_loader.open(path)) == len(kimi_loader.open(path, threads=1))
    monkeypatch.setenv("KIMI_LOADER_THREADS", "zero")
    with pytest.raises(kimi_loader.InvalidArgumentError, match="KIMI_LOADER_THREADS"):
        kimi_loader.open(path)
    monkeypatch.delenv("KIMI_LOADER_THREADS")
    with pytest.raises(kimi_loader.InvalidArgumentError):
        kimi_loader.open(path, threads=0)


def test_quant_format_reads_text_config_and_rejects_unknown():
    detect = kimi_loader.detect_quant_format
    assert detect(None) == "bf16" and detect({}) == "bf16"
    assert (
        detect({"text_config": {"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}})
        == "fp8-block"
    )
    assert (
        detect({"quantization_config": {"quant_method": "quark", "global_quant_config": {"weight": {"dtype": "fp4"}}}})
        == "quark-mxfp4"
    )
    with pytest.raises(kimi_loader.ConfigError, match="weight_block_size"):
        detect({"quantization_config": {"quant_method": "fp8"}})
    for bad in (
        {"quant_method": "gptq"},
        {"quant_method": "compressed-tensors", "format": "float-quantized"},
        {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "config_groups": {"g": {"weights": {"num_bits": 8}}},
        },
    ):
        with pytest.raises(kimi_loader.UnsupportedFormatError):
            detect({"quantization_config": bad})


def test_stub_matches_extension():
    """Every name declared in _core.pyi exists on the compiled module and its classes."""
    import ast

    stub = ast.parse(open(os.path.join(os.path.dirname(_core.__file__), "_core.pyi")).read())
    for node in stub.body:
        if isinstance(node, ast.FunctionDef):
            assert callable(getattr(_core, node.name)), node.name
        elif isinstance(node, ast.ClassDef):
            cls = getattr(_core, node.name)
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name != "__buffer__":
                    assert hasattr(cls, item.name), f"{node.name}.{item.name}"
        elif isinstance(node, ast.AnnAssign):
            assert hasattr(_core, node.target.id), node.target.id


def test_open_timings_cover_every_stage(synth_dir):
    with kimi_loader.open(synth_dir("kimi-k2.5-tiny", "bf16")) as ck:
        t = ck.open_timings
    assert set(t) == {"index", "shards", "names", "cross_check", "total"}
    assert all(v >= 0 for v in t.values())
    assert t["total"] >= t["index"] + t["shards"] + t["names"] + t["cross_check"] - 1e-6


def test_reading_a_shard_truncated_while_open_raises(tmp_path):
    tensors = {"w": torch.arange(1 << 18, dtype=torch.float32)}
    save_file(tensors, tmp_path / "model.safetensors")
    with kimi_loader.open(tmp_path) as ck:
        os.truncate(tmp_path / "model.safetensors", 4096)
        with pytest.raises(kimi_loader.CheckpointIOError) as ei:
            ck.read_tensors(["w"])
        assert isinstance(ei.value, OSError) and "truncated" in str(ei.value)
        assert ei.value.file.endswith("model.safetensors")


def test_read_tensors_out_needs_the_exact_dtype_and_shape(tmp_path):
    """An fp16 `out` for bf16 data, or a transposed shape, used to be filled with
    reinterpreted bytes; now they are refused, naming the tensor."""
    from safetensors.torch import save_file

    save_file({"w": torch.randn(4, 6).to(torch.bfloat16)}, tmp_path / "model.safetensors")
    ck = kimi_loader.open(tmp_path)
    for bad in (torch.empty(4, 6, dtype=torch.float16), torch.empty(6, 4, dtype=torch.bfloat16)):
        with pytest.raises(kimi_loader.ShapeMismatchError, match="'w'") as e:
            ck.read_tensors(["w"], out={"w": bad})
        assert e.value.tensor == "w" and e.value.expected == (4, 6)
    good = torch.empty(4, 6, dtype=torch.bfloat16)
    assert ck.read_tensors(["w"], out={"w": good})["w"] is good and torch.equal(good, ck.get_tensor("w"))


def test_a_folder_of_shards_without_an_index(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.ones(3)}, tmp_path / "part-2.safetensors")
    save_file({"b": torch.zeros(2)}, tmp_path / "part-1.safetensors")
    ck = kimi_loader.open(tmp_path)
    assert sorted(ck.keys()) == ["a", "b"] and [os.path.basename(f) for f in ck.files] == [
        "part-1.safetensors",
        "part-2.safetensors",
    ]
    save_file({"a": torch.ones(3)}, tmp_path / "part-3.safetensors")  # the same name twice
    with pytest.raises(kimi_loader.KimiLoaderError, match="'a'"):
        kimi_loader.open(tmp_path)


def test_read_tensors_converts_only_when_asked_and_into_non_contiguous_out(tmp_path):
    w = torch.randn(4, 6).to(torch.bfloat16)
    q = torch.randint(-(2**31), 2**31 - 1, (3, 2), dtype=torch.int32)
    save_file({"w": w, "q": q}, tmp_path / "model.safetensors")
    ck = kimi_loader.open(tmp_path)
    got = ck.read_tensors(dtype=torch.float32)
    assert got["w"].dtype == torch.float32 and torch.equal(got["w"], w.float())
    assert got["q"].dtype == torch.int32 and torch.equal(got["q"], q)  # packed ints are not values
    # an fp16 out is accepted once the conversion is explicit, and a transposed view works
    out16 = torch.full((4, 6), float("nan"), dtype=torch.float16)
    assert ck.read_tensors(["w"], out={"w": out16}, dtype=torch.float16)["w"] is out16
    assert torch.equal(out16, w.to(torch.float16))
    t = torch.full((6, 4), float("nan"), dtype=torch.bfloat16).t()
    ck.read_tensors(["w"], out={"w": t})
    assert torch.equal(t, w)
    with pytest.raises(kimi_loader.InvalidArgumentError, match="out\\['w'\\]"):
        ck.read_tensors(["w"], out={"w": [1, 2]})  # type: ignore[dict-item]
    with pytest.raises(kimi_loader.InvalidArgumentError, match="dtype"):
        ck.read_tensors(["w"], dtype="float16")  # type: ignore[arg-type]
    with pytest.raises(kimi_loader.InvalidArgumentError, match="device"):
        ck.read_tensors(["w"], device="nowhere")


def test_read_only_out_is_refused_not_a_segfault(tmp_path):
    """A tensor over a read-only mapping (np.memmap(mode='r')) used to crash the process
    or fail with 'Bad address' naming the shard; now it is refused naming the tensor, and
    a writable mapping of the same file is filled."""
    np = pytest.importorskip("numpy")
    w = torch.randn(64, 64).to(torch.bfloat16)
    save_file({"w": w}, tmp_path / "model.safetensors")
    np.zeros(w.numel() * 2, dtype=np.uint8).tofile(tmp_path / "dst.bin")
    ck = kimi_loader.open(tmp_path)
    for mode in ("r", "r+"):
        m = np.memmap(tmp_path / "dst.bin", mode=mode, dtype=np.uint8)
        with pytest.warns(UserWarning) if mode == "r" else _no_warning():
            dst = torch.from_numpy(m).view(torch.bfloat16).view(64, 64)
        if mode == "r":
            with pytest.raises(kimi_loader.InvalidArgumentError, match="'w' is not writable"):
                ck.read_tensors(["w"], out={"w": dst})
            assert not dst.any()
        else:
            ck.read_tensors(["w"], out={"w": dst})
            assert torch.equal(dst, w)


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_get_slice_getitem_and_device_dtype_like_safetensors(synth_dir):
    path = synth_dir("deepseek-v3-tiny", "bf16")
    name = "model.layers.0.self_attn.q_a_proj.weight"
    index = json.load(open(os.path.join(path, "model.safetensors.index.json")))["weight_map"]
    with kimi_loader.open(path) as ck, safe_open(os.path.join(path, index[name]), framework="pt") as ref:
        sl, rsl = ck.get_slice(name), ref.get_slice(name)
        assert sl.get_shape() == rsl.get_shape() and sl.get_dtype() == rsl.get_dtype() == "BF16"
        assert len(sl) == sl.shape[0] and sl.dtype == torch.bfloat16
        for index_ in (slice(3, 9), (slice(None), slice(5, 17)), 4, (slice(1, 30, 3), slice(None, 2))):
            part = sl[index_]
            assert torch.equal(part, rsl[index_]) and part.is_contiguous()
            part.fill_(0)  # a copy: the checkpoint's view is untouched
        assert torch.equal(ck[name], ref.get_tensor(name))
        with pytest.raises(kimi_loader.InvalidArgumentError, match=name):
            sl[100, 100, 100]
        with pytest.raises(KeyError):
            ck["no.such.tensor"]
        f = ck.get_tensor(name, dtype=torch.float32)
        assert f.dtype == torch.float32 and torch.equal(f, ref.get_tensor(name).float())
        assert ck.get_tensor(name, device="cpu").data_ptr() == ck.get_tensor(name).data_ptr()  # still a view
    everything = kimi_loader.load_file(path, dtype=torch.float16)
    with kimi_loader.open(path) as ck:
        assert set(everything) == set(ck.keys())
        for n, t in everything.items():
            assert torch.equal(t, ck.get_tensor(n).to(torch.float16))


def test_import_and_help_do_not_import_torch():
    """`kimi-loader --help` used to take seconds: the package imported torch eagerly."""
    import subprocess
    import sys

    code = (
        "import sys, kimi_loader, kimi_loader.cli\n"
        "assert 'torch' not in sys.modules, 'import'\n"
        "try:\n    kimi_loader.cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "try:\n    kimi_loader.cli.main(['synth', '--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'help'\n"
        "assert kimi_loader.open and 'torch' in sys.modules\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "ct-int4" in r.stdout and "kimi-k2.5-tiny" in r.stdout

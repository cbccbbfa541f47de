"""ModelMixin: diffusers-format saving, strict safe loading, atomic saves (DESIGN.md, decision 6)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from support.tiny_model import Tiny

import fusediff.modeling as modeling
from fusediff.modeling import ModelMixin


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k].float(), sb[k].float()), f"{k} differs: max |diff| {(sa[k] - sb[k]).abs().max()}"


def test_round_trip_files_and_values(tmp_path):
    torch.manual_seed(0)
    model = Tiny(4, 6)
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert json.loads((tmp_path / "config.json").read_text())["hidden"] == 6
    assert set(load_file(tmp_path / "diffusion_pytorch_model.safetensors")) == set(model.state_dict())
    loaded = Tiny.from_pretrained(tmp_path)
    _same_weights(model, loaded)
    assert not loaded.training and loaded.config.hidden == 6


def test_torch_dtype_and_variant(tmp_path):
    model = Tiny()
    model.save_pretrained(tmp_path, variant="fp16")
    assert (tmp_path / "diffusion_pytorch_model.fp16.safetensors").is_file()
    half = Tiny.from_pretrained(tmp_path, variant="fp16", torch_dtype=torch.float16)
    assert half.dtype == torch.float16
    assert torch.equal(half.inp.weight, model.inp.weight.half())
    with pytest.raises(FileNotFoundError, match="no diffusion_pytorch_model.safetensors"):
        Tiny.from_pretrained(tmp_path)
    with pytest.raises(TypeError, match="torch_dtype"):
        Tiny.from_pretrained(tmp_path, variant="fp16", torch_dtype=torch.int8)


def test_sharded_checkpoint_loads(tmp_path):
    model = Tiny()
    state = model.state_dict()
    names = sorted(state)
    shards = {"part-1.safetensors": names[:2], "part-2.safetensors": names[2:]}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(tmp_path / shard))
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model.save_config(tmp_path)
    _same_weights(model, Tiny.from_pretrained(tmp_path))


def test_shard_paths_cannot_escape(tmp_path):
    model = Tiny()
    model.save_config(tmp_path)
    save_file(model.state_dict(), str(tmp_path.parent / "outside.safetensors"))
    weight_map = {k: "../outside.safetensors" for k in model.state_dict()}
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match="escapes"):
        Tiny.from_pretrained(tmp_path)


def _saved(tmp_path, state_edit):
    model = Tiny()
    model.save_config(tmp_path)
    state = dict(model.state_dict())
    state_edit(state)
    save_file(state, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    return tmp_path


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("out.bias"), r"missing 1: out\.bias"),
    (lambda s: s.update({"extra.weight": torch.zeros(2)}), r"unexpected 1: extra\.weight"),
    (lambda s: s.update({"inp.weight": torch.zeros(5, 4)}), r"inp\.weight has shape \(5, 4\), the model expects \(5, 3\)"),
], ids=["missing", "unexpected", "wrong-shape"])
def test_mismatched_weights_are_named(tmp_path, edit, message):
    with pytest.raises(ValueError, match=message):
        Tiny.from_pretrained(_saved(tmp_path, edit))


def test_pickled_weights_refused_unless_allowed(tmp_path):
    model = Tiny()
    model.save_config(tmp_path)
    torch.save(model.state_dict(), tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match="pickled weights"):
        Tiny.from_pretrained(tmp_path)
    _same_weights(model, Tiny.from_pretrained(tmp_path, allow_pickle=True))


def test_pickle_with_code_is_refused_even_when_allowed(tmp_path):
    Tiny().save_config(tmp_path)

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"x": Evil()}, tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        Tiny.from_pretrained(tmp_path, allow_pickle=True)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors_named(tmp_path, damage):
    Tiny().save_pretrained(tmp_path)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x07" * 64)
    with pytest.raises(ValueError, match="cannot read weights from .*diffusion_pytorch_model.safetensors"):
        Tiny.from_pretrained(tmp_path)


def test_missing_config_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        Tiny.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        Tiny.from_pretrained(tmp_path / "absent")


def test_failed_save_leaves_existing_checkpoint_intact(tmp_path, monkeypatch):
    target = tmp_path / "model"
    Tiny(hidden=5).save_pretrained(target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def exploding_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    import safetensors.torch
    monkeypatch.setattr(safetensors.torch, "save_file", exploding_save)
    with pytest.raises(OSError, match="disk full"):
        Tiny(hidden=7).save_pretrained(target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary directory left


def test_failed_first_save_creates_nothing(tmp_path, monkeypatch):
    import safetensors.torch
    monkeypatch.setattr(safetensors.torch, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError, match="boom"):
        Tiny().save_pretrained(tmp_path / "new")
    assert list(tmp_path.iterdir()) == []


def test_save_over_existing_replaces_and_keeps_other_files(tmp_path):
    Tiny(hidden=5).save_pretrained(tmp_path)
    (tmp_path / "README.md").write_text("notes")
    Tiny(hidden=9).save_pretrained(tmp_path)
    assert Tiny.from_pretrained(tmp_path).config.hidden == 9
    assert (tmp_path / "README.md").read_text() == "notes"


def test_save_to_a_file_path_raises(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        Tiny().save_pretrained(tmp_path / "file")


def test_model_mixin_picks_class_by_name(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "NoSuchModel"}))
    with pytest.raises(ValueError, match="NoSuchModel"):
        ModelMixin.from_pretrained(tmp_path)


def test_device_dtype_and_parameter_count():
    model = Tiny(3, 5)
    assert model.device == torch.device("cpu") and model.dtype == torch.float32
    assert model.num_parameters() == 3 * 5 + 5 + 5 * 3 + 3
    assert modeling.WEIGHTS_NAME == "diffusion_pytorch_model"


def test_saved_files_get_normal_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        Tiny().save_pretrained(tmp_path / "m")
    finally:
        os.umask(mask)
    assert (tmp_path / "m").stat().st_mode & 0o777 == 0o755
    for p in (tmp_path / "m").iterdir():
        assert p.stat().st_mode & 0o777 == 0o644, p

"""DiffusionPipeline loading: model_index.json checks, components of other libraries, the hub cache."""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers
from support.hub_cache import add_to_cache

from fusediff import DDIMPipeline, DDIMScheduler, DiffusionPipeline, UNet2DModel

UNET = dict(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 8),
            down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
            norm_num_groups=4)


class TextPipeline(DiffusionPipeline):
    """A pipeline with a transformers component, as Stable Diffusion has."""

    def __init__(self, unet: UNet2DModel, scheduler: DDIMScheduler, text_encoder=None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, text_encoder=text_encoder)


def _tiny_clip():
    config = transformers.CLIPTextConfig(vocab_size=64, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=16)
    torch.manual_seed(0)
    return transformers.CLIPTextModel(config).eval()


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    pipe = DDIMPipeline(unet=UNet2DModel(**UNET), scheduler=DDIMScheduler(num_train_timesteps=50))
    pipe.save_pretrained(tmp_path / "pipe")
    return tmp_path / "pipe", pipe


def _edit_index(directory, **changes):
    path = directory / "model_index.json"
    index = json.loads(path.read_text())
    index.update(changes)
    path.write_text(json.dumps(index))


def test_transformers_component_round_trip(tmp_path):
    torch.manual_seed(0)
    pipe = TextPipeline(UNet2DModel(**UNET), DDIMScheduler(), text_encoder=_tiny_clip())
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    loaded = TextPipeline.from_pretrained(tmp_path, torch_dtype=torch.float64)
    assert isinstance(loaded.text_encoder, transformers.CLIPTextModel)
    assert loaded.text_encoder.dtype == torch.float64 and loaded.unet.dtype == torch.float64
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        expected = pipe.text_encoder(ids).last_hidden_state.double()
        got = loaded.text_encoder(ids).last_hidden_state
    assert torch.allclose(got, expected, atol=1e-6), (got - expected).abs().max()


def test_optional_component_saved_as_null(tmp_path):
    pipe = TextPipeline(UNet2DModel(**UNET), DDIMScheduler(), text_encoder=None)
    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["text_encoder"] == [None, None]
    assert TextPipeline.from_pretrained(tmp_path).text_encoder is None


@pytest.mark.parametrize("entry, message", [
    ({"unet": ["os", "system"]}, "names library 'os'"),
    ({"unet": ["diffusers", "NoSuchModel"]}, "NoSuchModel"),
    ({"unet": "not-a-pair"}, "unet"),
    ({"_class_name": "NoSuchPipeline"}, "NoSuchPipeline"),
])
def test_bad_model_index(saved, entry, message):
    directory, _ = saved
    _edit_index(directory, **entry)
    with pytest.raises((ValueError, TypeError), match=message):
        DiffusionPipeline.from_pretrained(directory)


def test_index_names_outside_the_directory_are_never_opened(saved, caplog):
    directory, _ = saved
    _edit_index(directory, **{"../unet": ["diffusers", "UNet2DModel"], "/etc": ["diffusers", "UNet2DModel"]})
    loaded = DiffusionPipeline.from_pretrained(directory)  # names that are no argument are ignored, with a warning
    assert "'../unet'" in caplog.text and "'/etc'" in caplog.text
    assert set(loaded.components) == {"unet", "scheduler"}


def test_missing_component_folder_and_entry(saved):
    directory, _ = saved
    os.rename(directory / "unet", directory / "unet-moved")
    with pytest.raises(FileNotFoundError, match="component 'unet' has no folder"):
        DiffusionPipeline.from_pretrained(directory)
    index = json.loads((directory / "model_index.json").read_text())
    del index["unet"]
    (directory / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="lacks component"):
        DiffusionPipeline.from_pretrained(directory)


def test_not_a_pipeline_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no model_index.json"):
        DiffusionPipeline.from_pretrained(tmp_path)


def test_pickled_component_weights_refused(saved):
    directory, pipe = saved
    (directory / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(pipe.unet.state_dict(), directory / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match="pickled weights"):
        DiffusionPipeline.from_pretrained(directory)
    assert DiffusionPipeline.from_pretrained(directory, allow_pickle=True).unet.config.sample_size == 8


def test_failed_pipeline_save_keeps_old_directory(saved, monkeypatch):
    directory, pipe = saved
    before = {p.relative_to(directory): p.read_bytes() for p in directory.rglob("*") if p.is_file()}
    monkeypatch.setattr(DDIMScheduler, "save_pretrained", lambda self, d: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError, match="boom"):
        pipe.save_pretrained(directory)
    after = {p.relative_to(directory): p.read_bytes() for p in directory.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in directory.parent.iterdir()) == ["pipe"]


def test_pipeline_from_hub_cache_offline(saved, tmp_path):
    directory, pipe = saved
    add_to_cache(tmp_path / "cache", "fusediff-test/pipe", directory)
    loaded = DiffusionPipeline.from_pretrained("fusediff-test/pipe", cache_dir=tmp_path / "cache", local_files_only=True)
    assert isinstance(loaded, DDIMPipeline)
    for k, v in pipe.unet.state_dict().items():
        assert torch.equal(loaded.unet.state_dict()[k], v), k
    with pytest.raises(FileNotFoundError, match="could not find"):
        DiffusionPipeline.from_pretrained("fusediff-test/other", cache_dir=tmp_path / "cache", local_files_only=True)

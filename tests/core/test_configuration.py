"""ConfigMixin: the constructor's arguments as a frozen config, JSON round trips, from_config."""

from __future__ import annotations

import copy
import json
import logging
import pickle

import numpy as np
import pytest

from fusediff.configuration import ConfigMixin, FrozenDict, register_to_config


class Toy(ConfigMixin):
    config_name = "toy_config.json"
    ignore_for_config = ("verbose",)

    @register_to_config
    def __init__(self, width: int = 8, sizes: tuple[int, ...] = (1, 2), mode: str = "a", verbose: bool = False):
        self.built_with = (width, sizes, mode, verbose)


class ToyRelative(ConfigMixin):
    config_name = "toy_config.json"
    _compatibles = ()

    @register_to_config
    def __init__(self, width: int = 4, depth: int = 2):
        pass


def test_config_is_the_signature_with_defaults():
    toy = Toy(16, mode="b")
    assert dict(toy.config) == {"width": 16, "sizes": (1, 2), "mode": "b", "_use_default_values": ["sizes"]}
    assert toy.config.width == 16 and toy.config["mode"] == "b"
    assert "verbose" not in toy.config  # ignore_for_config
    assert toy.built_with == (16, (1, 2), "b", False)


@pytest.mark.parametrize("write", [
    lambda c: c.__setitem__("width", 1),
    lambda c: setattr(c, "width", 1),
    lambda c: c.update(width=1),
    lambda c: c.pop("width"),
    lambda c: c.__delitem__("width"),
    lambda c: c.setdefault("new", 1),
    lambda c: c.clear(),
])
def test_config_is_frozen(write):
    toy = Toy()
    with pytest.raises(TypeError, match="frozen"):
        write(toy.config)
    assert toy.config.width == 8


def test_config_attribute_cannot_be_replaced():
    toy = Toy()
    with pytest.raises(AttributeError, match="frozen"):
        toy.config = {"width": 1}


def test_frozen_dict_copies_and_pickles():
    cfg = FrozenDict(a=1, b=[2])
    for clone in (copy.deepcopy(cfg), pickle.loads(pickle.dumps(cfg)), copy.copy(cfg)):
        assert isinstance(clone, FrozenDict) and clone == cfg
        with pytest.raises(TypeError):
            clone["a"] = 2
    with pytest.raises(AttributeError, match="no key 'missing'"):
        cfg.missing


def test_save_load_round_trip(tmp_path):
    toy = Toy(width=3, sizes=(4, 5, 6), mode="c")
    toy.save_config(tmp_path)
    saved = json.loads((tmp_path / "toy_config.json").read_text())
    assert saved["_class_name"] == "Toy" and "_diffusers_version" in saved
    assert saved["sizes"] == [4, 5, 6]
    loaded = Toy.from_config(Toy.load_config(tmp_path))
    assert loaded.config["sizes"] == [4, 5, 6] and loaded.config.width == 3 and loaded.config.mode == "c"
    again = tmp_path / "again"
    loaded.save_config(again)
    assert json.loads((again / "toy_config.json").read_text()) == saved


def test_numpy_values_are_saved_as_lists(tmp_path):
    Toy(sizes=np.array([1.5, 2.5])).save_config(tmp_path)
    assert json.loads((tmp_path / "toy_config.json").read_text())["sizes"] == [1.5, 2.5]


def test_unsavable_value_raises(tmp_path):
    with pytest.raises(TypeError, match="cannot be saved as JSON"):
        Toy(mode=object()).save_config(tmp_path)
    assert not (tmp_path / "toy_config.json").exists()


def test_from_config_overrides_and_keeps_unknown_keys(caplog):
    source = Toy(width=5, sizes=(3, 4))
    with caplog.at_level(logging.WARNING, logger="fusediff.configuration"):
        other = ToyRelative.from_config(source.config, depth=7)
    assert other.config.width == 5 and other.config.depth == 7
    assert other.config["sizes"] == (3, 4)  # kept, unused
    assert "sizes" in caplog.text  # and reported
    assert "mode" not in other.config and "mode" not in caplog.text  # Toy's default, not a choice: dropped
    with pytest.raises(TypeError, match="takes no argument"):
        ToyRelative.from_config(source.config, colour="red")


def test_from_config_leaves_defaults_to_the_new_class():
    assert ToyRelative.from_config(Toy().config).config.width == 4  # Toy's default 8 was not chosen
    assert ToyRelative.from_config(Toy(width=8).config).config.width == 8
    assert Toy.from_config(Toy(width=3).config).config["_use_default_values"] == ["mode", "sizes"]


def test_from_config_rejects_non_mappings():
    with pytest.raises(TypeError, match="config mapping"):
        Toy.from_config([1, 2])


def test_load_config_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        Toy.load_config(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="has no toy_config.json"):
        Toy.load_config(tmp_path)
    (tmp_path / "toy_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Toy.load_config(tmp_path)
    (tmp_path / "toy_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        Toy.load_config(tmp_path)


def test_register_needs_config_mixin():
    class Plain:
        @register_to_config
        def __init__(self, a=1):
            pass

    with pytest.raises(TypeError, match="ConfigMixin"):
        Plain()

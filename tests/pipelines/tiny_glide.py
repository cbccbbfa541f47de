"""Tiny random GLIDE pipeline directories, built offline: a checkpoint in glide-text2im's layout
(tests/models/glide_reference.py), a small byte-level BPE vocabulary, and ``convert_glide`` over both.

The vocabulary has GPT-2's 256 byte symbols, a few merges (so BPE merging is exercised: "corgi" becomes
"Ġcorg" + "i") and "<|endoftext|>" as the last id, glide-text2im's padding token; it is written as
``vocab.json`` + ``merges.txt`` (GPT-2's file names) or gzipped ``encoder.json.gz`` + ``vocab.bpe.gz``
(glide-text2im's).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch

from fusediff.models.glide_unet import glide_options
from fusediff.pipelines.glide_convert import convert_glide

from models import glide_reference as ref

MERGES = [("Ġ", "a"), ("c", "o"), ("r", "g"), ("co", "rg"), ("Ġ", "corg"), ("i", "n"), ("Ġ", "o"), ("i", "l"),
          ("Ġ", "p"), ("a", "in")]


def vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    symbols = list(ref.bytes_to_unicode().values())
    symbols += ["".join(m) for m in MERGES] + ["<|endoftext|>"]
    return {s: i for i, s in enumerate(symbols)}, MERGES


N_VOCAB = len(vocabulary()[0])


def write_vocabulary(directory: Path, glide_names: bool = False) -> Path:
    """The vocabulary as GPT-2's files, or (``glide_names``) as glide-text2im's gzipped ones."""
    directory.mkdir(parents=True, exist_ok=True)
    encoder, merges = vocabulary()
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    if glide_names:
        with gzip.open(directory / "encoder.json.gz", "wt", encoding="utf-8") as f:
            json.dump(encoder, f)
        with gzip.open(directory / "vocab.bpe.gz", "wt", encoding="utf-8") as f:
            f.write(merges_text)
    else:
        (directory / "vocab.json").write_text(json.dumps(encoder), encoding="utf-8")
        (directory / "merges.txt").write_text(merges_text, encoding="utf-8")
    return directory


def tiny_options(kind: str) -> dict:
    overrides = dict(ref.TINY, n_vocab=N_VOCAB)
    return glide_options(kind, overrides)


def build_glide(tmp: Path, kind: str = "base", seed: int = 0) -> tuple[Path, dict, dict]:
    """(pipeline directory, the original state dict, its options) of a tiny random GLIDE model of ``kind``."""
    options = tiny_options(kind)
    state = ref.random_state_dict(options, seed=seed)
    torch.save(state, tmp / f"{kind}.pt")
    vocab = write_vocabulary(tmp / "vocab", glide_names=True)
    out = convert_glide(tmp / f"{kind}.pt", tmp / f"glide-{kind}", kind, tokenizer_dir=vocab,
                        options=dict(ref.TINY, n_vocab=N_VOCAB))
    return out, state, options


def glide_tokens(texts: list[str], text_ctx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """glide-text2im's ``encode`` + ``padded_tokens_and_mask`` over the tiny vocabulary (the test's transcription)."""
    encoder, merges = vocabulary()
    end = len(encoder) - 1
    rows, masks = [], []
    for text in texts:
        ids = ref.bpe_encode(text, encoder, merges)[:text_ctx] if text else []
        rows.append(ids + [end] * (text_ctx - len(ids)))
        masks.append([True] * len(ids) + [False] * (text_ctx - len(ids)))
    return torch.tensor(rows), torch.tensor(masks, dtype=torch.bool)

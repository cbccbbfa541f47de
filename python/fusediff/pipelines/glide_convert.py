"""Convert a released GLIDE checkpoint (glide-text2im's ``base.pt``, ``upsample.pt``, ``base_inpaint.pt``,
``upsample_inpaint.pt``) into a fusediff pipeline directory (``fusediff convert glide``).

    checkpoint (torch state dict, loaded with weights_only=True)
      -> every tensor checked against the names and shapes of the kind's published model
         (missing, unexpected and mis-shaped tensors refused, each named)
      -> text_encoder/ (GlideTextEncoder: the checkpoint's own names), unet/ (UNet2DConditionModel:
         diffusers' names), scheduler/ (DDPMScheduler, learned_range), tokenizer/ (if given),
         model_index.json; written atomically as one directory (safetensors only)

The mapping is written from the checkpoint's parameter names (glide-text2im's ``unet.py`` and
``text2im_model.py`` module tree): ``input_blocks.<k>`` (``k = 0``: the first conv; then per level
``num_res_blocks`` x [ResBlock, AttentionBlock?] and a down-sampling ResBlock), ``middle_block.{0,1,2}``,
``output_blocks.<j>`` (per level ``num_res_blocks + 1`` x [ResBlock, AttentionBlock?, up-sampling
ResBlock at the last]), ``time_embed.{0,2}``, ``out.{0,2}``. In a ResBlock ``in_layers.{0,2}``,
``emb_layers.1``, ``out_layers.{0,3}``, ``skip_connection`` are ``norm1``, ``conv1``, ``time_emb_proj``,
``norm2``, ``conv2``, ``conv_shortcut``. An AttentionBlock's 1x1 Conv1d weights become Linear weights;
its ``qkv`` packs [q_h | k_h | v_h] per head h (``QKVAttention`` splits it so), split into ``to_q``,
``to_k``, ``to_v``; ``encoder_kv`` packs [k_h | v_h] per head, split into ``add_k_proj``, ``add_v_proj``.

Tokenizer: glide-text2im's ``model_creation`` tokenizes with ``tokenizer/bpe.py``'s ``get_encoder``, GPT-2's
byte-level BPE (``encoder.json.gz`` + ``vocab.bpe.gz``, 50257 tokens; not the CLIP ``bpe_simple_vocab``
file, which only its CLIP-guidance model uses). transformers' ``GPT2Tokenizer`` gives the same ids for
lower-cased text when special tokens are split (see :mod:`.glide_common`); given ``tokenizer_dir`` (a
directory holding ``encoder.json[.gz]`` and ``vocab.bpe[.gz]``, or ``vocab.json`` and ``merges.txt``) the
converter writes one into ``tokenizer/``. Without it the directory has no tokenizer and the pipeline needs
``tokenizer=`` (any GPT2Tokenizer of that vocabulary) or token ids.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..models.glide_text_encoder import GlideTextEncoder
from ..models.glide_unet import channel_mult, glide_options, text_encoder_config, unet_config
from ..models.unet_2d_condition import UNet2DConditionModel
from ..pipeline_directory import model_index, save_pipeline_directory
from ..schedulers.scheduling_ddpm import DDPMScheduler

PIPELINES = {"base": "GlidePipeline", "upsample": "GlideUpsamplePipeline", "base-inpaint": "GlideInpaintPipeline",
             "upsample-inpaint": "GlideUpsampleInpaintPipeline"}
_RESBLOCK = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
             "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def scheduler_config(options: Mapping[str, Any]) -> dict[str, Any]:
    """The DDPMScheduler of GLIDE's diffusion: its beta schedule over ``diffusion_steps``, learned-range
    variance, eps prediction, x0 clipped to [-1, 1] (glide-text2im samples with ``clip_denoised=True``)."""
    schedule = {"squaredcos_cap_v2": "squaredcos_cap_v2", "linear": "linear"}.get(options["noise_schedule"])
    if schedule is None:
        raise NotImplementedError(f"GLIDE noise_schedule {options['noise_schedule']!r} is not supported")
    steps = options["diffusion_steps"]
    scale = 1000 / steps  # glide-text2im's linear schedule is Ho et al.'s, stretched to any step count
    return dict(num_train_timesteps=steps, beta_schedule=schedule, beta_start=scale * 1e-4, beta_end=scale * 0.02,
                variance_type="learned_range", prediction_type="epsilon", clip_sample=True, clip_sample_range=1.0)


# -- the name map: checkpoint name -> (our names, how) --------------------------------------------------
def _module_map(options: Mapping[str, Any], unet: torch.nn.Module) -> dict[str, tuple[str, str]]:
    """GLIDE module prefix -> (our module prefix, kind), kind one of resblock, attention, plain."""
    levels, blocks = len(channel_mult(options)), options["num_res_blocks"]
    mapping = {"time_embed.0": ("time_embedding.linear_1", "plain"), "time_embed.2": ("time_embedding.linear_2", "plain"),
               "input_blocks.0.0": ("conv_in", "plain"), "out.0": ("conv_norm_out", "plain"),
               "out.2": ("conv_out", "plain"), "middle_block.0": ("mid_block.resnets.0", "resblock"),
               "middle_block.1": ("mid_block.attentions.0", "attention"),
               "middle_block.2": ("mid_block.resnets.1", "resblock")}
    k = 0
    for level in range(levels):
        down = unet.down_blocks[level]
        for i in range(blocks):
            k += 1
            mapping[f"input_blocks.{k}.0"] = (f"down_blocks.{level}.resnets.{i}", "resblock")
            if getattr(down, "attentions", None) is not None and len(down.attentions):
                mapping[f"input_blocks.{k}.1"] = (f"down_blocks.{level}.attentions.{i}", "attention")
        if level != levels - 1:
            k += 1
            mapping[f"input_blocks.{k}.0"] = (f"down_blocks.{level}.downsamplers.0", "resblock")
    j = 0
    for u in range(levels):  # up block u is GLIDE's level levels - 1 - u
        up = unet.up_blocks[u]
        attends = getattr(up, "attentions", None) is not None and len(up.attentions) > 0
        for i in range(blocks + 1):
            mapping[f"output_blocks.{j}.0"] = (f"up_blocks.{u}.resnets.{i}", "resblock")
            if attends:
                mapping[f"output_blocks.{j}.1"] = (f"up_blocks.{u}.attentions.{i}", "attention")
            if u != levels - 1 and i == blocks:
                mapping[f"output_blocks.{j}.{1 + attends}"] = (f"up_blocks.{u}.upsamplers.0", "resblock")
            j += 1
    return mapping


def _rules(options: Mapping[str, Any], unet: torch.nn.Module, text_encoder: torch.nn.Module
           ) -> dict[str, tuple[str, list[str], str]]:
    """Checkpoint tensor name -> (component, our tensor names, transform), for every tensor the model has."""
    ours = dict(unet.state_dict())
    rules: dict[str, tuple[str, list[str], str]] = {}
    for glide, (mine, kind) in _module_map(options, unet).items():
        if kind == "plain":
            parts = {"": ""}
        elif kind == "resblock":
            parts = {f".{g}": f".{m}" for g, m in _RESBLOCK.items() if f"{mine}.{m}.weight" in ours}
        else:
            parts = {".norm": ".group_norm", ".proj_out": ".to_out.0", ".qkv": "qkv", ".encoder_kv": "kv"}
        for g, m in parts.items():
            for p in ("weight", "bias"):
                name = f"{glide}{g}.{p}"
                if m == "qkv":
                    rules[name] = ("unet", [f"{mine}.{t}.{p}" for t in ("to_q", "to_k", "to_v")], "heads")
                elif m == "kv":
                    rules[name] = ("unet", [f"{mine}.{t}.{p}" for t in ("add_k_proj", "add_v_proj")], "heads")
                else:
                    conv1d = kind == "attention" and m == ".to_out.0" and p == "weight"
                    rules[name] = ("unet", [f"{mine}{m}.{p}"], "conv1d" if conv1d else "copy")
    for name in text_encoder.state_dict():
        rules[name] = ("text_encoder", [name], "copy")
    return rules


def _expected_shape(targets: list[torch.Tensor], how: str) -> tuple[int, ...]:
    """The checkpoint shape that converts to ``targets``' shapes."""
    first = tuple(targets[0].shape)
    if how == "copy":
        return first
    if how == "conv1d":
        return (*first, 1)
    rows = first[0] * len(targets)  # q, k, v (or k, v) stacked, weights as 1x1 Conv1d
    return (rows, first[1], 1) if len(first) == 2 else (rows,)


def _split_heads(tensor: torch.Tensor, parts: int, head_dim: int) -> list[torch.Tensor]:
    """[x_h^1 | ... | x_h^parts] per head h (GLIDE's packing) -> one tensor per part, heads in order."""
    rows = tensor.shape[0] // parts
    heads = rows // head_dim
    t = tensor.reshape(heads, parts, head_dim, *tensor.shape[1:])
    return [t[:, i].reshape(rows, *tensor.shape[1:]).squeeze(-1).contiguous() if t.dim() > 3 else
            t[:, i].reshape(rows).contiguous() for i in range(parts)]


def _describe(names: list[str], limit: int = 12) -> str:
    return ", ".join(names[:limit]) + (f" ... ({len(names)} in all)" if len(names) > limit else "")


def convert_state_dict(state: Mapping[str, torch.Tensor], options: Mapping[str, Any], *,
                       dtype: torch.dtype | None = torch.float32, source: str = "checkpoint"
                       ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(text-encoder state, UNet state) of a GLIDE state dict; ValueError naming every missing, unexpected
    or mis-shaped tensor (checkpoint names) if it is not exactly the model of ``options``."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config(options))
        text_encoder = GlideTextEncoder(**text_encoder_config(options))
    rules = _rules(options, unet, text_encoder)
    shapes = {"unet": dict(unet.state_dict()), "text_encoder": dict(text_encoder.state_dict())}
    not_tensors = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    missing = sorted(set(rules) - set(state))
    unexpected = sorted(set(state) - set(rules) - set(not_tensors))
    wrong = []
    for name in sorted(set(rules) & set(state)):
        component, targets, how = rules[name]
        want = _expected_shape([shapes[component][t] for t in targets], how)
        if name not in not_tensors and tuple(state[name].shape) != want:
            wrong.append(f"{name} {tuple(state[name].shape)} (expected {want})")
    problems = [f"{label} {len(names)}: {_describe(names)}" for label, names in
                (("missing", missing), ("unexpected", unexpected), ("mis-shaped", wrong),
                 ("not tensors", not_tensors)) if names]
    if problems:
        raise ValueError(f"{source} is not a GLIDE {'/'.join(k for k in ('super_res', 'inpaint') if options[k]) or 'base'}"
                         f" model of these options: " + "; ".join(problems))
    out: dict[str, dict[str, torch.Tensor]] = {"unet": {}, "text_encoder": {}}
    head_dim = options["num_head_channels"]
    for name, (component, targets, how) in rules.items():
        tensor = state[name]
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        if how == "heads":
            pieces = _split_heads(tensor, len(targets), head_dim)
        elif how == "conv1d":
            pieces = [tensor.squeeze(-1)]
        else:
            pieces = [tensor]
        for target, piece in zip(targets, pieces):
            out[component][target] = piece.contiguous()
    return out["text_encoder"], out["unet"]


# -- files ---------------------------------------------------------------------------------------------
def load_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A GLIDE ``.pt`` state dict, unpickled safely (``weights_only=True``: tensors and containers only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GLIDE checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, refused globals, a truncated file
        raise ValueError(f"cannot read {str(path)!r} as a torch state dict (loaded with weights_only=True): {e}"
                         ) from None
    if not isinstance(state, Mapping):
        raise ValueError(f"{str(path)!r} holds a {type(state).__name__}, not a state dict")
    return dict(state)


def _text_file(directory: Path, *names: str) -> Path | None:
    """The first of ``names`` (or its .gz) in ``directory``, unzipped into a temporary file if needed."""
    for name in names:
        if (directory / name).is_file():
            return directory / name
        if (directory / f"{name}.gz").is_file():
            fd, tmp = tempfile.mkstemp(suffix=f"-{name}")
            with os.fdopen(fd, "wb") as out, gzip.open(directory / f"{name}.gz", "rb") as src:
                shutil.copyfileobj(src, out)
            return Path(tmp)
    return None


def load_tokenizer(directory: str | os.PathLike) -> Any:
    """transformers' GPT2Tokenizer from GLIDE's tokenizer files (encoder.json[.gz] + vocab.bpe[.gz]) or
    GPT-2's (vocab.json + merges.txt) in ``directory``."""
    from transformers import GPT2Tokenizer

    directory = Path(directory)
    vocab = _text_file(directory, "vocab.json", "encoder.json")
    merges = _text_file(directory, "merges.txt", "vocab.bpe")
    if vocab is None or merges is None:
        raise FileNotFoundError(f"{str(directory)!r} holds no BPE vocabulary: expected encoder.json[.gz] and "
                                "vocab.bpe[.gz] (glide_text2im/tokenizer/) or vocab.json and merges.txt")
    return GPT2Tokenizer(str(vocab), str(merges))


def convert_glide(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, kind: str = "base", *,
                  tokenizer_dir: str | os.PathLike | None = None, options: Mapping[str, Any] | None = None,
                  dtype: torch.dtype = torch.float32) -> Path:
    """Convert ``checkpoint`` of ``kind`` (base, upsample, base-inpaint, upsample-inpaint) into a pipeline
    directory ``out_dir``; ``options`` override the kind's published hyperparameters (glide-text2im names).
    Returns ``out_dir``. Nothing is written unless every tensor fits."""
    opts = glide_options(kind, options)
    state = load_checkpoint(checkpoint)
    text_state, unet_state = convert_state_dict(state, opts, dtype=dtype, source=str(checkpoint))
    tokenizer = load_tokenizer(tokenizer_dir) if tokenizer_dir is not None else None
    if tokenizer is not None and tokenizer.vocab_size != opts["n_vocab"]:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens; the model's embedding has "
                         f"{opts['n_vocab']}")
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config(opts))
        text_encoder = GlideTextEncoder(**text_encoder_config(opts))
    unet.load_state_dict(unet_state, strict=True, assign=True)
    text_encoder.load_state_dict(text_state, strict=True, assign=True)
    components = dict(tokenizer=tokenizer, text_encoder=text_encoder, unet=unet,
                      scheduler=DDPMScheduler(**scheduler_config(opts)))
    save_pipeline_directory(out_dir, model_index(PIPELINES[kind], components), components)
    return Path(out_dir)

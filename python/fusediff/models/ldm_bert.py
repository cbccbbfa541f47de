"""LDMBert: the text encoder of CompVis' LDM text-to-image model (Rombach et al. 2022, appendix E.2).

A pre-norm BERT-style transformer encoder (a BART encoder layout): token + learned position
embeddings, ``encoder_layers`` layers of

    h = h + out_proj(attn(LN(h)))          multi-head self-attention, q scaled by head_dim^-1/2
    h = h + fc2(act(fc1(LN(h))))

and a final LayerNorm; ``to_logits`` (a vocabulary head) is kept for checkpoint compatibility
but not used by ``forward``. This is a plain torch module with the config keys, parameter names
and file format of diffusers' ``LDMBertModel`` (a transformers ``PreTrainedModel``): a directory
holds ``config.json`` (``model_type`` "ldmbert") and ``model.safetensors``, so it loads from and
saves to what diffusers/transformers write, without transformers installed. Pickled
``pytorch_model.bin`` weights are read only with ``allow_pickle=True``. Dropout is ignored
(inference only); the attention mask is an optional (B, S) 0/1 padding mask.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..configuration import register_to_config
from ..hub import PICKLE_PATTERNS, resolve_directory
from ..modeling import ModelMixin, check_state_dict
from ..utils.io import atomic_directory, contained_path, read_json, write_json
from ..utils.outputs import BaseOutput

WEIGHTS_FILE = "model.safetensors"
PICKLED_WEIGHTS_FILE = "pytorch_model.bin"
# keys transformers writes into every config.json; not LDMBert arguments
_TRANSFORMERS_KEYS = ("architectures", "model_type", "transformers_version", "torch_dtype", "dtype",
                      "num_hidden_layers", "_name_or_path", "bos_token_id", "eos_token_id", "id2label", "label2id",
                      "output_attentions", "output_hidden_states", "return_dict", "is_encoder_decoder",
                      "tie_word_embeddings", "chunk_size_feed_forward", "problem_type", "add_cross_attention")
_ACTIVATIONS = {
    "gelu": nn.functional.gelu,
    "relu": nn.functional.relu,
    "silu": nn.functional.silu,
    "swish": nn.functional.silu,
    "gelu_new": lambda x: nn.functional.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: nn.functional.gelu(x, approximate="tanh"),
}


@dataclasses.dataclass
class LDMBertOutput(BaseOutput):
    """``last_hidden_state`` (B, S, d_model); ``hidden_states``: the input of each layer and the output."""

    last_hidden_state: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None


class LDMBertAttention(nn.Module):
    """Multi-head self-attention with head_dim independent of the model width."""

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        inner = num_heads * head_dim
        self.k_proj = nn.Linear(embed_dim, inner, bias=False)
        self.v_proj = nn.Linear(embed_dim, inner, bias=False)
        self.q_proj = nn.Linear(embed_dim, inner, bias=False)
        self.out_proj = nn.Linear(inner, embed_dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, S, H*D) -> (B*H, S, D)
        b, s, _ = x.shape
        return x.view(b, s, self.num_heads, self.head_dim).transpose(1, 2).reshape(b * self.num_heads, s, -1)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        b, s, _ = x.shape
        q = self._heads(self.q_proj(x) * self.head_dim**-0.5)
        k, v = self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
        scores = torch.bmm(q, k.transpose(1, 2))  # (B*H, S, S)
        if bias is not None:  # (B, 1, S, S) additive padding mask
            scores = (scores.view(b, self.num_heads, s, s) + bias).view(b * self.num_heads, s, s)
        out = torch.bmm(scores.softmax(dim=-1), v)  # (B*H, S, D)
        out = out.view(b, self.num_heads, s, self.head_dim).transpose(1, 2).reshape(b, s, -1)
        return self.out_proj(out)


class LDMBertEncoderLayer(nn.Module):
    def __init__(self, d_model: int, heads: int, head_dim: int, ffn_dim: int, activation: str) -> None:
        super().__init__()
        self.self_attn = LDMBertAttention(d_model, heads, head_dim)
        self.self_attn_layer_norm = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, d_model)
        self.final_layer_norm = nn.LayerNorm(d_model)
        self.activation = _ACTIVATIONS[activation]

    def forward(self, h: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        h = h + self.self_attn(self.self_attn_layer_norm(h), bias)
        h = h + self.fc2(self.activation(self.fc1(self.final_layer_norm(h))))
        if h.dtype == torch.float16 and not torch.isfinite(h).all():  # as diffusers: keep fp16 finite
            limit = torch.finfo(h.dtype).max - 1000
            h = h.clamp(-limit, limit)
        return h


class LDMBertEncoder(nn.Module):
    def __init__(self, vocab_size: int, max_positions: int, d_model: int, layers: list[LDMBertEncoderLayer]) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_size, d_model)
        self.embed_positions = nn.Embedding(max_positions, d_model)
        self.layers = nn.ModuleList(layers)
        self.layer_norm = nn.LayerNorm(d_model)


class LDMBertModel(ModelMixin):
    """LDM's text encoder; ``model(input_ids)[0]`` is the (B, S, d_model) conditioning of the UNet.

    Args mirror diffusers' ``LDMBertConfig`` (the dropout rates, ``use_cache``, ``encoder_layerdrop``
    and ``scale_embedding`` are kept in the config but have no effect, as in diffusers' forward).
    """

    config_name = "config.json"
    # model_index.json names it ["latent_diffusion", "LDMBertModel"], where diffusers defines it
    _diffusers_library = "latent_diffusion"

    @register_to_config
    def __init__(self, vocab_size: int = 30522, max_position_embeddings: int = 77, encoder_layers: int = 32,
                 encoder_ffn_dim: int = 5120, encoder_attention_heads: int = 8, head_dim: int = 64,
                 encoder_layerdrop: float = 0.0, activation_function: str = "gelu", d_model: int = 1280,
                 dropout: float = 0.1, attention_dropout: float = 0.0, activation_dropout: float = 0.0,
                 init_std: float = 0.02, classifier_dropout: float = 0.0, scale_embedding: bool = False,
                 use_cache: bool = True, pad_token_id: int = 0) -> None:
        super().__init__()
        if activation_function not in _ACTIVATIONS:
            raise ValueError(f"activation_function {activation_function!r} is not supported; "
                             f"use one of {', '.join(_ACTIVATIONS)}")
        layers = [LDMBertEncoderLayer(d_model, encoder_attention_heads, head_dim, encoder_ffn_dim,
                                      activation_function) for _ in range(encoder_layers)]
        self.model = LDMBertEncoder(vocab_size, max_position_embeddings, d_model, layers)
        self.to_logits = nn.Linear(d_model, vocab_size)
        for module in self.modules():  # the init of transformers' LDMBertPreTrainedModel
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=init_std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                output_hidden_states: bool = False, return_dict: bool = True) -> LDMBertOutput | tuple:
        """Hidden states of ``input_ids`` (B, S), S <= max_position_embeddings."""
        seq = input_ids.shape[-1]
        if seq > self.config.max_position_embeddings:
            raise ValueError(f"input has {seq} tokens; the model has {self.config.max_position_embeddings} positions")
        enc = self.model
        positions = torch.arange(seq, device=input_ids.device).expand(1, -1)
        h = enc.embed_tokens(input_ids.view(-1, seq)) + enc.embed_positions(positions)
        bias = None
        if attention_mask is not None:  # (B, S) 1 = attend -> (B, 1, S, S) additive: 0 or the dtype's minimum
            keep = attention_mask[:, None, None, :].expand(-1, 1, seq, seq).to(h.dtype)
            bias = (1.0 - keep).masked_fill((1.0 - keep).bool(), torch.finfo(h.dtype).min)
        states = []
        for layer in enc.layers:
            states.append(h)
            h = layer(h, bias)
        h = enc.layer_norm(h)
        states.append(h)
        out = LDMBertOutput(last_hidden_state=h, hidden_states=tuple(states) if output_hidden_states else None)
        return out if return_dict else out.to_tuple()

    # -- transformers' file format -----------------------------------------------------------
    def config_dict_to_save(self) -> dict[str, Any]:
        """config.json as transformers writes LDMBertConfig: the arguments plus model_type and architectures."""
        data = {k: v for k, v in super().config_dict_to_save().items() if not k.startswith("_")}
        data.update(architectures=["LDMBertModel"], model_type="ldmbert", num_hidden_layers=self.config.encoder_layers,
                    dtype=str(self.dtype).removeprefix("torch."))
        return dict(sorted(data.items()))

    def save_pretrained(self, save_directory: str | os.PathLike, *, variant: str | None = None) -> None:
        """Write ``config.json`` and ``model.safetensors`` (``model.<variant>.safetensors``), atomically."""
        from safetensors.torch import save_file

        state = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        name = f"model.{variant}.safetensors" if variant else WEIGHTS_FILE
        with atomic_directory(save_directory) as tmp:
            write_json(tmp / self.config_name, self.config_dict_to_save())
            save_file(state, str(tmp / name), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *, subfolder: str | None = None,
                        torch_dtype: torch.dtype | None = None, variant: str | None = None,
                        allow_pickle: bool = False, **hub_kwargs: Any) -> LDMBertModel:
        """Load from a directory (or Hub repo) that diffusers/transformers or fusediff saved; eval mode, CPU."""
        prefix = f"{subfolder}/" if subfolder else ""
        ignore = None if allow_pickle else [prefix + p for p in PICKLE_PATTERNS]
        directory = Path(resolve_directory(pretrained_model_name_or_path, subfolder=subfolder,
                                           allow_patterns=[prefix + "*"], ignore_patterns=ignore, **hub_kwargs))
        config_path = directory / cls.config_name
        if not config_path.is_file():
            raise FileNotFoundError(f"{str(directory)!r} has no {cls.config_name}")
        config = read_json(config_path)
        if config.get("model_type", "ldmbert") != "ldmbert":
            raise ValueError(f"{str(config_path)!r} describes a {config['model_type']!r} model, not 'ldmbert'")
        model = cls.from_config({k: v for k, v in config.items() if k not in _TRANSFORMERS_KEYS})
        state, source = _load_state(directory, variant, allow_pickle)
        check_state_dict(model, state, repr(str(source)))
        model.load_state_dict(state, strict=True)
        if torch_dtype is not None:
            model.to(torch_dtype)
        return model.eval()


def _load_state(directory: Path, variant: str | None, allow_pickle: bool) -> tuple[dict[str, torch.Tensor], Path]:
    from safetensors.torch import load_file

    infix = f".{variant}" if variant else ""
    single = directory / f"model{infix}.safetensors"
    if single.is_file():
        return load_file(str(single), device="cpu"), single
    index = directory / f"model{infix}.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(str(contained_path(directory, shard)), device="cpu"))
        return state, index
    pickled = directory / f"pytorch_model{infix}.bin"
    if pickled.is_file():
        if not allow_pickle:
            raise ValueError(f"{str(pickled)!r} holds pickled weights, which can run code when loaded; fusediff "
                             "loads safetensors only. Convert it, or pass allow_pickle=True if you trust its source.")
        return torch.load(pickled, map_location="cpu", weights_only=True), pickled
    raise FileNotFoundError(f"no {single.name} in {str(directory)!r}")

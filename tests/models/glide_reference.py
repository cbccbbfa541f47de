"""glide-text2im's GLIDE written out for the tests: its parameter layout, its forward and its sampling loop.

glide_text2im is not installed here (nor imported); what follows transcribes openai/glide-text2im
(commit of its main branch, files named per function) for a tiny config, as plain functions over a
state dict with the ORIGINAL names and shapes, so the converter reads the checkpoint layout as published:

- :func:`layout` / :func:`random_state_dict`: ``unet.py`` ``UNetModel.__init__`` (input_blocks, middle_block,
  output_blocks, out, time_embed), ``ResBlock.__init__`` / ``AttentionBlock.__init__`` (sub-module names),
  ``text2im_model.py`` ``Text2ImUNet.__init__`` (token/positional/padding embeddings, transformer_proj,
  final_ln) and ``xf.py`` (``Transformer``, ``ResidualAttentionBlock``: ln_1, attn.c_qkv, attn.c_proj,
  ln_2, mlp.c_fc, mlp.c_proj); in-channel counts of ``SuperResText2ImUNet`` (x2), ``InpaintText2ImUNet``
  (x2 + 1), ``SuperResInpaintText2ImUnet`` (x3 + 1).
- :func:`forward`: ``Text2ImUNet.forward`` / ``get_text_emb``; ``nn.py`` ``GroupNorm32`` (float32, 32 groups,
  eps 1e-5, swish) and ``timestep_embedding``; ``ResBlock.forward`` (scale-shift, up/down inside);
  ``AttentionBlock.forward`` / ``QKVAttention.forward`` (per-head [q|k|v] packing, encoder k/v first,
  the 1/sqrt(sqrt(ch)) scale on q and k); ``xf.py`` ``QKVMultiheadAttention``; the subclasses' input
  concatenation (low_res bilinear, ``align_corners=False``).
- :func:`p_sample_loop`: ``gaussian_diffusion.py`` (``GaussianDiffusion.__init__`` tables in float64,
  ``p_mean_variance`` with learned-range variance and ``denoised_fn``/clip, ``p_sample``,
  ``p_sample_loop_progressive``, ``_extract_into_tensor``'s float32 rounding) with ``respace.py``
  (``SpacedDiffusion``: betas from the kept alpha-bars; ``_WrappedModel``: the original timesteps).
- :func:`space_timesteps`: ``respace.py`` ``space_timesteps``; :func:`bpe_encode`: ``tokenizer/bpe.py``.
"""

from __future__ import annotations

import math

import numpy as np
import regex
import torch
import torch.nn.functional as F

TINY = dict(image_size=16, num_channels=32, num_res_blocks=2, channel_mult="1,2", num_head_channels=16,
            attention_resolutions="8", dropout=0.0, text_ctx=8, xf_width=32, xf_layers=2, xf_heads=4,
            diffusion_steps=1000)


# -- layout (unet.py UNetModel.__init__) ---------------------------------------------------------------
def layout(o: dict) -> dict:
    """The module tree: lists of layers per block, each ('conv', cin, cout) / ('res', cin, cout, updown) /
    ('attn', ch); and the text/time sizes."""
    mc = o["num_channels"]
    if o["channel_mult"] == "":  # model_creation.py create_model: the multipliers by image size
        mult = {256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}[o["image_size"]]
    else:
        mult = tuple(int(m) for m in o["channel_mult"].split(","))
    attention_ds = [o["image_size"] // int(r) for r in o["attention_resolutions"].split(",")]
    in_ch = 3 * (1 + o["super_res"] + o["inpaint"]) + o["inpaint"]
    ch = input_ch = mult[0] * mc
    inputs, chans, ds = [[("conv", in_ch, ch)]], [ch], 1
    for level, m in enumerate(mult):
        for _ in range(o["num_res_blocks"]):
            layers = [("res", ch, m * mc, None)]
            ch = m * mc
            if ds in attention_ds:
                layers.append(("attn", ch))
            inputs.append(layers)
            chans.append(ch)
        if level != len(mult) - 1:
            inputs.append([("res", ch, ch, "down")])
            chans.append(ch)
            ds *= 2
    middle = [("res", ch, ch, None), ("attn", ch), ("res", ch, ch, None)]
    outputs = []
    for level, m in list(enumerate(mult))[::-1]:
        for i in range(o["num_res_blocks"] + 1):
            layers = [("res", ch + chans.pop(), mc * m, None)]
            ch = mc * m
            if ds in attention_ds:
                layers.append(("attn", ch))
            if level and i == o["num_res_blocks"]:
                layers.append(("res", ch, ch, "up"))
                ds //= 2
            outputs.append(layers)
    return dict(inputs=inputs, middle=middle, outputs=outputs, out_ch=ch, input_ch=input_ch, emb=4 * mc)


def _shapes(o: dict) -> dict[str, tuple[int, ...]]:
    lay, W, emb = layout(o), o["xf_width"], 4 * o["num_channels"]
    s: dict[str, tuple[int, ...]] = {}

    def gn(p, c):
        s[f"{p}.weight"], s[f"{p}.bias"] = (c,), (c,)

    def lin(p, cout, *cin):
        s[f"{p}.weight"], s[f"{p}.bias"] = (cout, *cin), (cout,)

    def layer(p, spec):
        if spec[0] == "conv":
            lin(p, spec[2], spec[1], 3, 3)
        elif spec[0] == "res":  # ResBlock: in_layers (GN, SiLU, conv), emb_layers (SiLU, Linear), out_layers
            _, cin, cout, _ = spec
            gn(f"{p}.in_layers.0", cin), lin(f"{p}.in_layers.2", cout, cin, 3, 3)
            lin(f"{p}.emb_layers.1", 2 * cout, emb)  # use_scale_shift_norm: scale and shift
            gn(f"{p}.out_layers.0", cout), lin(f"{p}.out_layers.3", cout, cout, 3, 3)
            if cin != cout:
                lin(f"{p}.skip_connection", cout, cin, 1, 1)
        else:  # AttentionBlock: norm, qkv (Conv1d), encoder_kv (Conv1d), proj_out (Conv1d)
            c = spec[1]
            gn(f"{p}.norm", c), lin(f"{p}.qkv", 3 * c, c, 1), lin(f"{p}.encoder_kv", 2 * c, W, 1)
            lin(f"{p}.proj_out", c, c, 1)

    lin("time_embed.0", emb, o["num_channels"]), lin("time_embed.2", emb, emb)
    for k, layers in enumerate(lay["inputs"]):
        for j, spec in enumerate(layers):
            layer(f"input_blocks.{k}.{j}", spec)
    for j, spec in enumerate(lay["middle"]):
        layer(f"middle_block.{j}", spec)
    for k, layers in enumerate(lay["outputs"]):
        for j, spec in enumerate(layers):
            layer(f"output_blocks.{k}.{j}", spec)
    gn("out.0", lay["out_ch"]), lin("out.2", 6, lay["input_ch"], 3, 3)
    for i in range(o["xf_layers"]):
        p = f"transformer.resblocks.{i}"
        lin(f"{p}.attn.c_qkv", 3 * W, W), lin(f"{p}.attn.c_proj", W, W), gn(f"{p}.ln_1", W)
        lin(f"{p}.mlp.c_fc", 4 * W, W), lin(f"{p}.mlp.c_proj", W, 4 * W), gn(f"{p}.ln_2", W)
    gn("final_ln", W)
    s["token_embedding.weight"] = (o["n_vocab"], W)
    s["positional_embedding"] = (o["text_ctx"], W)
    s["padding_embedding"] = (o["text_ctx"], W)
    lin("transformer_proj", emb, W)
    return s


def random_state_dict(o: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors of the original names and shapes: norms near 1, weights ~ N(0, 1/fan_in)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in _shapes(o).items():
        t = torch.randn(shape, generator=g)
        if name.endswith(".bias"):
            t = 0.1 * t
        elif len(shape) == 1:  # GroupNorm / LayerNorm gains
            t = 1 + 0.1 * t
        elif "embedding" in name:
            t = 0.5 * t
        else:
            t = t / math.sqrt(math.prod(shape[1:]))
        state[name] = t
    return state


# -- forward (unet.py, nn.py, xf.py, text2im_model.py) -------------------------------------------------
def _gn(sd, p, x, swish):
    y = F.group_norm(x.float(), 32, sd[f"{p}.weight"], sd[f"{p}.bias"], 1e-5).to(x.dtype)
    return F.silu(y) if swish else y


def _res(sd, p, spec, x, emb):
    updown = spec[3]
    upd = (lambda t: F.interpolate(t, scale_factor=2, mode="nearest")) if updown == "up" else \
        (lambda t: F.avg_pool2d(t, 2, 2)) if updown == "down" else (lambda t: t)
    h = upd(_gn(sd, f"{p}.in_layers.0", x, True))
    x = upd(x)
    h = F.conv2d(h, sd[f"{p}.in_layers.2.weight"], sd[f"{p}.in_layers.2.bias"], padding=1)
    emb_out = F.linear(F.silu(emb), sd[f"{p}.emb_layers.1.weight"], sd[f"{p}.emb_layers.1.bias"])[..., None, None]
    scale, shift = torch.chunk(emb_out, 2, dim=1)
    h = F.silu(_gn(sd, f"{p}.out_layers.0", h, False) * (1 + scale) + shift)
    h = F.conv2d(h, sd[f"{p}.out_layers.3.weight"], sd[f"{p}.out_layers.3.bias"], padding=1)
    if f"{p}.skip_connection.weight" in sd:
        x = F.conv2d(x, sd[f"{p}.skip_connection.weight"], sd[f"{p}.skip_connection.bias"])
    return x + h


def _attn(sd, p, x, encoder_out, head_channels):
    b, c, *spatial = x.shape
    qkv = F.conv1d(_gn(sd, f"{p}.norm", x, False).view(b, c, -1), sd[f"{p}.qkv.weight"], sd[f"{p}.qkv.bias"])
    ekv = F.conv1d(encoder_out, sd[f"{p}.encoder_kv.weight"], sd[f"{p}.encoder_kv.bias"])
    heads, length = c // head_channels, qkv.shape[-1]
    ch = qkv.shape[1] // (3 * heads)
    q, k, v = qkv.reshape(b * heads, ch * 3, length).split(ch, dim=1)
    ek, ev = ekv.reshape(b * heads, ch * 2, -1).split(ch, dim=1)
    k, v = torch.cat([ek, k], dim=-1), torch.cat([ev, v], dim=-1)
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale).float(), dim=-1)
    a = torch.einsum("bts,bcs->bct", weight, v).reshape(b, -1, length)
    h = F.conv1d(a, sd[f"{p}.proj_out.weight"], sd[f"{p}.proj_out.bias"])
    return x + h.reshape(b, c, *spatial)


def _ln(sd, p, x):
    return F.layer_norm(x.float(), (x.shape[-1],), sd[f"{p}.weight"], sd[f"{p}.bias"], 1e-5).to(x.dtype)


def text_embedding(sd, o, tokens, mask):
    """``get_text_emb``: (xf_proj (B, 4 mc), xf_out (B, W, L))."""
    x = sd["token_embedding.weight"][tokens.long()] + sd["positional_embedding"][None]
    x = torch.where(mask[..., None], x, sd["padding_embedding"][None])
    heads = o["xf_heads"]
    for i in range(o["xf_layers"]):
        p = f"transformer.resblocks.{i}"
        qkv = F.linear(_ln(sd, f"{p}.ln_1", x), sd[f"{p}.attn.c_qkv.weight"], sd[f"{p}.attn.c_qkv.bias"])
        bs, n_ctx, width = qkv.shape
        attn_ch = width // heads // 3
        scale = 1 / math.sqrt(math.sqrt(attn_ch))
        q, k, v = torch.split(qkv.view(bs, n_ctx, heads, -1), attn_ch, dim=-1)
        w = torch.softmax(torch.einsum("bthc,bshc->bhts", q * scale, k * scale).float(), dim=-1)
        a = torch.einsum("bhts,bshc->bthc", w, v).reshape(bs, n_ctx, -1)
        x = x + F.linear(a, sd[f"{p}.attn.c_proj.weight"], sd[f"{p}.attn.c_proj.bias"])
        h = F.gelu(F.linear(_ln(sd, f"{p}.ln_2", x), sd[f"{p}.mlp.c_fc.weight"], sd[f"{p}.mlp.c_fc.bias"]))
        x = x + F.linear(h, sd[f"{p}.mlp.c_proj.weight"], sd[f"{p}.mlp.c_proj.bias"])
    x = _ln(sd, "final_ln", x)
    xf_proj = F.linear(x[:, -1], sd["transformer_proj.weight"], sd["transformer_proj.bias"])
    return xf_proj, x.permute(0, 2, 1)


def timestep_embedding(timesteps, dim, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half)
    args = timesteps[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def forward(sd, o, x, timesteps, tokens, mask, low_res=None, inpaint_image=None, inpaint_mask=None):
    """The model's output (B, 6, H, W) for x at ``timesteps`` (``Text2ImUNet.forward`` and subclasses)."""
    if o["inpaint"]:
        parts = [x, inpaint_image * inpaint_mask, inpaint_mask]
        x = torch.cat(parts, dim=1)
    if o["super_res"]:
        up = F.interpolate(low_res, x.shape[-2:], mode="bilinear", align_corners=False)
        x = torch.cat([x, up], dim=1)
    lay, hc = layout(o), o["num_head_channels"]
    emb = timestep_embedding(timesteps, o["num_channels"])
    emb = F.linear(F.silu(F.linear(emb, sd["time_embed.0.weight"], sd["time_embed.0.bias"])),
                   sd["time_embed.2.weight"], sd["time_embed.2.bias"])
    xf_proj, xf_out = text_embedding(sd, o, tokens, mask)
    emb = emb + xf_proj

    def run(prefix, layers, h):
        for j, spec in enumerate(layers):
            p = f"{prefix}.{j}"
            if spec[0] == "conv":
                h = F.conv2d(h, sd[f"{p}.weight"], sd[f"{p}.bias"], padding=1)
            elif spec[0] == "res":
                h = _res(sd, p, spec, h, emb)
            else:
                h = _attn(sd, p, h, xf_out, hc)
        return h

    hs, h = [], x
    for k, layers in enumerate(lay["inputs"]):
        h = run(f"input_blocks.{k}", layers, h)
        hs.append(h)
    h = run("middle_block", lay["middle"], h)
    for k, layers in enumerate(lay["outputs"]):
        h = run(f"output_blocks.{k}", layers, torch.cat([h, hs.pop()], dim=1))
    h = _gn(sd, "out.0", h, True)
    return F.conv2d(h, sd["out.2.weight"], sd["out.2.bias"], padding=1)


# -- diffusion (gaussian_diffusion.py, respace.py) ----------------------------------------------------
def named_betas(name: str, steps: int) -> np.ndarray:
    """``get_named_beta_schedule``."""
    if name == "linear":
        scale = 1000 / steps
        return np.linspace(scale * 0.0001, scale * 0.02, steps, dtype=np.float64)
    alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    return np.array([min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999) for i in range(steps)])


def space_timesteps(num_timesteps, section_counts):
    """``respace.py`` ``space_timesteps`` (a set)."""
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired_count = int(section_counts[len("ddim"):])
            for i in range(1, num_timesteps):
                if len(range(0, num_timesteps, i)) == desired_count:
                    return set(range(0, num_timesteps, i))
            raise ValueError
        elif section_counts == "fast27":
            steps = space_timesteps(num_timesteps, "10,10,3,2,2")
            steps.remove(num_timesteps - 1)
            steps.add(num_timesteps - 3)
            return steps
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx = 0
    all_steps = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx = 0.0
        for _ in range(section_count):
            all_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    return set(all_steps)


def p_sample_loop(model, shape, base_betas, use_timesteps, noise, step_noise, denoised_fn=None):
    """``SpacedDiffusion.p_sample_loop`` with clip_denoised=True; ``step_noise(i)`` is the noise of step i."""
    base = np.cumprod(1.0 - base_betas)
    last, betas, timestep_map = 1.0, [], []
    for i, alpha_cumprod in enumerate(base):  # SpacedDiffusion.__init__
        if i in use_timesteps:
            betas.append(1 - alpha_cumprod / last)
            last = alpha_cumprod
            timestep_map.append(i)
    betas = np.array(betas, dtype=np.float64)
    abar = np.cumprod(1.0 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
    log_var_clipped = np.log(np.append(posterior_variance[1], posterior_variance[1:]))
    coef1 = betas * np.sqrt(abar_prev) / (1.0 - abar)
    coef2 = (1.0 - abar_prev) * np.sqrt(1.0 - betas) / (1.0 - abar)
    f32 = lambda arr, i: torch.tensor(arr[i]).float()  # noqa: E731  (_extract_into_tensor)
    img = noise
    for i in reversed(range(len(betas))):
        ts = torch.tensor([timestep_map[i]] * shape[0])  # _WrappedModel: the original timestep
        out = model(img, ts)
        eps, var_values = torch.split(out, shape[1], dim=1)
        frac = (var_values + 1) / 2
        log_variance = frac * f32(np.log(betas), i) + (1 - frac) * f32(log_var_clipped, i)
        x0 = f32(np.sqrt(1.0 / abar), i) * img - f32(np.sqrt(1.0 / abar - 1), i) * eps
        if denoised_fn is not None:
            x0 = denoised_fn(x0)
        x0 = x0.clamp(-1, 1)
        mean = f32(coef1, i) * x0 + f32(coef2, i) * img
        nonzero = float(i != 0)
        img = mean + nonzero * torch.exp(0.5 * log_variance) * (step_noise(i) if i != 0 else torch.zeros_like(img))
    return img


# -- tokenizer (tokenizer/bpe.py) ------------------------------------------------------------------------
def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


def bpe_encode(text: str, encoder: dict, merges: list[tuple[str, str]]) -> list[int]:
    """``Encoder.encode``: lower-case, split by the GPT-2 pattern, byte-encode, merge by rank."""
    ranks, byte_encoder, ids = {m: i for i, m in enumerate(merges)}, bytes_to_unicode(), []
    for token in PATTERN.findall(text.lower()):
        word = tuple(byte_encoder[b] for b in token.encode("utf-8"))
        while len(word) > 1:
            pairs = {(a, b) for a, b in zip(word, word[1:])}
            bigram = min(pairs, key=lambda pair: ranks.get(pair, float("inf")))
            if bigram not in ranks:
                break
            new, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == bigram:
                    new.append(word[i] + word[i + 1])
                    i += 2
                else:
                    new.append(word[i])
                    i += 1
            word = tuple(new)
        ids += [encoder[piece] for piece in word]
    return ids

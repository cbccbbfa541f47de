"""attention's Triton kernel on a CUDA device: Stable Diffusion's self- and
cross-attention shapes in fp16 and bf16, head sizes 160 and 256, every config of the tuning space,
random odd shapes, (B, S, H, D) views and fused-qkv slices, outputs poisoned with NaN (every row
must be written), torch.compile, and the house tolerance rule (NaN never passes). Head sizes above
256 (the VAE mid-block's single 512-wide head) go through torch's SDPA, its memory-efficient
kernel: the same rule, the output layouts, and the inputs that stay on the reference.

The references are attention's own definition (``_ref``: float32 products and softmax, one
rounding) run in the low precision, and the same in float64; both are computed over chunks of
query rows, which are independent, so the (B, H, rows, Sk) scores stay under ~1 GB. Every test
here is marked gpu and skips without CUDA."""

from __future__ import annotations

import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support.spy import record_calls
from support.gpu_tiers import examples
from support.tolerance import assert_within_ref_error
from torch.utils._python_dispatch import TorchDispatchMode

from fusediff import kernels as K
from fusediff.kernels import _backend

AT = sys.modules["fusediff.kernels.attention"]
pytestmark = pytest.mark.gpu
LOW = [torch.float16, torch.bfloat16]
SD_SHAPES = [  # (B, H, Sq, Sk, D)
    (2, 8, 4096, 4096, 40),  # SD 1.5, 64x64 latents, self-attention
    (2, 8, 4096, 77, 40),  # the same, cross-attention to 77 text tokens
    (2, 8, 1024, 1024, 80),  # SD 1.5, 32x32
    (2, 10, 4096, 4096, 64),  # SDXL-like heads of 64
    (1, 24, 4096, 4096, 128),  # DiT / SD3-like heads of 128
]
BIG_HEADS = [
    (2, 8, 256, 77, 160),  # SD 1.5, 16x16, cross-attention
    (2, 8, 1024, 1024, 160),  # non-aligned D, padded to 256
    (1, 4, 1000, 999, 256),  # the largest head size, no length a tile multiple
]
SCORE_BYTES = 1 << 30  # the references' scores per chunk of query rows


def qkv(b, h, sq, sk, d, dtype, seed, layout="bhsd"):
    """Random q, k, v on the GPU: (B, H, S, D) contiguous, (B, S, H, D) views, or fused-qkv slices."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    if layout == "fused_qkv":  # one (B, S, 3, H, D) projection, as a fused qkv Linear writes it
        assert sq == sk
        t = torch.randn(b, sq, 3, h, d, generator=g, device="cuda").to(dtype)
        return tuple(t[:, :, i].transpose(1, 2) for i in range(3))
    shapes = [(b, sq, h, d), (b, sk, h, d), (b, sk, h, d)]
    ts = [torch.randn(s, generator=g, device="cuda").to(dtype) for s in shapes]  # (B, S, H, D)
    if layout == "bshd":
        return tuple(t.transpose(1, 2) for t in ts)
    return tuple(t.transpose(1, 2).contiguous() for t in ts)


def chunked_ref(q, k, v, scale, compute_dtype=None):
    """attention's reference over chunks of query rows; inputs upcast to ``compute_dtype`` if given."""
    if compute_dtype is not None:
        q, k, v = (t.to(compute_dtype) for t in (q, k, v))
    b, h, sq, _ = q.shape
    per_row = b * h * k.shape[2] * (8 if q.dtype == torch.float64 else 4) * 3  # scores, probs, temporaries
    rows = max(1, SCORE_BYTES // per_row)
    return torch.cat([AT._ref(q[:, :, i:i + rows], k, v, scale) for i in range(0, sq, rows)], dim=2)


def check(q, k, v, scale, what, config=None):
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device="cuda")  # poisoned
    got = AT._kernels().launch(q, k, v, scale, out=out, config=config)
    assert got is out
    lowp = chunked_ref(q, k, v, scale)
    hi = chunked_ref(q, k, v, scale, torch.float64)
    assert_within_ref_error(got, lowp, hi, what)
    return got


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("shape", SD_SHAPES, ids=str)
def test_issue_shapes(shape, dtype):
    check(*qkv(*shape, dtype, seed=sum(shape)), shape[-1] ** -0.5, f"{shape} {dtype}")


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("shape", BIG_HEADS, ids=str)
def test_large_head_sizes(shape, dtype):
    check(*qkv(*shape, dtype, seed=sum(shape)), shape[-1] ** -0.5, f"{shape} {dtype}")


@pytest.mark.parametrize("layout, shape", [
    ("bshd", (2, 8, 4096, 4096, 40)),
    ("bshd", (2, 8, 4096, 77, 40)),
    ("fused_qkv", (2, 10, 4096, 4096, 64)),
    ("fused_qkv", (1, 3, 999, 999, 80)),
])
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_strided_layouts(layout, shape, dtype):
    q, k, v = qkv(*shape, dtype, seed=7, layout=layout)
    assert not q.is_contiguous()
    check(q, k, v, 0.2, f"{layout} {shape} {dtype}")


def _space():
    """(BLOCK_D, dtype, config) for every config of the tuning space; bfloat16 for the common head sizes,
    float32 (its own table) for one."""
    if not torch.cuda.is_available() or not _backend._have_triton():
        return []
    at = AT._kernels()
    cases = []
    for bd in at.TUNING:
        for dtype in [torch.float16] + ([torch.bfloat16] if bd in (64, 128) else []) + [torch.float32] * (bd == 64):
            for c in at.configs_for(bd, at.SEQ_BUCKETS[-1], at.SEQ_BUCKETS[-1], dtype.itemsize):
                name = (f"D{bd}-{str(dtype)[6:]}-{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']}-w{c.num_warps}"
                        f"-s{c.num_stages}" + ("-ws" if c.kwargs["WARP_SPECIALIZE"] else ""))
                cases.append(pytest.param(bd, dtype, c, id=name))
    return cases


@pytest.mark.parametrize("bd, dtype, cfg", _space())
def test_every_config_of_the_tuning_space(bd, dtype, cfg):
    # the autotuner picks the fastest config and trusts its answer: each must be right
    head_dim = {16: 8, 32: 24, 64: 40, 128: 80, 256: 160}[bd]
    config = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    try:
        check(*qkv(2, 3, 333, 300, head_dim, dtype, seed=bd), 0.3, f"D={head_dim} {dtype} {config}", config)
    except Exception as err:  # noqa: BLE001  the autotuner skips configs the device cannot hold
        if type(err).__name__ in ("OutOfResources", "PTXASError"):
            pytest.skip(f"{config}: {type(err).__name__} ({err}); the autotuner skips it, prune it from TUNING")
        raise


@settings(max_examples=examples(25))
@given(b=st.integers(1, 3), h=st.integers(1, 8), sq=st.integers(1, 700), sk=st.integers(1, 700),
       d=st.integers(1, 256), dtype=st.sampled_from([torch.float32, *LOW]), scale=st.floats(-2.0, 2.0),
       layout=st.sampled_from(["bhsd", "bshd"]), pick=st.integers(0, 100), seed=st.integers(0, 2**31 - 1))
def test_random_shapes(b, h, sq, sk, d, dtype, scale, layout, pick, seed):
    at = AT._kernels()
    # one config of this head size's tuning space, not the autotuner: every bucket would re-tune
    element_size = torch.empty((), dtype=dtype).element_size()
    space = at.configs_for(at.block_d(d), at.seq_bucket(sq), at.seq_bucket(sk), element_size)
    cfg = space[pick % len(space)]
    config = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    check(*qkv(b, h, sq, sk, d, dtype, seed, layout), scale, f"({b}, {h}, {sq}, {sk}, {d}) {dtype} {layout} "
          f"scale={scale} {config} seed={seed}", config)


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_large_logits(dtype):
    q, k, v = qkv(2, 4, 1000, 77, 64, dtype, seed=3)
    got = check(q, k, v, 30.0, f"scale 30 {dtype}")
    assert torch.isfinite(got).all()


def test_nan_never_passes():
    q, k, v = qkv(1, 2, 64, 64, 40, torch.float16, seed=4)
    lowp, hi = chunked_ref(q, k, v, 0.2), chunked_ref(q, k, v, 0.2, torch.float64)
    missed = AT._kernels().launch(q, k, v, 0.2).clone()
    missed[0, 1, 63] = float("nan")  # one row the kernel might have skipped
    with pytest.raises(AssertionError, match="NaN"):
        assert_within_ref_error(missed, lowp, hi, "a poisoned row")


def test_public_function_under_torch_compile():
    q, k, v = qkv(2, 8, 1024, 77, 40, torch.float16, seed=5, layout="bshd")
    compiled = torch.compile(lambda q, k, v: K.attention(q, k, v), fullgraph=True)
    got = compiled(q, k, v)
    assert got.is_contiguous() and got.shape == q.shape
    assert_within_ref_error(got, chunked_ref(q, k, v, 40 ** -0.5), chunked_ref(q, k, v, 40 ** -0.5, torch.float64),
                            "torch.compile")


def test_autograd_runs_and_gives_finite_gradients():
    q, k, v = (t.float().requires_grad_() for t in qkv(1, 2, 50, 77, 40, torch.float16, seed=6))
    out = K.attention(q, k, v)
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


# --- head sizes above 256: torch's SDPA --------------------------------------------------------------

SDPA_HEADS = [  # (B, H, Sq, Sk, D)
    (1, 1, 4096, 4096, 512),  # SD's VAE mid-block at 512x512: one 512-wide head
    (2, 1, 1000, 1000, 512),  # no length a tile multiple
    (1, 3, 77, 300, 264),  # the smallest head size above 256 that SDPA's kernel takes (a multiple of 8)
]


MATH_OPS = {"aten.bmm", "aten.mm", "aten.baddbmm", "aten.matmul", "aten._softmax", "aten._safe_softmax"}


def in_layout(out, out_layout):
    """Whether out is laid out as out_layout names: contiguous (B, H, Sq, D), or (B, Sq, H, D) in memory."""
    return out.is_contiguous() if out_layout == "bhsd" else out.transpose(1, 2).is_contiguous()


class AtenOps(TorchDispatchMode):
    """Records the names of the aten ops run under it: which SDPA backend ran, and any other work."""

    def __init__(self) -> None:
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("layout", ["bhsd", "bshd", "fused_qkv"])
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("shape", SDPA_HEADS, ids=str)
def test_head_sizes_above_256_run_sdpa(monkeypatch, shape, dtype, layout):
    if layout == "fused_qkv" and shape[2] != shape[3]:
        pytest.skip("a fused qkv projection has Sq == Sk")
    q, k, v = qkv(*shape, dtype, seed=sum(shape), layout=layout)
    scale = shape[-1] ** -0.5
    lowp, hi = chunked_ref(q, k, v, scale), chunked_ref(q, k, v, scale, torch.float64)
    sdpa, ref = record_calls(monkeypatch, AT, "_sdpa"), record_calls(monkeypatch, AT, "_ref")
    for out_layout in AT.OUT_LAYOUTS:
        with AtenOps() as ops:
            got = K.attention(q, k, v, out_layout=out_layout)
        assert in_layout(got, out_layout), f"{out_layout}: strides {got.stride()}"
        assert_within_ref_error(got, lowp, hi, f"SDPA {shape} {dtype} {layout} out_layout={out_layout}")
        # the memory-efficient kernel ran, not the math backend's products and softmax
        assert "aten._scaled_dot_product_efficient_attention" in ops.names, ops.names
        assert not MATH_OPS & set(ops.names), ops.names
        copied = "aten.copy_" in ops.names  # into the layout asked for: (B, H, Sq, D) with several heads
        assert copied == (out_layout == "bhsd" and shape[1] > 1), f"{out_layout}, H={shape[1]}: copied {copied}"
    assert len(sdpa) == 2 and not ref, f"{len(sdpa)} SDPA calls, {len(ref)} reference calls"


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_sdpa_large_logits(monkeypatch, dtype):
    q, k, v = qkv(1, 1, 500, 77, 512, dtype, seed=8)  # logits 3 q.k: a standard deviation of 68
    logits = 3.0 * q.float() @ k.float().transpose(-2, -1)
    assert torch.isinf(logits.exp()).any(), "the data must overflow a softmax without its maximum subtracted"
    sdpa = record_calls(monkeypatch, AT, "_sdpa")
    got = K.attention(q, k, v, 3.0)
    assert sdpa and torch.isfinite(got).all()
    hi = chunked_ref(q, k, v, 3.0, torch.float64)
    assert_within_ref_error(got, chunked_ref(q, k, v, 3.0), hi, f"scale 3 {dtype}")


def test_head_sizes_above_256_fall_back_to_the_reference(monkeypatch):
    q, k, v = qkv(1, 2, 100, 90, 512, torch.float16, seed=9)
    base = torch.randn(q.numel() + 4, device="cuda").half()
    misaligned = base[4:].view(q.shape)  # storage offset of 8 bytes
    fallbacks = {  # what the memory-efficient kernel does not take, or what this path leaves to the reference
        "float32": lambda: K.attention(q.float(), k.float(), v.float()),
        "float64": lambda: K.attention(q.double(), k.double(), v.double()),
        "D = 260, not a multiple of 8": lambda: K.attention(q[..., :260], k[..., :260], v[..., :260]),
        "D strided": lambda: K.attention(*(t.transpose(2, 3).contiguous().transpose(2, 3) for t in (q, k, v))),
        "misaligned storage offset": lambda: K.attention(misaligned, k, v),
        "negative scale": lambda: K.attention(q, k, v, -0.05),
        "needs grad": lambda: K.attention(q.clone().requires_grad_(), k, v),
        "no keys": lambda: K.attention(q, k[:, :, :0], v[:, :, :0]),
    }
    sdpa = record_calls(monkeypatch, AT, "_sdpa")
    for what, fn in fallbacks.items():
        out = fn()
        assert not sdpa, f"{what}: ran SDPA"
        if what == "negative scale":
            hi = chunked_ref(q, k, v, -0.05, torch.float64)
            assert_within_ref_error(out, chunked_ref(q, k, v, -0.05), hi, what)
    for backend in ("ref", "fused", "auto"):
        with K.use_backend(backend):
            K.attention(q, k, v)
        assert len(sdpa) == (backend != "ref"), backend
        sdpa.clear()


def test_sdpa_path_under_torch_compile():
    q, k, v = qkv(2, 1, 1024, 1024, 512, torch.float16, seed=10, layout="bshd")
    compiled = torch.compile(lambda q, k, v: K.attention(q, k, v, out_layout="bshd"), fullgraph=True)
    got = compiled(q, k, v)
    assert in_layout(got, "bshd") and got.shape == q.shape
    scale = 512 ** -0.5
    assert_within_ref_error(got, chunked_ref(q, k, v, scale), chunked_ref(q, k, v, scale, torch.float64),
                            "SDPA under torch.compile")

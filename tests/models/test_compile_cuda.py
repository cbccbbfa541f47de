"""torch.compile(fullgraph=True) of the Stable Diffusion models on a CUDA device runs the fused kernels.

An SD-like UNet2DConditionModel at SD 1.x's real widths (320 and 640 channels, 8 heads of 40 and 80,
a 77 x 768 context) but two levels only, and the SD VAE's decoder at three of its widths, compiled
with Inductor and fullgraph=True in fp16, contiguous and channels-last. A recording backend keeps
the FX graphs Dynamo hands to Inductor: they must call the custom ops ``torch.ops.fusediff.*``
(GroupNorm+SiLU, attention, the time MLP; the VAE's 512-wide mid-block head runs the reference
attention, D > 256). The compiled output must agree with the fp64 model under the house tolerance
rule (tests/support/tolerance.py: at most twice the error of the reference ops in fp16, plus atol);
its distance to the eager fused run is printed. Also the fused scheduler step, compiled.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from fusediff import AutoencoderKL, UNet2DConditionModel
from fusediff import kernels as K
from support.configs import SD_LIKE_UNET, SD_LIKE_VAE
from support.tolerance import assert_within_ref_error

pytestmark = pytest.mark.gpu

UNET, VAE = SD_LIKE_UNET, SD_LIKE_VAE
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def recording_inductor(graphs: list):
    """Inductor, keeping each FX graph it is given in ``graphs``."""
    from torch._inductor.compile_fx import compile_fx

    def backend(gm, example_inputs):
        graphs.append(gm)
        return compile_fx(gm, example_inputs)

    return backend


def fusediff_ops(graphs: list) -> set[str]:
    return {str(n.target) for gm in graphs for n in gm.graph.nodes if str(n.target).startswith("fusediff.")}


def check_compiled(fn, args_hi, args_low, lowp_model_fn, what, expected_ops, layout):
    """Compile ``fn`` on the low-precision arguments; compare with fp64, the fp16 reference ops and eager."""
    with torch.no_grad():
        hi = fn(*args_hi)
        lowp_model_fn()
        with K.use_backend("ref"):
            ref = fn(*args_low)
        eager = fn(*args_low)
        graphs: list = []
        got = torch.compile(fn, backend=recording_inductor(graphs), fullgraph=True)(*args_low)
    ops = fusediff_ops(graphs)
    print(f"{what}: custom ops in the graph {sorted(ops)}; max |compiled - eager| "
          f"{(got.float() - eager.float()).abs().max().item():.3e}")
    assert len(graphs) == 1 and expected_ops <= ops, ops
    assert_within_ref_error(got, ref, hi, f"{what}, compiled")
    if layout is torch.channels_last:
        assert got.is_contiguous(memory_format=torch.channels_last), got.stride()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_unet_2d_condition_compiles_to_the_fused_ops(layout):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET).to("cuda").eval()
    x = torch.randn(2, 4, 32, 32, device="cuda")
    t = torch.tensor([999, 10], device="cuda")
    cond = torch.randn(2, 77, 768, device="cuda")
    fmt = LAYOUTS[layout]
    unet.double()
    check_compiled(lambda x, c: unet(x, t, c).sample, (x.double(), cond.double()),
                   (x.half().contiguous(memory_format=fmt), cond.half()),
                   lambda: unet.half().to(memory_format=fmt), f"UNet2DConditionModel {layout}",
                   {"fusediff.group_norm", "fusediff.attention", "fusediff.timestep_mlp"}, fmt)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_autoencoder_kl_decode_compiles_to_the_fused_ops(layout):
    torch.manual_seed(0)
    vae = AutoencoderKL(**VAE).to("cuda").eval()
    z = torch.randn(1, 4, 32, 32, device="cuda")
    fmt = LAYOUTS[layout]
    vae.double()
    check_compiled(lambda z: vae.decode(z).sample, (z.double(),), (z.half().contiguous(memory_format=fmt),),
                   lambda: vae.half().to(memory_format=fmt), f"AutoencoderKL.decode {layout}", {"fusediff.group_norm"},
                   fmt)


def test_scheduler_step_compiles_to_the_fused_op():
    if not K.has_cuda_kernels():
        pytest.skip("fusediff._C was built without its CUDA kernels")
    g = torch.Generator(device="cuda").manual_seed(3)
    x, m, n = (torch.randn(2, 4, 64, 64, device="cuda", generator=g, dtype=torch.float16) for _ in range(3))
    coeffs = torch.tensor([0.9, -0.4, 0.1, 0.7, 0.2, 0.05, 0.1, 0.0, 0.0, 0.0, 0.0, 1.0], device="cuda")
    graphs: list = []
    compiled = torch.compile(lambda x, m, n, c: K.scheduler_step(x, m, c, noise=n, return_pred=True),
                             backend=recording_inductor(graphs), fullgraph=True)
    got = compiled(x, m, n, coeffs)
    expected = K.scheduler_step(x, m, coeffs, noise=n, return_pred=True)
    assert "fusediff.scheduler_step" in fusediff_ops(graphs)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the same kernel, called from the graph

"""DeepFloyd IF's UNets (stage I and stage II configs of tests/models/test_unet_2d_condition_if.py) on a CUDA
device: the fused path (GroupNorm(+SiLU), attention with added k/v, LayerNorm of the text pooling) against
the reference path in fp16 and bf16 under the house tolerance rule, with a float64 run as the truth."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from fusediff import UNet2DConditionModel
from fusediff import kernels as K
from support.tolerance import assert_within_ref_error

pytestmark = pytest.mark.gpu

_spec = importlib.util.spec_from_file_location("_if_cpu_tests", Path(__file__).with_name("test_unet_2d_condition_if.py"))
_cpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_cpu)  # the CPU tests' configs and inputs, not their tests
CONFIGS, inputs = _cpu.CONFIGS, _cpu.inputs


@pytest.mark.parametrize("name", ["if_stage_1", "if_stage_2", "released_stage_2"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_if_unet_fused_path_agrees_with_reference_path(name, dtype):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**CONFIGS[name]).to("cuda").eval()
    (x, t, c), kw = inputs(CONFIGS[name], size=16)
    x, t, c = x.cuda(), t.cuda(), c.cuda()
    kw = {k: v.cuda() for k, v in kw.items()}
    with torch.no_grad():
        hi = unet.double()(x.double(), t, c.double(), **kw).sample
        low = unet.to(dtype)
        with K.use_backend("ref"):
            ref = low(x.to(dtype), t, c.to(dtype), **kw).sample
        with K.use_backend("auto"):
            fused = low(x.to(dtype), t, c.to(dtype), **kw).sample
    assert_within_ref_error(fused, ref, hi, f"IF UNet {name} {dtype}, fused against reference path")

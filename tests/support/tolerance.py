"""The house tolerance rule (DESIGN.md, after flash-attention): the fused result's error
against an fp64 reference may be at most twice the error of the reference run in the same
low precision, plus a small atol for the dtype."""

from __future__ import annotations

import torch

ATOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float64: 1e-10}


def assert_within_ref_error(fused: torch.Tensor, ref_lowp: torch.Tensor, ref_fp64: torch.Tensor,
                            what: str = "") -> None:
    """Assert |fused - ref_fp64| <= 2 |ref_lowp - ref_fp64| + atol (max over elements); print what differs."""
    assert fused.shape == ref_fp64.shape and fused.dtype == ref_lowp.dtype, (fused.shape, fused.dtype)
    f, r, hi = fused.double().cpu(), ref_lowp.double().cpu(), ref_fp64.double().cpu()
    nan_f, nan_hi = torch.isnan(f), torch.isnan(hi)
    assert torch.equal(nan_f, nan_hi), f"{what}: NaN in {int((nan_f ^ nan_hi).sum())} different places"
    if f.numel() == 0:
        return
    f, r, hi = (t.masked_fill(nan_hi, 0) for t in (f, r, hi))
    err_fused = (f - hi).abs()
    err_ref = (r - hi).abs().max().item()
    bound = 2 * err_ref + ATOL[fused.dtype]
    worst = err_fused.max().item()
    if worst > bound:
        idx = tuple(int(i) for i in torch.nonzero(err_fused == worst)[0])
        raise AssertionError(
            f"{what}: fused error {worst:.3e} > bound {bound:.3e} (ref error {err_ref:.3e}); at {idx}: "
            f"fused {f[idx].item():.6g}, fp64 ref {hi[idx].item():.6g}, low-precision ref {r[idx].item():.6g}; "
            f"{int((err_fused > bound).sum())} of {err_fused.numel()} elements out of bound")

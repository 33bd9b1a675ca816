"""Numerics: float64 is honoured, the memory state stays float32 under bf16 activations,
and a bf16 model trains its memory on float32 master weights."""

import pytest
import torch

from allmem.memory import RMSNorm


def test_rmsnorm_honours_float64():
    torch.manual_seed(0)
    norm = RMSNorm(8, groups=2).double()
    with torch.no_grad():
        norm.weight.add_(torch.randn(8, dtype=torch.float64) * 0.1)
    x = torch.randn(3, 5, 8, dtype=torch.float64) * 1e3 + 1e-9
    out = norm(x)
    assert out.dtype == torch.float64
    g = x.view(3, 5, 2, 4)
    expected = (g / torch.sqrt(g.pow(2).mean(-1, keepdim=True) + norm.eps)).view(3, 5, 8) * norm.weight
    # a float32 computation is off by ~1e-7 relative; float64 must agree to ~1e-15
    torch.testing.assert_close(out, expected, rtol=1e-13, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rmsnorm_low_precision_input_computes_in_float32(dtype):
    norm = RMSNorm(8)
    x = torch.randn(4, 8).to(dtype)
    out = norm(x)
    assert out.dtype == dtype
    ref = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + norm.eps)).to(dtype)
    torch.testing.assert_close(out, ref)

"""The chunk-epilogue contract (mempo/ops/epilogue.py) and its Triton twin, directly."""
import os

import pytest
import torch
from loss_cases import epilogue_float64_truth

from mempo.ops import epilogue


def _case(c, v, scale):
    logits = torch.randn(c, v) * scale
    targets = torch.randint(0, v, (c,))
    return logits, targets, torch.randn(c), torch.randn(c)


@pytest.mark.parametrize("c,v", [(1, 1), (3, 7), (19, 130), (8, 1000)])
@pytest.mark.parametrize("inv_t", [1.0, 1.7])
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_torch_epilogue_matches_float64(seed, c, v, inv_t, scale):
    logits, targets, g_lp, g_ent = _case(c, v, scale)
    lse, zt, mz, grad = epilogue_float64_truth(logits, targets, inv_t, g_lp.double(), g_ent.double())
    out = epilogue.row_stats(logits, targets, inv_t, with_entropy=True)
    for got, want in zip(out, (lse, zt, mz)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4 * scale)
    buf = logits.clone()
    epilogue.write_logit_grad_(buf, targets, inv_t, out[0], g_lp, g_ent, out[2])
    torch.testing.assert_close(buf.double(), grad, rtol=1e-4, atol=1e-4 * scale)
    buf = logits.clone()
    epilogue.write_logit_grad_(buf, targets, inv_t, out[0], g_lp)
    no_entropy = torch.zeros(c, dtype=torch.float64)
    _, _, _, grad_lp_only = epilogue_float64_truth(logits, targets, inv_t, g_lp.double(), no_entropy)
    torch.testing.assert_close(buf.double(), grad_lp_only, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="Triton needs CUDA or the interpreter")
@pytest.mark.parametrize("c,v", [(1, 1), (5, 129), (9, 300)])
@pytest.mark.parametrize("in_place", [True, False])
def test_triton_epilogue_modes(seed, c, v, in_place):
    from mempo.kernels.chunk_epilogue import chunk_epilogue

    logits, targets, g_lp, g_ent = _case(c, v, 10.0)
    lse, zt, mz, grad = epilogue_float64_truth(logits, targets, 0.8, g_lp.double(), g_ent.double())
    lse_k, logp_k, mz_k = chunk_epilogue(logits, targets, 0.8, with_entropy=True)
    torch.testing.assert_close(lse_k.double(), lse, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(logp_k.double(), zt - lse, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(mz_k.double(), mz, rtol=1e-5, atol=1e-4)
    buf = logits.clone()
    out = buf if in_place else torch.empty_like(buf).to(torch.bfloat16)
    chunk_epilogue(buf, targets, 0.8, grad_out=out, saved=(lse_k, mz_k, g_lp, g_ent))
    tol = dict(rtol=1e-4, atol=1e-4) if in_place else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out.double(), grad, **tol)


def test_mismatched_entropy_arguments():
    with pytest.raises(ValueError, match="together"):
        epilogue.write_logit_grad_(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), 1.0,
                                         torch.zeros(1), torch.zeros(1), torch.zeros(1), None)

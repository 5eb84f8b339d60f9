"""linear_logprobs vs the full-logits reference in float64: values, entropy, grads."""
import pytest
import torch
from backends import cpu_backends
from loss_cases import assert_within_low_precision_error

from mempo.ops import linear_logprobs
from mempo.reference.logprobs import logprobs_reference

# (N, H, V): ragged, not multiples of any block size; V below, at and above block widths.
SHAPES = [(1, 3, 5), (17, 9, 31), (40, 24, 129), (65, 16, 300)]


def _inputs(n, h, v, dtype, scale=1.0):
    hidden = (torch.randn(n, h, dtype=torch.float64) * scale).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, dtype=torch.float64) / h**0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,))
    return hidden, weight, targets


def _check_against_reference(backend, n, h, v, dtype, temperature, chunk_rows, tol):
    hidden, weight, targets = _inputs(n, h, v, dtype)
    logp, ent = linear_logprobs(hidden, weight, targets, temperature, return_entropy=True,
                                chunk_rows=chunk_rows, backend=backend)
    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    logp_ref, ent_ref = logprobs_reference(h64, w64, targets, temperature)
    torch.testing.assert_close(logp.double(), logp_ref.detach(), **tol)
    torch.testing.assert_close(ent.double(), ent_ref.detach(), **tol)
    g_lp = torch.randn(n, dtype=torch.float64)
    g_ent = torch.randn(n, dtype=torch.float64)
    grads = torch.autograd.grad((logp.double() * g_lp).sum() + (ent.double() * g_ent).sum(), [hidden, weight])
    grads_ref = torch.autograd.grad((logp_ref * g_lp).sum() + (ent_ref * g_ent).sum(), [h64, w64])
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g.double(), g_ref, **tol)


@pytest.mark.parametrize("n,h,v", SHAPES)
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_float64_torch_path(seed, n, h, v, temperature):
    _check_against_reference("torch", n, h, v, torch.float64, temperature, chunk_rows=7,
                             tol=dict(rtol=1e-10, atol=1e-10))


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("n,h,v", SHAPES)
def test_float32_backends(seed, backend, n, h, v):
    _check_against_reference(backend, n, h, v, torch.float32, 0.8, chunk_rows=16,
                             tol=dict(rtol=1e-4, atol=1e-4))


@pytest.mark.parametrize("backend", cpu_backends())
def test_bfloat16_inputs(seed, backend):
    hidden, weight, targets = _inputs(23, 32, 77, torch.bfloat16)
    logp = linear_logprobs(hidden, weight, targets, backend=backend)
    assert logp.dtype == torch.float32
    ref, _ = logprobs_reference(hidden.detach().double(), weight.detach().double(), targets)
    pt, _ = logprobs_reference(hidden.detach(), weight.detach(), targets)  # plain PyTorch in bf16
    assert_within_low_precision_error(logp, ref, pt, name="logp")
    logp.sum().backward()
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("backend", cpu_backends())
def test_chunking_does_not_change_the_result(seed, backend):
    hidden, weight, targets = _inputs(50, 12, 40, torch.float32)
    one = linear_logprobs(hidden, weight, targets, chunk_rows=50, backend=backend)
    many = linear_logprobs(hidden, weight, targets, chunk_rows=3, backend=backend)
    torch.testing.assert_close(one, many, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", cpu_backends())
def test_extreme_logits_stay_finite(backend):
    """All logits far below 0: a running max initialised at 0 instead of -inf underflows
    exp() to 0 and returns -inf; a huge logit must not overflow either."""
    hidden = torch.full((3, 1), 1.0)
    weight = torch.tensor([[-3000.0], [-3001.0], [-3005.0], [-2999.5]])
    targets = torch.tensor([0, 1, 3])
    logp, ent = linear_logprobs(hidden, weight, targets, return_entropy=True, backend=backend)
    ref, ref_ent = logprobs_reference(hidden.double(), weight.double(), targets)
    # float32 logits near 3000 carry ~2e-4 rounding; the failure mode is -inf/NaN.
    torch.testing.assert_close(logp.double(), ref, rtol=0, atol=1e-3)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=0, atol=1e-3)
    logp_big = linear_logprobs(-hidden, weight, targets, backend=backend)
    assert torch.isfinite(logp_big).all()


def test_empty_batch():
    hidden = torch.zeros(0, 4, requires_grad=True)
    weight = torch.randn(6, 4, requires_grad=True)
    logp = linear_logprobs(hidden, weight, torch.zeros(0, dtype=torch.long))
    assert logp.shape == (0,)
    logp.sum().backward()
    assert torch.all(weight.grad == 0)


def test_bad_inputs():
    h, w, t = torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="targets must lie in"):
        linear_logprobs(h, w, torch.tensor([0, 5, 1]))
    with pytest.raises(ValueError, match="targets must lie in"):
        linear_logprobs(h, w, torch.tensor([0, -1, 1]))
    with pytest.raises(ValueError, match="hidden must be a floating"):
        linear_logprobs(h.long(), w, t)
    with pytest.raises(ValueError, match="weight must be"):
        linear_logprobs(h, torch.zeros(5, 3), t)
    with pytest.raises(ValueError, match="weight dtype"):
        linear_logprobs(h, w.double(), t)
    with pytest.raises(ValueError, match="targets must have shape"):
        linear_logprobs(h, w, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="targets must be an integer"):
        linear_logprobs(h, w, t.float())
    with pytest.raises(ValueError, match="temperature"):
        linear_logprobs(h, w, t, temperature=0.0)
    with pytest.raises(ValueError, match="backend"):
        linear_logprobs(h, w, t, backend="cuda")

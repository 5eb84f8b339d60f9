"""linear_policy_loss (one pass: dX, dW in forward) vs the naive full-logits pipeline."""
import pytest
import torch
from backends import cpu_backends
from loss_cases import LOSS_OPTION_CASES, assert_within_low_precision_error, random_batch

from mempo.ops import MemPOAdvantages, linear_policy_loss, policy_loss
from mempo.reference.logprobs import linear_policy_loss_reference, logprobs_reference


def _problem(n, h, v, dtype=torch.float64, num_seqs=4):
    hidden = torch.randn(n, h, dtype=torch.float64).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, dtype=torch.float64) / h**0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,))
    b = random_batch(n, num_seqs)
    with torch.no_grad():
        logp, _ = logprobs_reference(hidden.double(), weight.double(), targets)
    # Old/ref near the current policy, so some tokens are clipped and some are not. The clipped
    # loss's gradient jumps at the clip edges, so keep every log-ratio 0.03 away from the edges
    # the loss cases use: bf16 inputs move a log-prob by up to ~0.02, which could otherwise flip
    # a token's clip state between the kernel and the float64 reference (one seed in a few hundred).
    log_ratio = 0.3 * torch.randn(n, dtype=torch.float64)
    edges = torch.tensor([1 - 0.2, 1.2, 1.28, 1 - 0.1, 1.3, 2.0, 3.0], dtype=torch.float64).log()
    for _ in range(10):
        near = ((log_ratio[:, None] - edges).abs() < 0.03).any(1)
        log_ratio[near] += 0.07
    b["old"] = logp - log_ratio
    b["ref"] = logp + 0.1 * torch.randn(n, dtype=torch.float64)
    return hidden, weight, targets, b


def _compare(backend, n, h, v, dtype, options, temperature, chunk_rows, tol):
    hidden, weight, targets, b = _problem(n, h, v, dtype)
    ref = b["ref"] if options.get("kl_coef") else None
    cast = lambda t: None if t is None else t.to(torch.float32 if dtype != torch.float64 else dtype)  # noqa: E731
    loss, metrics = linear_policy_loss(
        hidden, weight, targets, cast(b["old"]), cast(b["adv"]), b["mask"], cast(ref),
        seq_index=b["seq_index"], temperature=temperature, chunk_rows=chunk_rows, backend=backend,
        compute_entropy=True, **options)
    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    expected = linear_policy_loss_reference(
        h64, w64, targets, b["old"], b["adv"], b["mask"], b["seq_index"], ref, temperature, **options)
    torch.testing.assert_close(loss.double(), expected.detach(), **tol)
    grads = torch.autograd.grad(loss, [hidden, weight])
    grads_ref = torch.autograd.grad(expected, [h64, w64])
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g.double(), g_ref, **tol)
    assert torch.all(grads[0][~b["mask"]] == 0)  # rows without loss get exactly zero
    return metrics


@pytest.mark.parametrize("options", LOSS_OPTION_CASES)
def test_float64_all_options(seed, options):
    _compare("torch", 47, 10, 37, torch.float64, options, temperature=0.9, chunk_rows=8,
             tol=dict(rtol=1e-9, atol=1e-11))


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("options", [LOSS_OPTION_CASES[2], LOSS_OPTION_CASES[5], LOSS_OPTION_CASES[9]])
@pytest.mark.parametrize("n,h,v", [(1, 4, 3), (33, 16, 130), (70, 8, 257)])
def test_float32_backends(seed, backend, options, n, h, v):
    _compare(backend, n, h, v, torch.float32, options, temperature=0.7, chunk_rows=16,
             tol=dict(rtol=2e-4, atol=2e-5))


@pytest.mark.parametrize("backend", cpu_backends())
def test_metrics_match_policy_loss_on_reference_logprobs(seed, backend):
    hidden, weight, targets, b = _problem(40, 12, 50, torch.float32)
    loss, metrics = linear_policy_loss(hidden, weight, targets, b["old"].float(), b["adv"].float(), b["mask"],
                                       seq_index=b["seq_index"], backend=backend, compute_entropy=True)
    logp, ent = logprobs_reference(hidden.detach().double(), weight.detach().double(), targets)
    _, expected = policy_loss(logp, b["old"], b["adv"], b["mask"], seq_index=b["seq_index"], entropy=ent)
    for key in ("loss", "clip_frac", "ratio_mean", "approx_kl", "entropy", "num_loss_tokens"):
        torch.testing.assert_close(metrics[key].double(), expected[key].double(), rtol=1e-4, atol=1e-5, msg=key)


def test_compact_advantages_equal_per_token(seed):
    hidden, weight, targets, b = _problem(60, 8, 29)
    traj_adv, mem_adv = torch.randn(4, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    segment_index = torch.where(torch.rand(60) < 0.4, torch.randint(0, 5, (60,)), -1)
    compact = MemPOAdvantages(traj_adv, b["seq_index"], mem_adv, segment_index, mem_coef=0.5)
    memory_part = torch.where(segment_index >= 0, 0.5 * mem_adv[segment_index.clamp(min=0)], 0.0)
    per_token = traj_adv[b["seq_index"]] + memory_part
    l1, _ = linear_policy_loss(hidden, weight, targets, b["old"], compact, b["mask"])
    g1 = torch.autograd.grad(l1, [hidden, weight])
    l2, _ = linear_policy_loss(hidden, weight, targets, b["old"], per_token, b["mask"], seq_index=b["seq_index"])
    g2 = torch.autograd.grad(l2, [hidden, weight])
    torch.testing.assert_close(l1, l2)
    for a, c in zip(g1, g2):
        torch.testing.assert_close(a, c)


@pytest.mark.parametrize("backend", cpu_backends())
def test_bfloat16_grads_and_native_dw_accumulation(seed, backend):
    hidden, weight, targets, b = _problem(64, 32, 90, torch.bfloat16)
    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    expected = linear_policy_loss_reference(h64, w64, targets, b["old"], b["adv"], b["mask"], b["seq_index"])
    g_ref = torch.autograd.grad(expected, [h64, w64])
    h16, w16 = hidden.detach().requires_grad_(), weight.detach().requires_grad_()  # plain PyTorch in bf16
    pt = linear_policy_loss_reference(h16, w16, targets, b["old"].float(), b["adv"].float(), b["mask"], b["seq_index"])
    g_pt = torch.autograd.grad(pt, [h16, w16])
    for fp32_acc in (True, False):
        loss, _ = linear_policy_loss(hidden, weight, targets, b["old"].float(), b["adv"].float(), b["mask"],
                                     seq_index=b["seq_index"], chunk_rows=16, backend=backend,
                                     weight_grad_fp32=fp32_acc)
        gx, gw = torch.autograd.grad(loss, [hidden, weight])
        assert gx.dtype == gw.dtype == torch.bfloat16
        # a scalar: rounding errors may cancel in PyTorch's sum by luck, so a small absolute floor
        assert_within_low_precision_error(loss, expected.detach(), pt.detach(), atol=1e-3, name="loss")
        for name, got, want, plain in (("dX", gx, g_ref[0], g_pt[0]), ("dW", gw, g_ref[1], g_pt[1])):
            assert_within_low_precision_error(got, want, plain, name=f"{name} (fp32 dW: {fp32_acc})")


def test_grad_output_scales_and_no_grad_skips_gemms(seed):
    hidden, weight, targets, b = _problem(20, 6, 11)
    loss, _ = linear_policy_loss(hidden, weight, targets, b["old"], b["adv"], b["mask"], seq_index=b["seq_index"])
    g1 = torch.autograd.grad(3.0 * loss, [hidden, weight])
    loss, _ = linear_policy_loss(hidden, weight, targets, b["old"], b["adv"], b["mask"], seq_index=b["seq_index"])
    g2 = torch.autograd.grad(loss, [hidden, weight])
    for a, c in zip(g1, g2):
        torch.testing.assert_close(a, 3.0 * c)
    with torch.no_grad():
        loss_ng, _ = linear_policy_loss(hidden, weight, targets, b["old"], b["adv"], b["mask"],
                                        seq_index=b["seq_index"])
    torch.testing.assert_close(loss_ng, loss.detach())


@pytest.mark.parametrize("backend", cpu_backends())
def test_empty_and_all_masked(backend):
    for n in (0, 6):
        hidden = torch.randn(n, 4, requires_grad=True)
        weight = torch.randn(9, 4, requires_grad=True)
        z = torch.zeros(n)
        loss, metrics = linear_policy_loss(hidden, weight, torch.zeros(n, dtype=torch.long), z, z + 1,
                                           torch.zeros(n, dtype=torch.bool), seq_index=torch.zeros(n, dtype=torch.long),
                                           backend=backend)
        assert float(loss.detach()) == 0.0
        loss.backward()
        assert torch.all(hidden.grad == 0) and torch.all(weight.grad == 0)
        assert all(torch.isfinite(v) for v in metrics.values())


def test_bad_inputs():
    h, w = torch.zeros(4, 3), torch.zeros(5, 3)
    t, z, m = torch.zeros(4, dtype=torch.long), torch.zeros(4), torch.ones(4)
    seq = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="targets must lie in"):
        linear_policy_loss(h, w, torch.tensor([0, 1, 2, 5]), z, z, m, seq_index=seq)
    with pytest.raises(ValueError, match="old_logprobs"):
        linear_policy_loss(h, w, t, torch.zeros(3), z, m, seq_index=seq)
    with pytest.raises(ValueError, match="advantages"):
        linear_policy_loss(h, w, t, z, torch.zeros(5), m, seq_index=seq)
    with pytest.raises(ValueError, match="loss_mask"):
        linear_policy_loss(h, w, t, z, z, torch.ones(3), seq_index=seq)
    with pytest.raises(ValueError, match="chunk_rows"):
        linear_policy_loss(h, w, t, z, z, m, seq_index=seq, chunk_rows=-1)
    with pytest.raises(ValueError, match="kl_estimator"):
        linear_policy_loss(h, w, t, z, z, m, seq_index=seq, kl_estimator="k4")
    with pytest.raises(TypeError):
        linear_policy_loss(h, w, t, z, z, m, seq_index=seq, clip=0.2)


@pytest.mark.parametrize("backend", cpu_backends())
def test_strided_per_token_inputs_all_rows_kept(seed, backend):
    """A non-contiguous float32 advantage tensor with an all-ones mask (nothing is gathered, so
    nothing makes it contiguous on the way) must give the contiguous answer on every backend."""
    n, h, v = 37, 16, 53
    hidden = torch.randn(n, h, requires_grad=True)
    weight = torch.randn(v, h) * 0.3
    targets = torch.randint(0, v, (n,))
    old = -torch.rand(n) * 3
    adv_wide = torch.randn(n, 3)
    mask = torch.ones(n, dtype=torch.bool)
    results = []
    for adv in (adv_wide[:, 1], adv_wide[:, 1].contiguous()):
        loss, _ = linear_policy_loss(hidden, weight, targets, old, adv, mask, backend=backend,
                                         loss_agg="token-mean")
        (grad,) = torch.autograd.grad(loss, hidden)
        results.append((loss.detach(), grad))
    assert not adv_wide[:, 1].is_contiguous()
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])

"""mempo._C.row_stats / write_logit_grad_ (C++/OpenMP) against mempo/ops/epilogue.py
and float64; plus the loader mempo._native (fallback, MEMPO_DISABLE_EXT, one warning)."""
import os
import subprocess
import sys

import pytest
import torch

from mempo._native import native_error, native_ops
from mempo.ops import epilogue

native = native_ops()
needs_native = pytest.mark.skipif(native is None, reason=f"mempo._C unavailable: {native_error()}")

# (C, V): ragged; V below, at and around the SIMD widths (4/8/16 lanes) and the 2048 block.
SHAPES = [(1, 1), (3, 7), (5, 16), (9, 17), (33, 1000), (16, 2047), (7, 2049), (4, 4099)]
F32 = dict(rtol=2e-6, atol=2e-6)  # stats: lse ~ 10 carries float32 rounding ~1e-6
GRAD32 = dict(rtol=1e-5, atol=1e-5)  # gradients ~1: p = exp(z - lse) inherits lse's rounding


def _inputs(c, v, scale=3.0):
    return torch.randn(c, v) * scale, torch.randint(0, v, (c,))


def _stats64(logits, targets, inv_t, with_entropy):
    return epilogue.row_stats(logits.double(), targets, inv_t, with_entropy)


def _grad64(logits, targets, inv_t, g_lp, g_ent):
    lse, _, mean_z = _stats64(logits, targets, inv_t, g_ent is not None)
    return epilogue.write_logit_grad_(
        logits.double(), targets, inv_t, lse, g_lp.double(),
        None if g_ent is None else g_ent.double(), mean_z if g_ent is not None else None)


@needs_native
@pytest.mark.parametrize("c,v", SHAPES)
@pytest.mark.parametrize("inv_t", [1.0, 1 / 0.7])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_row_stats_matches_torch_and_float64(seed, c, v, inv_t, with_entropy):
    logits, targets = _inputs(c, v)
    before = logits.clone()
    got = native.row_stats(logits, targets, inv_t, with_entropy)
    assert torch.equal(logits, before), "row_stats must not modify logits"
    want32 = epilogue.row_stats(logits, targets, inv_t, with_entropy)
    want64 = _stats64(logits, targets, inv_t, with_entropy)
    assert (got[2] is None) == (not with_entropy)
    for g, w32, w64 in zip(got, want32, want64):
        if w64 is None:
            continue
        assert g.dtype == torch.float32 and g.shape == (c,)
        torch.testing.assert_close(g.double(), w64, **F32)
        torch.testing.assert_close(g, w32, rtol=4e-6, atol=4e-6)


@needs_native
@pytest.mark.parametrize("c,v", SHAPES)
@pytest.mark.parametrize("inv_t", [1.0, 1 / 0.7])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_write_logit_grad_matches_torch_and_float64(seed, c, v, inv_t, with_entropy):
    logits, targets = _inputs(c, v)
    g_lp = torch.randn(c)
    g_ent = torch.randn(c) if with_entropy else None
    lse, _, mean_z = native.row_stats(logits, targets, inv_t, with_entropy)
    buf = logits.clone()
    out = native.write_logit_grad_(buf, targets, inv_t, lse, g_lp, g_ent, mean_z)
    assert out.data_ptr() == buf.data_ptr(), "the gradient is written in place"
    torch.testing.assert_close(out.double(), _grad64(logits, targets, inv_t, g_lp, g_ent), **GRAD32)
    want32 = epilogue.write_logit_grad_(logits.clone(), targets, inv_t, lse, g_lp, g_ent, mean_z)
    torch.testing.assert_close(out, want32, **GRAD32)


@needs_native
@pytest.mark.parametrize("with_entropy", [False, True])
def test_extreme_logits(seed, with_entropy):
    v = 1031
    rows = [
        torch.full((v,), 1e4),                                  # all equal, huge
        torch.full((v,), -1e4),                                 # all equal, very negative
        torch.zeros(v),                                         # all equal
        torch.where(torch.rand(v) < 0.5, 1e4, -1e4),            # +-1e4 mixed
        torch.randn(v) * 1e3,                                   # |z| ~ 1e3
        torch.cat([torch.full((v - 1,), -1e4), torch.tensor([1e4])]),  # max at the very end
    ]
    logits = torch.stack(rows)
    targets = torch.randint(0, v, (len(rows),))
    for inv_t in (1.0, 1 / 0.7):
        lse, z_t, mean_z = native.row_stats(logits, targets, inv_t, with_entropy)
        w_lse, w_zt, w_mean = _stats64(logits, targets, inv_t, with_entropy)
        # float32 z ~ 1e4 carries ~1e-3 absolute rounding: compare relative to |z|.
        torch.testing.assert_close(lse.double(), w_lse, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(z_t.double(), w_zt, rtol=1e-7, atol=0)
        if with_entropy:
            torch.testing.assert_close(mean_z.double(), w_mean, rtol=1e-6, atol=1e-6)
        g_lp, g_ent = torch.randn(len(rows)), (torch.randn(len(rows)) if with_entropy else None)
        grad = native.write_logit_grad_(logits.clone(), targets, inv_t, lse, g_lp, g_ent, mean_z)
        assert torch.isfinite(grad).all()
        # lse is a float32 output: at |lse| ~ 1e3-1.4e4 its rounding (up to 5e-4) passes into
        # p = exp(z - lse), so the gradient can be no closer than that (PyTorch's float32 too):
        # inv_t * 5e-4 * (|g_lp| p + |g_ent| p (1 + H)), and p (1 + H) <= 2 for any row.
        bound = g_lp.abs().max().item() + (2 * g_ent.abs().max().item() if with_entropy else 0.0)
        torch.testing.assert_close(grad.double(), _grad64(logits, targets, inv_t, g_lp, g_ent),
                                   rtol=1e-4, atol=5e-4 * inv_t * bound)
    # All-equal rows: p = 1/V exactly, lse = z + log V, mean_z = z.
    lse, _, mean_z = native.row_stats(logits[:3], targets[:3], 1.0, True)
    torch.testing.assert_close(lse.double(), logits[:3, 0].double() + torch.log(torch.tensor(v, dtype=torch.float64)),
                               rtol=1e-7, atol=1e-5)
    torch.testing.assert_close(mean_z, logits[:3, 0], rtol=1e-7, atol=1e-5)


@needs_native
def test_masked_logits_give_finite_entropy(seed):
    """-inf logits (masked vocabulary) have p = 0 and add nothing, not NaN, to the entropy."""
    logits, targets = _inputs(6, 300)
    mask = torch.rand(6, 300) < 0.3
    mask[torch.arange(6), targets] = False
    logits[mask] = float("-inf")
    lse, _, mean_z = native.row_stats(logits, targets, 1.0, True)
    z = logits.double()
    p = torch.softmax(z, -1)
    torch.testing.assert_close(lse.double(), torch.logsumexp(z, -1), **F32)
    torch.testing.assert_close(mean_z.double(), (p * z.nan_to_num(neginf=0.0)).sum(-1), **F32)


@needs_native
def test_large_vocab_precision(seed):
    logits, targets = _inputs(4, 151936, scale=5.0)
    got = native.row_stats(logits, targets, 1.0, True)
    for g, w in zip(got, _stats64(logits, targets, 1.0, True)):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5)


@needs_native
def test_result_does_not_depend_on_thread_count(seed):
    logits, targets = _inputs(37, 2000)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.row_stats(logits, targets, 0.9, True)
        torch.set_num_threads(max(2, threads))
        many = native.row_stats(logits, targets, 0.9, True)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


@needs_native
def test_bad_inputs_raise_clear_errors():
    logits, targets = _inputs(4, 10)
    lse, _, mean_z = native.row_stats(logits, targets, 1.0, True)
    g = torch.zeros(4)
    with pytest.raises(ValueError, match="float32"):
        native.row_stats(logits.bfloat16(), targets, 1.0, False)
    with pytest.raises(ValueError, match="contiguous"):
        native.row_stats(torch.randn(10, 4).t(), targets, 1.0, False)
    with pytest.raises(ValueError, match="2-D"):
        native.row_stats(logits.reshape(-1), targets, 1.0, False)
    with pytest.raises(ValueError, match="targets"):
        native.row_stats(logits, targets[:3], 1.0, False)
    with pytest.raises(ValueError, match="targets"):
        native.row_stats(logits, targets.int(), 1.0, False)
    with pytest.raises(IndexError, match=r"targets\[2\] = 10 is out of range \[0, 10\)"):
        native.row_stats(logits, torch.tensor([0, 1, 10, 3]), 1.0, False)
    with pytest.raises(IndexError, match="out of range"):
        native.write_logit_grad_(logits.clone(), torch.tensor([0, -1, 2, 3]), 1.0, lse, g)
    with pytest.raises(ValueError, match="grad_logp"):
        native.write_logit_grad_(logits.clone(), targets, 1.0, lse, g[:3])
    with pytest.raises(ValueError, match="together"):
        native.write_logit_grad_(logits.clone(), targets, 1.0, lse, g, g, None)
    with pytest.raises(ValueError, match="mean_z"):
        native.write_logit_grad_(logits.clone(), targets, 1.0, lse, g, g, mean_z.double())


def _python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "MEMPO_DISABLE_EXT"} | env
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=full_env, timeout=120)


LOADER_PROBE = """
import sys, warnings
sys.modules["mempo._C"] = None  # what a missing or unloadable build looks like: ImportError
warnings.simplefilter("always")  # count the loader's own once-only logic, not the filter's
with warnings.catch_warnings(record=True) as caught:
    import mempo
    from mempo._native import native_error, native_ops
    assert native_ops() is None and native_ops() is None
    error = native_error()
print(len(caught))
print(caught[0].message if caught else "")
print(error)
"""


def test_missing_extension_warns_once_and_says_how_to_build():
    result = _python(LOADER_PROBE)
    assert result.returncode == 0, result.stderr
    count, message, error = result.stdout.strip().splitlines()
    assert count == "1"
    assert "pip install --no-build-isolation -e ." in message
    assert error.startswith("ModuleNotFoundError") and error in message  # says why


def test_disable_env_forces_fallback_without_warning():
    result = _python(LOADER_PROBE.replace('sys.modules["mempo._C"] = None', ""), MEMPO_DISABLE_EXT="1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines() == ["0", "", "disabled by MEMPO_DISABLE_EXT=1"]


@pytest.mark.parametrize("temperature, scale", [(1e-10, 0.1), (0.7, 2e9), (1.0, 3e9)])
def test_native_epilogue_extreme_logits_over_temperature(temperature, scale):
    from mempo.ops.epilogue import available_backends, epilogue_stats

    if "native" not in available_backends(torch.device("cpu")):
        pytest.skip("mempo._C is not built")
    torch.manual_seed(0)
    logits = torch.randn(6, 300) * scale
    targets = torch.randint(0, 300, (6,))
    ref = torch.log_softmax(logits.double() / temperature, -1).gather(1, targets[:, None]).squeeze(1)
    for backend in ("native", "torch"):
        lse, logp, _ = epilogue_stats(backend, logits.clone(), targets, 1.0 / temperature, False)
        assert torch.isfinite(lse).all() and (logp <= 0).all(), backend
        # float32 cannot resolve z ~ 1e9 finer than its spacing (64): compare at that scale
        assert (logp.double() - ref).abs().max() <= 1e-6 * ref.abs().max() + 256, backend

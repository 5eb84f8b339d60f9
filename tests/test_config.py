"""Config: YAML + command-line overrides, parsing of every value kind, clear errors."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from mempo.config import (
    KL_ESTIMATORS,
    LOSS_AGGREGATIONS,
    SECTIONS,
    Config,
    ConfigError,
    config_from_yaml,
    help_text,
    parse_args,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_are_valid_and_tiny_yaml_lists_them_all():
    assert config_from_yaml(CONFIGS / "tiny.yaml") == Config().validate()
    import yaml
    listed = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())
    assert {s: set(v) for s, v in listed.items()} == {s: set(v) for s, v in Config().to_dict().items()}


def test_both_override_conventions_and_value_kinds():
    cfg = parse_args(["--rollout.group_size", "16", "optimizer.lr=1e-6", "--algorithm.dual_clip=3",
                      "--model.activation_checkpointing", "--env.eval_objectives", "1,2,8",
                      "env.train_objectives=[1, 4]", "--optimizer.betas", "0.8,0.9",
                      "--algorithm.scale_by_std", "false", "--env.info_max_chars", "none",
                      "--trainer.name", "7"])
    assert cfg.rollout.group_size == 16 and isinstance(cfg.rollout.group_size, int)
    assert cfg.optimizer.lr == 1e-6 and cfg.algorithm.dual_clip == 3.0
    assert cfg.model.activation_checkpointing is True and cfg.algorithm.scale_by_std is False
    assert cfg.env.eval_objectives == [1, 2, 8] and cfg.env.train_objectives == [1, 4]
    assert cfg.optimizer.betas == [0.8, 0.9] and cfg.env.info_max_chars is None
    assert cfg.trainer.name == "7"


def test_shortcuts(tmp_path):
    cfg = parse_args(["--resume", "never", "--name", "ablation-g8"])
    assert cfg.trainer.resume == "never" and cfg.trainer.name == "ablation-g8"
    assert parse_args([f"resume={tmp_path}"]).trainer.resume == str(tmp_path)


def test_bare_boolean_flag_before_another_override():
    cfg = parse_args(["--model.activation_checkpointing", "rollout.group_size=8", "--logging.tensorboard"])
    assert cfg.model.activation_checkpointing and cfg.logging.tensorboard and cfg.rollout.group_size == 8


def test_file_then_overrides_in_order(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("rollout:\n  group_size: 8\n  batch_size: 4\noptimizer:\n  lr: 2.0e-5\n")
    cfg = parse_args(["--rollout.group_size", "6", "--config", str(path), "rollout.group_size=3"])
    assert (cfg.rollout.group_size, cfg.rollout.batch_size, cfg.optimizer.lr) == (3, 4, 2e-5)


@pytest.mark.parametrize("argv, message", [
    (["--rollout.group_szie", "3"],
     r"unknown key of \[rollout\] 'group_szie'. Did you mean 'group_size'\?.*batch_size"),
    (["--rollut.group_size", "3"], r"unknown config section 'rollut'. Did you mean 'rollout'\?"),
    (["--group_size", "3"], r"overrides are written section.key"),
    (["--rollout.group_size", "1"], r"rollout.group_size must be >= 2"),
    (["--rollout.group_size", "two"], r"rollout.group_size must be an integer, got 'two'"),
    (["--rollout.group_size", "2.5"], r"rollout.group_size must be an integer"),
    (["--optimizer.lr", "-1e-4"], r"optimizer.lr must be > 0, got -0.0001"),
    (["--rollout.engine", "sglang"], r"rollout.engine must be one of \['native', 'vllm'\], got 'sglang'"),
    (["--algorithm.loss_agg", "mean"], r"algorithm.loss_agg must be one of"),
    (["--model.activation_checkpointing", "maybe"], r"model.activation_checkpointing must be true or false"),
    (["--model.num_kv_heads", "3"], r"model.num_kv_heads must be a divisor of num_heads=4"),
    (["--env.eval_objectives", "1,0"], r"env.eval_objectives must be a non-empty list of counts >= 1"),
    (["--env.tasks_per_count", "0"], r"env.tasks_per_count must be >= 1, got 0"),
    (["--sft.decay_fraction", "1.5"], r"sft.decay_fraction must be in \[0, 1\], got 1.5"),
    (["--optimizer.betas", "0.9"], r"optimizer.betas must be two values"),
    (["--trainer.steps"], r"--trainer.steps needs a value"),
    (["stray"], r"cannot parse argument 'stray'"),
    (["--env.search", "http"], r"env.search_url must be a URL"),
])
def test_invalid_overrides_are_clear_errors(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(argv)


def test_paths_are_checked_before_anything_loads(tmp_path):
    missing = str(tmp_path / "no-model")
    with pytest.raises(ConfigError, match=f"model.path must be an existing local directory, got '{missing}'"):
        parse_args(["--model.path", missing])
    with pytest.raises(ConfigError, match="env.train_tasks_path must be a readable file"):
        parse_args(["--env.train_tasks_path", str(tmp_path / "tasks.jsonl")])
    with pytest.raises(ConfigError, match="trainer.resume must be 'auto', 'never' or an existing checkpoint"):
        parse_args(["--trainer.resume", str(tmp_path / "ckpt")])
    assert parse_args(["--model.path", str(tmp_path)]).model.path == str(tmp_path)


def test_config_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file .*nope.yaml"):
        parse_args(["--config", str(tmp_path / "nope.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("rollout: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml.* is not valid YAML"):
        parse_args(["--config", str(bad)])
    typed = tmp_path / "typed.yaml"
    typed.write_text("rollout:\n  group_size: 4.5\n")
    with pytest.raises(ConfigError, match="rollout.group_size must be an integer, got 4.5"):
        parse_args(["--config", str(typed)])
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("rollout:\n  grop_size: 4\n")
    with pytest.raises(ConfigError, match="Did you mean 'group_size'"):
        parse_args(["--config", str(unknown)])
    flat = tmp_path / "flat.yaml"
    flat.write_text("rollout: 4\n")
    with pytest.raises(ConfigError, match="section 'rollout' must be a mapping"):
        parse_args(["--config", str(flat)])


def test_7b_recipe_requires_model_path_server_and_task_files(tmp_path):
    with pytest.raises(ConfigError, match="model.path is required by this config: set it with --model.path"):
        parse_args(["--config", str(CONFIGS / "qwen2.5-7b.yaml")])
    args = ["--config", str(CONFIGS / "qwen2.5-7b.yaml"), "--model.path", str(tmp_path),
            "--env.search_url", "http://localhost:8000/retrieve"]
    with pytest.raises(ConfigError, match="env.train_tasks_path is required by this config"):
        parse_args(args)
    (tmp_path / "t.jsonl").write_text('{"question": "Q?", "answers": ["a"]}\n')
    cfg = parse_args(args + ["--env.train_tasks_path", str(tmp_path / "t.jsonl"),
                             "--env.eval_tasks_path", str(tmp_path / "t.jsonl")])
    assert cfg.env.uses_files and cfg.env.search == "http"
    paper = (cfg.rollout.group_size, cfg.rollout.batch_size, cfg.optimizer.lr, cfg.rollout.max_turns)
    assert paper == (16, 128, 1e-6, 16)
    assert cfg.model.dtype == "bfloat16" and cfg.model.activation_checkpointing


def test_yaml_round_trip(tmp_path):
    cfg = parse_args(["--rollout.group_size", "5", "--algorithm.dual_clip", "3.0", "--env.eval_objectives", "1,4"])
    path = tmp_path / "saved.yaml"
    path.write_text(cfg.to_yaml())
    assert config_from_yaml(path) == cfg


def test_help_lists_every_field_with_default_and_doc():
    text = help_text()
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f"--{section}.{f.name} (default: " in text
            assert f.metadata.get("doc"), f"{section}.{f.name} has no doc"
    proc = subprocess.run([sys.executable, "-c", "from mempo.config import parse_args; parse_args(['--help'])"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--rollout.group_size (default: 4)" in proc.stdout


def test_choices_mirror_the_loss_options():
    from mempo.ops.policy_loss import KL_ESTIMATORS as OPS_KL
    from mempo.ops.policy_loss import LOSS_AGGREGATIONS as OPS_AGG
    from mempo.rollout.context_policy import POLICIES

    assert LOSS_AGGREGATIONS == OPS_AGG and KL_ESTIMATORS == OPS_KL
    hints = {s: typing.get_type_hints(c) for s, c in SECTIONS.items()}
    assert typing.get_args(hints["rollout"]["context_policy"]) == POLICIES
    assert typing.get_args(hints["algorithm"]["loss_agg"]) == OPS_AGG


def test_config_module_does_not_import_torch():
    proc = subprocess.run([sys.executable, "-c", "import sys, mempo.config; print('torch' in sys.modules)"],
                          capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "False"


def test_own_data_combinations_that_cannot_work_are_config_errors(tmp_path):
    tasks = tmp_path / "t.jsonl"
    tasks.write_text('{"question": "Q?", "answers": ["a"]}\n')
    files = ["--env.train_tasks_path", str(tasks), "--env.eval_tasks_path", str(tasks)]
    model = ["--model.path", str(tmp_path)]
    cases = [
        (files + model + ["--sft.steps", "0"], r"env.corpus_path must be a JSONL corpus for search=bm25"),
        (["--env.corpus_path", str(tasks), "--sft.steps", "0"] + model, r"env.train_tasks_path must be a task file"),
        (files + ["--env.corpus_path", str(tasks), "--sft.steps", "0"], r"model.path must be a local model directory"),
        (files + model + ["--env.corpus_path", str(tasks)],
         r"sft.data_path must be a demonstrations file for sft.steps=700"),
        (["--env.search_url", "http://h:1/retrieve"], r"env.search_url must be None unless env.search is 'http'"),
        (["--env.search", "http", "--env.search_url", "h:1/retrieve"],
         r"env.search_url must be an http:// or https:// URL"),
        (["--env.search", "http", "--env.search_url", "http://h:1/r", "--env.corpus_path", str(tasks)],
         r"env.corpus_path must be None when env.search is 'http'"),
        (["--sft.data_path", str(tmp_path / "none.jsonl")], r"sft.data_path must be a readable file"),
        (["--sft.data_path", str(tasks), "--sft.steps", "0"], r"sft.data_path must be None when sft.steps is 0"),
        (["--env.prompt_format", "chatml"], r"env.prompt_format must be one of \['auto', 'chat', 'plain'\]"),
    ]
    for argv, message in cases:
        with pytest.raises(ConfigError, match=message):
            parse_args(argv)
    ok = parse_args(files + model + ["--env.corpus_path", str(tasks), "--sft.data_path", str(tasks)])
    assert ok.env.uses_files and not Config().env.uses_files


def _config_reads() -> set[tuple[str, str]]:
    """(section, field) pairs that library code reads: `x.section.field` chains, `p.field` /
    `self.a.field` where p is a parameter annotated with a section class (stored as self.a),
    and properties of the config classes (validation alone is not a reader)."""
    import ast

    classes = {cls.__name__: name for name, cls in SECTIONS.items()}
    reads = set()
    root = Path(__file__).resolve().parents[1]
    for path in sorted((root / "mempo").rglob("*.py")) + sorted((root / "kernels").rglob("*.py")):
        tree = ast.parse(path.read_text())
        if path.name == "config.py" and path.parent.name == "mempo":  # only its properties count as readers
            for cls in (n for n in tree.body if isinstance(n, ast.ClassDef) and n.name in classes):
                for fn in (f for f in cls.body if isinstance(f, ast.FunctionDef)
                           and any(getattr(d, "id", None) == "property" for d in f.decorator_list)):
                    reads |= {(classes[cls.name], a.attr) for a in ast.walk(fn) if isinstance(a, ast.Attribute)
                              and isinstance(a.value, ast.Name) and a.value.id == "self"}
            continue
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                    and node.value.attr in SECTIONS):
                reads.add((node.value.attr, node.attr))
        for scope in ast.walk(tree):
            if not isinstance(scope, (ast.FunctionDef, ast.ClassDef)):
                continue
            functions = [scope] if isinstance(scope, ast.FunctionDef) else \
                [f for f in scope.body if isinstance(f, ast.FunctionDef)]
            typed = {}  # local or self attribute name -> section
            for fn in functions:
                for arg in fn.args.args + fn.args.kwonlyargs:
                    ann = arg.annotation
                    name = ann.id if isinstance(ann, ast.Name) else ann.value if isinstance(ann, ast.Constant) else None
                    if name in classes:
                        typed[arg.arg] = classes[name]
                        for sub in ast.walk(fn):  # self.cfg = cfg
                            if (isinstance(sub, ast.Assign) and isinstance(sub.value, ast.Name)
                                    and sub.value.id == arg.arg and isinstance(sub.targets[0], ast.Attribute)):
                                typed["self." + sub.targets[0].attr] = classes[name]
            for sub in ast.walk(scope):
                if isinstance(sub, ast.Attribute):
                    base = sub.value
                    key = base.id if isinstance(base, ast.Name) else \
                        f"self.{base.attr}" if isinstance(base, ast.Attribute) and isinstance(base.value, ast.Name) \
                        and base.value.id == "self" else None
                    if key in typed:
                        reads.add((typed[key], sub.attr))
    return reads


def test_every_config_field_is_read_by_the_code():
    reads = _config_reads()
    unread = [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)
              if (s, f.name) not in reads]
    assert not unread, f"config fields that nothing reads (wire them or remove them): {unread}"


def test_every_yaml_and_readme_option_is_a_field():
    import re

    import yaml

    known = {f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    for path in CONFIGS.glob("*.yaml"):
        for section, values in yaml.safe_load(path.read_text()).items():
            assert {f"{section}.{k}" for k in values} <= known, path
    readme = (CONFIGS.parent / "README.md").read_text()
    options = set(re.findall(r"--((?:" + "|".join(SECTIONS) + r")\.[a-z_]+)", readme))
    assert options and options <= known, options - known


def test_save_and_eval_conditions():
    """Checkpoints at the end of the warm start, every save_every RL steps and at the end;
    mid-run evaluations every eval_every RL steps, never at the end (the final one runs anyway)."""
    from mempo.trainer import should_evaluate, should_save

    cfg = parse_args(["--sft.steps", "5", "--trainer.steps", "7", "--trainer.save_every", "3",
                      "--trainer.eval_every", "2"])
    assert [d for d in range(1, 13) if should_save(cfg, d)] == [5, 8, 11, 12]
    assert [d for d in range(1, 13) if should_evaluate(cfg, d)] == [7, 9, 11]
    cfg = parse_args(["--sft.steps", "0", "--trainer.steps", "4", "--trainer.save_every", "0"])
    assert [d for d in range(1, 5) if should_save(cfg, d)] == [4]
    assert not any(should_evaluate(cfg, d) for d in range(1, 5))


@pytest.mark.parametrize("argv, message", [
    (["--trainer.name", ".."], "trainer.name must be a non-empty name without"),
    (["--trainer.name", "."], "trainer.name must be a non-empty name without"),
    (["--optimizer.lr", "inf"], "optimizer.lr must be finite"),
    (["--rollout.temperature", "inf"], "rollout.temperature must be finite"),
    (["--sft.lr", "nan"], "sft.lr must be finite"),
    (["--optimizer.betas", "0.9,nan"], "optimizer.betas must be finite"),
])
def test_config_rejects_escaping_names_and_nonfinite_numbers(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(argv)

"""load_tasks (JSONL, parquet) and the N-objective composer."""
import json
from collections import Counter

import pytest

from mempo.envs import Task, compose_multi_objective, load_tasks


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_load_jsonl(tmp_path):
    rows = [{"id": "a", "question": "Q1?", "answers": ["x", "y"]},
            {"question": " Q2? ", "answers": ["z"]}]
    tasks = load_tasks(_write_jsonl(tmp_path / "t.jsonl", rows))
    assert tasks[0] == Task("a", ("Q1?",), (("x", "y"),))
    assert tasks[1].questions == ("Q2?",) and tasks[1].id == "t.jsonl:2"


@pytest.mark.parametrize("row,field", [
    ({"answers": ["x"]}, "question"),
    ({"question": "Q", "answers": 3}, "answers"),
    ({"question": "Q", "answers": [["x"]]}, "answers"),
    ({"questions": ["Q1", "Q2"], "answers": [["x"]]}, "one answer list per question"),
    ({"questions": "Q1", "answers": [["x"]]}, "questions"),
    ({"question": "Q", "golden_answers": []}, "golden_answers"),
    ({"question": "Q", "answers": []}, "answers"),
    ({"question": "Q", "answers": ["x", ""]}, "answers"),
    ({"question": "", "answers": ["x"]}, "question"),
])
def test_bad_rows_name_the_field(tmp_path, row, field):
    with pytest.raises(ValueError, match=field):
        load_tasks(_write_jsonl(tmp_path / "t.jsonl", [row]))


def test_bad_files(tmp_path):
    with pytest.raises(ValueError, match="not a file"):
        load_tasks(tmp_path / "missing.jsonl")
    (tmp_path / "t.csv").write_text("q,a\n")
    with pytest.raises(ValueError, match="jsonl"):
        load_tasks(tmp_path / "t.csv")
    (tmp_path / "bad.jsonl").write_text('{"question": "Q", "answers": ["a"]}\n{oops\n')
    with pytest.raises(ValueError, match="line 2"):
        load_tasks(tmp_path / "bad.jsonl")


def test_load_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    table = pa.table({"id": ["a", "b"], "question": ["Q1?", "Q2?"], "answers": [["x"], ["y", "z"]]})
    pq.write_table(table, tmp_path / "t.parquet")
    tasks = load_tasks(tmp_path / "t.parquet")
    assert [t.answers for t in tasks] == [(("x",),), (("y", "z"),)]


def test_search_r1_and_multi_objective_layouts(tmp_path):
    rows = [{"id": "nq1", "question": "Q1?", "golden_answers": ["x", "X"]},
            {"question": "Q2?", "reward_model": {"style": "rule", "ground_truth": {"target": ["y"]}}},
            {"question": "Q3?", "answers": "z"},
            {"id": "m", "questions": ["A?", "B?"], "answers": [["a"], "b"]}]
    tasks = load_tasks(_write_jsonl(tmp_path / "t.jsonl", rows))
    assert tasks[0] == Task("nq1", ("Q1?",), (("x", "X"),))
    assert tasks[1].answers == (("y",),) and tasks[2].answers == (("z",),)
    assert tasks[3] == Task("m", ("A?", "B?"), (("a",), ("b",)))


def test_search_r1_parquet_with_nested_target(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    table = pa.table({"question": ["Q1?"], "data_source": ["nq"],
                      "reward_model": [{"style": "rule", "ground_truth": {"target": ["x", "y"]}}]})
    pq.write_table(table, tmp_path / "t.parquet")
    assert load_tasks(tmp_path / "t.parquet")[0].answers == (("x", "y"),)


def test_unknown_layout_lists_found_and_accepted_columns(tmp_path):
    path = _write_jsonl(tmp_path / "t.jsonl", [{"prompt": [{"role": "user", "content": "Q"}], "target": "x"}])
    with pytest.raises(ValueError, match=r"t.jsonl:1: no question column; found columns \['prompt', 'target'\]; "
                                         r"accepted: .*golden_answers.*reward_model.ground_truth.target"):
        load_tasks(path)


@pytest.mark.parametrize("num_singles,num_objectives", [(10, 3), (5, 4), (4, 4), (7, 1)])
def test_compose(seed, num_singles, num_objectives):
    singles = [Task(f"s{i}", (f"Q{i}?",), ((f"a{i}",),)) for i in range(num_singles)]
    tasks = compose_multi_objective(singles, num_objectives, 40, seed)
    assert len(tasks) == 40
    usage = Counter()
    for task in tasks:
        assert task.num_objectives == num_objectives
        assert len(set(task.questions)) == num_objectives
        for q, a in zip(task.questions, task.answers):
            i = int(q[1:-1])
            assert a == (f"a{i}",)  # answers stay aligned with their questions
            usage[i] += 1
    assert max(usage.values()) - min(usage.values()) <= 1  # permutations use questions evenly
    assert compose_multi_objective(singles, num_objectives, 40, seed) == tasks
    assert compose_multi_objective(singles, num_objectives, 40, seed + 1) != tasks


def test_compose_bad_arguments():
    singles = [Task("a", ("Q?",), (("a",),)), Task("b", ("R?",), (("b",),))]
    with pytest.raises(ValueError, match="num_objectives"):
        compose_multi_objective(singles, 3, 1, 0)
    with pytest.raises(ValueError, match="single-objective"):
        compose_multi_objective(compose_multi_objective(singles, 2, 1, 0), 1, 1, 0)
    with pytest.raises(ValueError):
        Task("x", ("Q1", "Q2"), (("a",),))

"""Tasks and verifiers: answer extraction and comparison, rewards, and the task loaders on local data."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pytest

from interlayer import arithmetic
from interlayer.data import hash_fraction
from interlayer.errors import UserError
from interlayer.steering import tasks
from interlayer.steering.tasks import (
    TaskProblem,
    answers_equal,
    arithmetic_task,
    extract_boxed,
    extract_hash_answer,
    file_task,
    final_answer,
    gsm8k_task,
    is_correct,
    load_task,
    math_task,
    parse_number,
    run_verifier,
    verify_final_answer,
)

PROBLEM = TaskProblem("Question: what is 4 + 5?\nAnswer:", "9", "unit:test#3")


def test_extract_hash_answer() -> None:
    assert extract_hash_answer("2 + 2 = 4.\n#### 1,234.\n#### 7") == "1234"
    assert extract_hash_answer("####   -12  \nrest") == "-12"
    assert extract_hash_answer("#### (1,2)") == "(1,2)"  # not thousands separators: kept
    assert extract_hash_answer("no marker") is None
    assert extract_hash_answer("#### \nnext line") is None


def test_extract_boxed() -> None:
    assert extract_boxed("a \\boxed{\\frac{1}{2}} b") == "\\frac{1}{2}"
    assert extract_boxed("\\boxed{1} and then \\fbox{ 2 }") == "2"
    assert extract_boxed("\\boxed{\\{1,2\\}}") == "\\{1,2\\}"
    assert extract_boxed("\\boxed{3} \\boxed{\\frac{1}{2}") is None  # the last one is unbalanced
    assert extract_boxed("no box, {braces}") is None


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("42", Fraction(42)),
        ("-7", Fraction(-7)),
        ("0.25", Fraction(1, 4)),
        (".5", Fraction(1, 2)),
        ("1,234", Fraction(1234)),
        ("1{,}234.5", Fraction(2469, 2)),
        ("$5", Fraction(5)),
        ("\\$ 5.", Fraction(5)),
        ("50%", Fraction(50)),
        ("50\\%", Fraction(50)),
        ("3/4", Fraction(3, 4)),
        ("\\frac{1}{2}", Fraction(1, 2)),
        ("-\\dfrac{6}{4}", Fraction(-3, 2)),
        ("\\tfrac{-1}{3}", Fraction(-1, 3)),
        ("\\frac12", Fraction(1, 2)),
        ("1,2", None),
        ("1/0", None),
        ("\\frac{1}{0}", None),
        ("x + 1", None),
        ("2^3", None),
        ("", None),
    ],
)
def test_parse_number(text: str, value: Fraction | None) -> None:
    assert parse_number(text) == value


def test_answers_equal() -> None:
    assert answers_equal("1,234.0", "1234")
    assert answers_equal("0.5", "\\frac{1}{2}")
    assert answers_equal("$50", "50%")
    assert not answers_equal("3", "4")
    assert not answers_equal("0.33", "1/3")  # exact, no tolerance
    assert answers_equal("\\text{(C)}", "(C)")
    assert answers_equal("$\\left( 1, 2 \\right)$", "(1,2)")
    assert answers_equal("\\dfrac{\\sqrt{3}}{2}", "\\frac{\\sqrt 3}{2}") is False  # only spacing/wrappers
    assert answers_equal("\\dfrac{x}{2}", "\\frac{x}{2}")
    assert not answers_equal("x", "y")


def test_final_answer_and_verify() -> None:
    assert final_answer("\\boxed{3}\n#### 9") == "9"  # the #### answer wins
    assert final_answer("so \\boxed{1} or \\boxed{\\frac{9}{1}}") == "\\frac{9}{1}"
    assert final_answer("no answer here") is None
    assert verify_final_answer(" 4 + 5 = 9.\n#### 9", PROBLEM)
    assert verify_final_answer("the answer is $\\boxed{9.0}$", PROBLEM)
    assert not verify_final_answer("#### 10", PROBLEM)
    assert not verify_final_answer("9", PROBLEM)


def _returns(value: Any) -> Any:
    """A verifier returning ``value`` (typed Any: numpy scalars are not bool | float to mypy)."""
    return lambda completion, problem: value


def test_run_verifier_rewards() -> None:
    assert run_verifier(lambda c, p: True, "", PROBLEM) == 1.0
    assert run_verifier(lambda c, p: False, "", PROBLEM) == -1.0
    assert run_verifier(_returns(np.bool_(True)), "", PROBLEM) == 1.0
    assert run_verifier(lambda c, p: 0.25, "", PROBLEM) == 0.25
    assert run_verifier(_returns(np.float32(-2.0)), "", PROBLEM) == -2.0
    assert run_verifier(verify_final_answer, "#### 9", PROBLEM) == 1.0
    assert is_correct(1.0) and is_correct(0.25) and not is_correct(0.0) and not is_correct(-1.0)


def test_run_verifier_errors_name_the_problem() -> None:
    def broken(completion: str, problem: TaskProblem) -> bool:
        raise KeyError("score")

    with pytest.raises(UserError) as raised:
        run_verifier(broken, "#### 9", PROBLEM)
    assert str(raised.value) == (
        "the verifier raised KeyError: 'score' on problem unit:test#3: 'Question: what is 4 + 5?\\nAnswer:'"
    )
    with pytest.raises(UserError, match="unit:test#3"):
        run_verifier(lambda c, p: math.nan, "", PROBLEM)
    with pytest.raises(UserError, match=r"returned 'yes' \(str\).*unit:test#3"):
        run_verifier(lambda c, p: "yes", "", PROBLEM)  # type: ignore[arg-type, return-value]


def test_arithmetic_task_matches_generator() -> None:
    task = arithmetic_task(train=20, validation=5, test=10, seed=3)
    expected = arithmetic.generate_problems(20, 3, "train")
    assert [p.prompt for p in task.problems["train"]] == [p.prompt for p in expected]
    assert [p.answer for p in task.problems["train"]] == [str(p.answer) for p in expected]
    assert task.problems["test"][4].source == "arith:test#4"
    assert [len(task.problems[s]) for s in ("train", "validation", "test")] == [20, 5, 10]
    assert task.name == "arith" and task.max_new_tokens == 48
    prompts = {s: {p.prompt for p in task.problems[s]} for s in task.problems}
    assert not prompts["train"] & prompts["test"] and not prompts["train"] & prompts["validation"]
    first = expected[0]
    problem = task.problems["train"][0]
    assert run_verifier(task.verifier, first.completion, problem) == 1.0
    assert run_verifier(task.verifier, f" #### {first.answer + 1}", problem) == -1.0
    assert run_verifier(task.verifier, f"\\boxed{{{first.answer}}}", problem) == -1.0  # the zoo's format only
    assert load_task("arith", train=20, validation=5, test=10, seed=3).problems == task.problems


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_file_task_jsonl_single_split(tmp_path: Path) -> None:
    rows: list[dict[str, Any]] = [
        {"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}.\n#### {2 * i:,}"}
        for i in range(600)
    ]
    rows[7]["answer"] = "no marker"  # kept as it is: the reference is the stripped field
    rows[8]["answer"] = "#### "  # has #### but nothing after it: skipped
    rows[9]["question"] = None  # skipped
    task = file_task(_write_jsonl(tmp_path / "sums.jsonl", rows))
    assert task.skipped == 2 and task.max_new_tokens == 512
    by_source = {p.source: p for split in task.problems.values() for p in split}
    assert len(by_source) == 598
    assert by_source["sums.jsonl#599"].answer == "1198"
    assert by_source["sums.jsonl#7"].answer == "no marker"
    assert by_source["sums.jsonl#3"].prompt == "Question: What is 3 + 3?\nAnswer:"
    assert "sums.jsonl#8" not in by_source and "sums.jsonl#9" not in by_source
    for split, problems in task.problems.items():  # the arithmetic hash rule on the question
        assert all(
            arithmetic.split_of(p.prompt[len("Question: ") : -len("\nAnswer:")]) == split for p in problems
        )
    assert [len(task.problems[s]) for s in ("train", "validation", "test")] == [
        sum(arithmetic.split_of(f"What is {i} + {i}?") == s for i in range(600) if i not in (8, 9))
        for s in ("train", "validation", "test")
    ]
    assert 0 < len(task.problems["test"]) < 60 and 0 < len(task.problems["validation"]) < 60
    assert run_verifier(task.verifier, "#### 1,198", by_source["sums.jsonl#599"]) == 1.0


def test_file_task_csv_parquet_json_and_fields(tmp_path: Path) -> None:
    (tmp_path / "p.csv").write_text("q,a\nhow many?,12\nhow much?,\\frac{1}{2}\n")
    task = file_task(tmp_path / "p.csv", question_field="q", answer_field="a")
    problems = sorted((p for s in task.problems.values() for p in s), key=lambda p: p.source)
    assert [(p.source, p.answer) for p in problems] == [("p.csv#0", "12"), ("p.csv#1", "\\frac{1}{2}")]
    datasets.Dataset.from_dict({"question": ["a?", "b?"], "answer": [42, 7]}).to_parquet(
        tmp_path / "p.parquet"
    )
    answers = sorted(p.answer for s in file_task(tmp_path / "p.parquet").problems.values() for p in s)
    assert answers == ["42", "7"]
    (tmp_path / "p.json").write_text(json.dumps([{"question": "c?", "answer": 0.5}]))
    (only,) = [p for s in file_task(tmp_path / "p.json").problems.values() for p in s]
    assert only.answer == "0.5" and verify_final_answer("\\boxed{\\frac{1}{2}}", only)


def test_missing_field_is_one_line_listing_fields(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", [{"problem": "x?", "solution": "1", "level": 2}])
    with pytest.raises(UserError) as raised:
        file_task(path, answer_field="solution")
    assert str(raised.value) == (
        f"dataset {path} has no field 'question'; its fields are: problem, solution, level "
        "(use --question-field)"
    )
    with pytest.raises(UserError) as raised:
        load_task(str(path), train=1, validation=0, test=0, question_field="problem")
    assert str(raised.value) == (
        f"dataset {path} has no field 'answer'; its fields are: problem, solution, level (use --answer-field)"
    )


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="^no such dataset file: .*missing.jsonl$"):
        file_task(tmp_path / "missing.jsonl")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="use a .jsonl, .json, .parquet or .csv file"):
        file_task(tmp_path / "notes.txt")
    with pytest.raises(
        UserError,
        match=r"^no such file or dataset: nowhere \(give a .jsonl/.json/.parquet/.csv file or a hub id\)$",
    ):
        load_task("nowhere", train=1, validation=0, test=0)
    empty = _write_jsonl(
        tmp_path / "e.jsonl", [{"question": "q?", "answer": "#### "}, {"question": "", "answer": "1"}]
    )
    with pytest.raises(UserError, match="no usable problems: none of its 2 rows"):
        file_task(empty)
    with pytest.raises(UserError, match="no {question} placeholder"):
        file_task(empty, prompt_template="Q: {q}")


def _gsm8k_rows(n: int, offset: int) -> dict[str, list[str]]:
    return {
        "question": [f"Sam has {i} pens. How many?" for i in range(offset, offset + n)],
        "answer": [f"He has {i}.\n#### {i * 1000:,}" for i in range(offset, offset + n)],
    }


def test_gsm8k_task_with_a_patched_loader(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, ...]] = []

    def fake(*args: Any, **kwargs: Any) -> datasets.DatasetDict:
        calls.append(args)
        return datasets.DatasetDict(
            train=datasets.Dataset.from_dict(_gsm8k_rows(40, 0)),
            test=datasets.Dataset.from_dict(_gsm8k_rows(3, 100)),
        )

    monkeypatch.setattr(datasets, "load_dataset", fake)
    task = gsm8k_task(validation=3, prompt_template="Q: {question} {x}\nA:")
    assert calls == [("openai/gsm8k", "main")]
    assert task.name == "gsm8k" and task.max_new_tokens == 512 and task.skipped == 0
    test = task.problems["test"]
    assert [p.answer for p in test] == ["100000", "101000", "102000"]
    assert test[1] == TaskProblem("Q: Sam has 101 pens. How many? {x}\nA:", "101000", "gsm8k:test#1")
    held = sorted(range(40), key=lambda i: hash_fraction(f"Sam has {i} pens. How many?"))[:3]
    assert [p.source for p in task.problems["validation"]] == [f"gsm8k:train#{i}" for i in sorted(held)]
    assert len(task.problems["train"]) == 37
    assert {p.source for p in task.problems["train"]}.isdisjoint(
        p.source for p in task.problems["validation"]
    )
    # load_task: the default slice (500, at most a tenth = 4 rows) does not depend on the counts asked for
    small = load_task("gsm8k", train=5, validation=1, test=0)
    large = load_task("gsm8k", train=100, validation=4, test=3)
    assert small.problems["validation"] == large.problems["validation"][:1]
    assert small.problems["train"] == large.problems["train"][:5] and len(large.problems["train"]) == 36
    assert (
        small.problems["test"] == []
        and large.problems["test"][0].prompt == "Question: Sam has 100 pens. How many?\nAnswer:"
    )
    assert run_verifier(large.verifier, "so 100 * 1000.\n#### 100,000", large.problems["test"][0]) == 1.0


def test_math_task_with_a_patched_loader(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake(dataset: str, config: str) -> datasets.DatasetDict:
        assert dataset == "my/math"
        solutions = [f"So it is $\\boxed{{\\frac{{{len(config)}}}{{{k + 2}}}}}$." for k in range(20)]
        solutions[0] = "no box here"
        return datasets.DatasetDict(
            train=datasets.Dataset.from_dict(
                {"problem": [f"{config} {k}" for k in range(20)], "solution": solutions}
            ),
            test=datasets.Dataset.from_dict({"problem": [f"{config} test"], "solution": ["\\boxed{7}"]}),
        )

    monkeypatch.setattr(datasets, "load_dataset", fake)
    task = math_task("my/math", configs=("algebra", "geometry"), validation=2)
    assert task.name == "math" and task.max_new_tokens == 1024 and task.skipped == 2
    assert [(p.source, p.answer) for p in task.problems["test"]] == [
        ("math:algebra:test#0", "7"),
        ("math:geometry:test#0", "7"),
    ]
    assert (
        task.problems["test"][0].prompt
        == "Problem: algebra test\nPut the final answer in \\boxed{}.\nSolution:"
    )
    train = {p.source: p.answer for p in task.problems["train"] + task.problems["validation"]}
    assert len(train) == 38 and len(task.problems["validation"]) == 2
    assert train["math:geometry:train#3"] == "\\frac{8}{5}" and "math:algebra:train#0" not in train
    assert run_verifier(task.verifier, "\\boxed{1.6}", task.problems["test"][0]) == -1.0
    assert verify_final_answer("so \\boxed{1.6}", TaskProblem("", train["math:geometry:train#3"], "s"))


def test_loader_failures_are_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub\n(LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError) as raised:
        load_task("gsm8k", train=1, validation=0, test=0)
    assert str(raised.value) == (
        "could not load dataset openai/gsm8k (config main): "
        "ConnectionError: Couldn't reach 'openai/gsm8k' on the Hub"
    )
    monkeypatch.setattr(
        datasets,
        "load_dataset",
        lambda *a, **k: datasets.DatasetDict(
            dev=datasets.Dataset.from_dict({"x": [1]}), a=datasets.Dataset.from_dict({"x": [1]})
        ),
    )
    with pytest.raises(UserError, match="has the splits dev, a; none is named train, validation or test"):
        tasks.file_task("owner/name", question_field="x", answer_field="x")

"""The arithmetic word-problem generator, its splits, the answer checker and the Wilson interval."""

from __future__ import annotations

import re

import pytest

from interlayer.arithmetic import (
    Problem,
    check_answer,
    generate_problems,
    problem_documents,
    split_of,
    wilson_interval,
)
from interlayer.errors import UserError

STEP = re.compile(r"^(\d+) ([-+*/]) (\d+) = (\d+)\.$")


def test_same_seed_same_problems_other_seed_others() -> None:
    assert generate_problems(200, seed=3) == generate_problems(200, seed=3)
    other = generate_problems(200, seed=4)
    assert len({p.question for p in other} & {p.question for p in generate_problems(200, seed=3)}) < 20


def test_held_out_splits_never_share_a_question_with_training() -> None:
    train = {p.question for p in generate_problems(5000, seed=0, split="train")}
    validation = {p.question for p in generate_problems(500, seed=0, split="validation")}
    test = {p.question for p in generate_problems(500, seed=0, split="test")}
    # Even a test set drawn with the training seed is disjoint: the split is a property of the question.
    test_same_seed = {p.question for p in generate_problems(500, seed=1, split="test")}
    assert len(train) == 5000 and len(validation) == 500 and len(test) == 500
    assert (
        not train & validation and not train & test and not validation & test and not train & test_same_seed
    )
    assert {split_of(q) for q in train} == {"train"}
    assert {split_of(q) for q in validation} == {"validation"}
    assert {split_of(q) for q in test | test_same_seed} == {"test"}


def test_format_and_worked_steps_are_correct() -> None:
    ops = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__, "/": int.__floordiv__}
    problems = generate_problems(2000, seed=0)
    assert {len(p.steps) for p in problems} == {1, 2}
    for p in problems:
        assert p.text == f"Question: {p.question}\nAnswer: {' '.join(p.steps)}\n#### {p.answer}"
        assert p.prompt.endswith("\nAnswer:") and p.text == p.prompt + p.completion
        result = None
        for step in p.steps:
            a, op, b, c = STEP.match(step).groups()  # type: ignore[union-attr]
            assert ops[op](int(a), int(b)) == int(c) >= 0
            if op == "/":
                assert int(a) % int(b) == 0
            result = int(c)
        assert result == p.answer
        assert check_answer(p.completion, p.answer)
    docs = problem_documents(problems[:3], "train")
    assert [d.name for d in docs] == ["arith:train#0", "arith:train#1", "arith:train#2"]
    assert docs[1].text == problems[1].text


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        (" 7 + 5 = 12.\n#### 12", True),
        ("####12", True),
        ("#### 12 and more text #### 13", True),
        ("#### 13\n#### 12", False),  # only the first answer counts
        (" 7 + 5 = 12.\n#### 11", False),
        (" 7 + 5 = 12.", False),  # no final answer: malformed
        ("12", False),
        ("#### twelve", False),
        ("", False),
        ("#### 120", False),
    ],
)
def test_check_answer(completion: str, expected: bool) -> None:
    assert check_answer(completion, 12) is expected


def test_check_answer_negative() -> None:
    assert check_answer("#### -3", -3) and not check_answer("#### -3", 3)


def test_wilson_interval_reference_values() -> None:
    # Reference values computed from the closed form by hand (Wilson 1927).
    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(0.40383, abs=1e-4) and high == pytest.approx(0.59617, abs=1e-4)
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.27753, abs=1e-4)
    low, high = wilson_interval(150, 500)
    assert low < 0.3 < high and high - low == pytest.approx(0.0802, abs=1e-3)


def test_unknown_split() -> None:
    with pytest.raises(UserError, match="split"):
        generate_problems(1, seed=0, split="dev")


def test_problem_is_a_value() -> None:
    p = Problem("Q?", ("1 + 1 = 2.",), 2)
    assert p.completion == " 1 + 1 = 2.\n#### 2"

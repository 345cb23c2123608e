"""Arithmetic word problems with worked solutions: a seeded generator, the answer checker, greedy accuracy.

A problem is printed as exactly::

    Question: Tom has 7 apples. He buys 5 more. Then he gives away 3. How many apples does Tom have now?
    Answer: 7 + 5 = 12. 12 - 3 = 9.
    #### 9

``Problem.prompt`` is the text up to and including ``"Answer:"``; ``Problem.completion`` is the rest (a
space, the worked steps, a newline, ``"#### "`` and the answer in decimal). Every step is ``"a op b = c."``
with ``op`` one of ``+ - *`` and ``/`` (exact division only); all numbers are non-negative integers. There are
eight templates of one or two steps; operands of ``+``/``-`` are drawn from 2..49, factors of ``*`` and
divisors of ``/`` from 2..9, and a subtraction never goes below zero.

Splits are a property of the question, not of the seed: a question ``q`` is in "test" iff
``u = int(sha256(q)[:8], 16) / 2**32 < 0.05``, in "validation" iff ``0.05 <= u < 0.10``, else in "train".
:func:`generate_problems` only returns problems of the split asked for, so the training corpus and the
held-out sets can never share a question, whatever seeds they were drawn with.

The checker (:func:`check_answer`) reads the first ``"#### <integer>"`` of a completion; a completion without
one is wrong.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from interlayer.data import Document, hash_fraction
from interlayer.errors import UserError
from interlayer.models import plain_generation

SPLITS = ("train", "validation", "test")
_TEST_FRACTION = 0.05
_VALIDATION_FRACTION = 0.10
_ANSWER = re.compile(r"####\s*(-?\d+)")

_NAMES = (
    ("Tom", "he"), ("Anna", "she"), ("Ben", "he"), ("Maria", "she"), ("Sam", "he"), ("Lucy", "she"),
    ("Omar", "he"), ("Nina", "she"), ("Jack", "he"), ("Eva", "she"), ("Ravi", "he"), ("Mia", "she"),
    ("Leo", "he"), ("Zoe", "she"), ("Ivan", "he"), ("Emma", "she"),
)  # fmt: skip
_ITEMS = (
    "apples", "pencils", "stickers", "marbles", "books", "cookies", "cards", "stamps", "coins", "shells",
    "balloons", "candies", "toy cars", "flowers", "eggs", "buttons",
)  # fmt: skip
_CONTAINERS = ("bags", "boxes", "jars", "packs", "baskets")


@dataclass(frozen=True)
class Problem:
    """One word problem with its worked solution."""

    question: str
    """The question, one line, ending with ``?``."""
    steps: tuple[str, ...]
    """The worked solution, one ``"a op b = c."`` equation per step."""
    answer: int
    """The final answer."""

    @property
    def prompt(self) -> str:
        """``"Question: <question>\\nAnswer:"``: what a model is given."""
        return f"Question: {self.question}\nAnswer:"

    @property
    def completion(self) -> str:
        """``" <steps joined by spaces>\\n#### <answer>"``: what a model should write."""
        return f" {' '.join(self.steps)}\n#### {self.answer}"

    @property
    def text(self) -> str:
        """The whole problem as one training document: ``prompt + completion``."""
        return self.prompt + self.completion


def split_of(question: str) -> str:
    """The split a question belongs to: "test", "validation" or "train" (the hash rule in the module doc)."""
    u = hash_fraction(question)
    return "test" if u < _TEST_FRACTION else "validation" if u < _VALIDATION_FRACTION else "train"


def _eq(a: int, op: str, b: int, c: int) -> str:
    return f"{a} {op} {b} = {c}."


def _draw(rng: random.Random) -> Problem:
    """One problem from one of the eight templates."""
    (name, he), (friend, _) = rng.sample(_NAMES, 2)
    He = he.capitalize()
    item, box = rng.choice(_ITEMS), rng.choice(_CONTAINERS)
    a, b, c = (rng.randint(2, 49) for _ in range(3))
    f, g = rng.randint(2, 9), rng.randint(2, 9)
    kind = rng.randrange(8)
    if kind == 0:
        q = f"{name} has {a} {item}. {He} buys {b} more. How many {item} does {name} have now?"
        return Problem(q, (_eq(a, "+", b, a + b),), a + b)
    if kind == 1:
        a, b = max(a, b), min(a, b)
        q = f"{name} has {a} {item}. {He} gives {b} to {friend}. How many {item} does {name} have left?"
        return Problem(q, (_eq(a, "-", b, a - b),), a - b)
    if kind == 2:
        c = min(c, a + b)
        q = (
            f"{name} has {a} {item}. {He} buys {b} more. Then {he} gives away {c}. "
            f"How many {item} does {name} have now?"
        )
        return Problem(q, (_eq(a, "+", b, a + b), _eq(a + b, "-", c, a + b - c)), a + b - c)
    if kind == 3:
        q = f"{name} buys {f} {box} with {g} {item} in each. How many {item} does {name} buy?"
        return Problem(q, (_eq(f, "*", g, f * g),), f * g)
    if kind == 4:
        q = (
            f"{name} has {f} {box} of {g} {item} and {a} more {item}. "
            f"How many {item} does {name} have in total?"
        )
        return Problem(q, (_eq(f, "*", g, f * g), _eq(f * g, "+", a, f * g + a)), f * g + a)
    if kind == 5:
        a = max(a, b + c)
        q = (
            f"{name} has {a} {item}. {He} loses {b} and gives {c} to {friend}. "
            f"How many {item} does {name} have left?"
        )
        return Problem(q, (_eq(a, "-", b, a - b), _eq(a - b, "-", c, a - b - c)), a - b - c)
    if kind == 6:
        q = (
            f"{name} has {a} {item}. {friend} has {b} more {item} than {name}. "
            f"How many {item} do they have together?"
        )
        return Problem(q, (_eq(a, "+", b, a + b), _eq(a, "+", a + b, 2 * a + b)), 2 * a + b)
    q = f"{name} shares {f * g} {item} equally among {g} friends. How many {item} does each friend get?"
    return Problem(q, (_eq(f * g, "/", g, f),), f)


def generate_problems(count: int, seed: int, split: str = "train") -> list[Problem]:
    """``count`` distinct problems of ``split``, the same for the same ``(seed, split)``.

    Problems are drawn from ``random.Random(f"arith:{seed}:{split}")`` and kept when their question is in
    ``split`` (see :func:`split_of`) and was not drawn before.
    """
    if split not in SPLITS:
        raise UserError(f"unknown arithmetic split {split!r}; use one of {', '.join(SPLITS)}")
    rng = random.Random(f"arith:{seed}:{split}")
    seen: set[str] = set()
    problems: list[Problem] = []
    while len(problems) < count:
        problem = _draw(rng)
        if problem.question not in seen and split_of(problem.question) == split:
            seen.add(problem.question)
            problems.append(problem)
    return problems


def problem_documents(problems: Iterable[Problem], split: str) -> list[Document]:
    """The problems as corpus documents named ``arith:<split>#<i>`` (for :func:`interlayer.data.pack_contexts`)."""
    return [Document(f"arith:{split}#{i}", p.text) for i, p in enumerate(problems)]


def check_answer(completion: str, answer: int) -> bool:
    """True iff the first ``"#### <integer>"`` in ``completion`` (spaces allowed after ``####``) equals ``answer``.

    >>> check_answer(" 7 + 5 = 12.\\n#### 12", 12), check_answer("#### 11\\n#### 12", 12), check_answer("12", 12)
    (True, False, False)
    """
    match = _ANSWER.search(completion)
    return match is not None and int(match.group(1)) == answer


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval for a binomial proportion p̂ = successes / n (95% for z = 1.96):

        centre = (p̂ + z²/2n) / (1 + z²/n),  half = z / (1 + z²/n) · sqrt(p̂(1 − p̂)/n + z²/4n²)

    returned as (centre − half, centre + half).
    """
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


@torch.no_grad()
def greedy_completions(
    model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 48, batch_size: int = 64
) -> list[str]:
    """Greedy (argmax) continuations of each prompt, decoded, cut before the first EOS.

    Each prompt is encoded as ``[BOS] + tokens(prompt)`` (no BOS if the tokenizer has none). Prompts of equal
    token length are batched together, so no padding is ever needed and every continuation equals the
    one-at-a-time greedy continuation. The checkpoint's own generation config (a repetition penalty, …) is set
    aside (:func:`interlayer.models.plain_generation`): this is the argmax of the model's distribution.
    """
    start = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    encoded = [start + ids for ids in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
    eos = tokenizer.eos_token_id
    device = next(model.parameters()).device
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(i)
    out: list[str] = [""] * len(prompts)
    for indices in by_length.values():
        for lo in range(0, len(indices), batch_size):
            chunk = indices[lo : lo + batch_size]
            input_ids_BT = torch.tensor([encoded[i] for i in chunk], device=device)
            with plain_generation(model):
                generated_BT = model.generate(
                    input_ids=input_ids_BT,
                    attention_mask=torch.ones_like(input_ids_BT),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    eos_token_id=eos,
                    pad_token_id=eos,
                )[:, input_ids_BT.shape[1] :]
            for i, row in zip(chunk, generated_BT.tolist(), strict=True):
                if eos is not None and eos in row:
                    row = row[: row.index(eos)]
                out[i] = tokenizer.decode(row)
    return out


@dataclass(frozen=True)
class Accuracy:
    """Greedy-decoding accuracy on a set of problems, with its Wilson 95% interval."""

    correct: int
    """Problems whose completion passed :func:`check_answer`."""
    total: int
    """Problems evaluated."""
    ci_low: float
    """Lower end of the Wilson 95% interval."""
    ci_high: float
    """Upper end of the Wilson 95% interval."""

    @property
    def accuracy(self) -> float:
        """correct / total."""
        return self.correct / self.total if self.total else 0.0


def evaluate_accuracy(
    model: Any, tokenizer: Any, problems: Sequence[Problem], max_new_tokens: int = 48
) -> Accuracy:
    """Greedy accuracy of ``model`` on ``problems``: the share whose completion passes :func:`check_answer`."""
    completions = greedy_completions(model, tokenizer, [p.prompt for p in problems], max_new_tokens)
    correct = sum(check_answer(c, p.answer) for c, p in zip(completions, problems, strict=True))
    return Accuracy(correct, len(problems), *wilson_interval(correct, len(problems)))

"""Reasoning tasks for RL on steering vectors: problems, reference answers, verifiers that score completions.

A :class:`Task` holds problems per split ("train", "validation", "test"), a verifier and a generation limit.
The tasks:

- ``arith``: :mod:`interlayer.arithmetic`'s embedded word problems (no download); verified by
  :func:`interlayer.arithmetic.check_answer`, the first ``"#### <integer>"`` of the completion.
- ``gsm8k``: ``openai/gsm8k`` (config ``main``); the reference is :func:`extract_hash_answer` of the answer
  field; prompt ``"Question: {question}\\nAnswer:"``.
- ``math``: ``EleutherAI/hendrycks_math``, its seven subject configs concatenated in the order of
  :data:`MATH_SUBJECTS`; the reference is :func:`extract_boxed` of the solution; prompt :data:`MATH_PROMPT`.
- a local ``.jsonl``/``.json``/``.parquet``/``.csv`` file, a folder, or a hub dataset id (:func:`file_task`):
  a question field and an answer field (the reference is :func:`extract_hash_answer` of the answer when it
  contains ``####``, else the answer as it is, stripped).

gsm8k, math and files are verified by :func:`verify_final_answer`: the completion's :func:`final_answer` (its
``####`` answer, else its last ``\\boxed{}``) compared with the reference by :func:`answers_equal`.

Prompt templates have one placeholder, ``{question}``, replaced literally; any other brace is kept as it is.

Splits of a dataset:

- named splits "train", "validation" and "test" are used as they are (other names are ignored; a lone split
  of another name counts as "train");
- with "train" but no "validation" (gsm8k, math), the validation split is the ``validation`` train rows
  (default 500, at most a tenth of train) whose question has the smallest
  :func:`interlayer.data.hash_fraction`; the rest is train;
- a dataset whose only split is train (a single file) is cut by the arithmetic rule
  (:func:`interlayer.arithmetic.split_of` of the question): test iff its hash u < 0.05, validation iff
  0.05 <= u < 0.10, else train.

All three rules depend on the questions only, never on a seed or on how many problems are asked for, so
training and held-out problems never overlap. A row with no question, or whose reference answer cannot be
extracted, is skipped and counted in :attr:`Task.skipped`; a dataset with no usable row is an error.

Rewards (:func:`run_verifier`): a verifier returning a bool gives +1.0 (correct) or -1.0 (wrong); one
returning a number gives that number. A completion counts as correct iff its reward is positive
(:func:`is_correct`).
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from interlayer import arithmetic
from interlayer.data import hash_fraction
from interlayer.errors import UserError

SPLITS = ("train", "validation", "test")
DEFAULT_PROMPT = "Question: {question}\nAnswer:"
"""The prompt of gsm8k and file tasks (the arithmetic problems' own format)."""
MATH_PROMPT = "Problem: {question}\nPut the final answer in \\boxed{}.\nSolution:"
"""The prompt of the math task."""
MATH_SUBJECTS = (
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
)
"""The subject configs of ``EleutherAI/hendrycks_math``."""
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
"""The ``datasets`` builder of each local file type."""
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")


@dataclass(frozen=True)
class TaskProblem:
    """One problem: what the model is given and the reference final answer."""

    prompt: str
    """The text the model is given."""
    answer: str
    """The reference final answer as text (``"9"``, ``"\\frac{1}{2}"``)."""
    source: str
    """Where it came from (``"arith:test#3"``, ``"gsm8k:test#17"``, ``"file.jsonl#5"``; rows 0-based)."""


Verifier = Callable[[str, TaskProblem], bool | float]
"""A completion and its problem -> correct (bool) or a reward (a number)."""


@dataclass(frozen=True)
class Task:
    """Problems per split, the verifier that scores a completion, and the generation limit."""

    name: str
    """The task's name (``arith``, ``gsm8k``, ``math``, or the file / dataset id)."""
    problems: dict[str, list[TaskProblem]]
    """Split name ("train", "validation", "test") -> its problems."""
    verifier: Verifier
    """Scores a completion of a problem (see :func:`run_verifier`)."""
    max_new_tokens: int
    """Tokens generated per completion unless the trainer is told otherwise."""
    skipped: int = 0
    """Dataset rows dropped because they had no question or no extractable reference answer."""


# ------------------------------------------------------------------------------------------ answer parsing

_HASH_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_BOX_START = re.compile(r"\\(?:boxed|fbox)\s*\{")


def extract_hash_answer(text: str) -> str | None:
    """The text after the first ``####`` up to the end of its line, stripped, with thousands separators
    (a ``,`` between a digit and exactly three digits) and one trailing ``.`` removed; None if there is no
    ``####`` or nothing follows it.

    >>> extract_hash_answer("so 1,234 in all.\\n#### 1,234.\\nmore"), extract_hash_answer("no answer")
    ('1234', None)
    """
    _, sep, tail = text.partition("####")
    if not sep:
        return None
    answer = _HASH_THOUSANDS.sub("", tail.split("\n", 1)[0].strip())
    answer = answer[:-1].rstrip() if answer.endswith(".") else answer
    return answer or None


def _braced(text: str, start: int) -> int | None:
    """The index of the ``}`` closing the ``{`` at ``text[start]``; ``\\{`` and ``\\}`` do not count."""
    depth, i = 0, start
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def extract_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` or ``\\fbox{...}`` in ``text``, stripped; nested braces are
    matched (escaped ``\\{`` ``\\}`` are content). None if there is none or the last one is not closed.

    >>> extract_boxed("\\\\boxed{1} then \\\\boxed{\\\\frac{1}{2}}"), extract_boxed("\\\\boxed{1")
    ('\\\\frac{1}{2}', None)
    """
    starts = list(_BOX_START.finditer(text))
    if not starts:
        return None
    open_brace = starts[-1].end() - 1
    close = _braced(text, open_brace)
    return None if close is None else text[open_brace + 1 : close].strip()


_NUM = r"(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
_NUMBER = re.compile(rf"([+-]?){_NUM}")
_SLASH = re.compile(rf"([+-]?{_NUM})/([+-]?{_NUM})")
_FRAC = re.compile(rf"([+-]?)\\[dt]?frac(?:\{{([+-]?{_NUM})\}}\{{([+-]?{_NUM})\}}|(\d)(\d))")
_SPACING = re.compile(r"\\[!,;: ]|\s")


def _fraction(number: str) -> Fraction:
    return Fraction(number.replace(",", ""))


def parse_number(text: str) -> Fraction | None:
    """``text`` as an exact number, or None. Accepted, after removing whitespace, the LaTeX spacing ``\\!``
    ``\\,`` ``\\;`` ``\\:`` ``\\ ``, every ``$`` / ``\\$``, a trailing ``%`` / ``\\%`` and one trailing ``.``
    (``{,}`` reads as ``,``; ``−`` as ``-``):

    - an optionally signed integer or decimal: ``12``, ``-3``, ``+0.25``, ``.5``, ``1,234.5`` (commas only as
      groups of three digits);
    - ``a/b`` with a and b such numbers, b non-zero;
    - ``\\frac{a}{b}``, ``\\dfrac{a}{b}``, ``\\tfrac{a}{b}`` (also a signed ``-\\frac{a}{b}`` and the
      one-digit ``\\frac12``), b non-zero.

    So ``"$1,234"``, ``"50%"`` (-> 50) and ``"\\frac{1}{2}"`` parse; ``"1,2"``, ``"x"``, ``"2^3"`` do not.

    >>> parse_number("$1,234.50"), parse_number("-\\\\frac{3}{6}"), parse_number("50%"), parse_number("1,2")
    (Fraction(2469, 2), Fraction(-1, 2), Fraction(50, 1), None)
    """
    s = _SPACING.sub("", text).replace("{,}", ",").replace("\\$", "").replace("$", "").replace("−", "-")
    s = s[:-1] if s.endswith(".") else s
    s = s[:-2] if s.endswith("\\%") else s[:-1] if s.endswith("%") else s
    if _NUMBER.fullmatch(s):
        return _fraction(s)
    if m := _SLASH.fullmatch(s):
        num, den = _fraction(m.group(1)), _fraction(m.group(2))
        return num / den if den else None
    if m := _FRAC.fullmatch(s):
        num, den = (
            _fraction(g) for g in ((m.group(2), m.group(3)) if m.group(2) else (m.group(4), m.group(5)))
        )
        return (-1 if m.group(1) == "-" else 1) * num / den if den else None
    return None


_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{")
_LEFT_RIGHT = re.compile(r"\\(?:left|right)(?![a-zA-Z])")


def normalize_answer(text: str) -> str:
    """``text`` for string comparison: every ``\\text{x}`` (also ``\\textbf``, ``\\mathrm``, ``\\mbox``)
    replaced by ``x``; ``\\left``, ``\\right``, ``\\$``, ``$``, whitespace and the spacing ``\\!``
    ``\\,`` ``\\;`` ``\\:`` ``\\ `` removed; ``\\dfrac``/``\\tfrac`` written ``\\frac``; one trailing
    ``.`` removed.

    >>> normalize_answer("$\\\\left( 1, \\\\text{two} \\\\right)$.")
    '(1,two)'
    """
    while m := _TEXT_WRAPPER.search(text):
        close = _braced(text, m.end() - 1)
        if close is None:
            break
        text = text[: m.start()] + text[m.end() : close] + text[close + 1 :]
    text = _LEFT_RIGHT.sub("", text).replace("\\$", "").replace("$", "")
    text = _SPACING.sub("", text).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    return text[:-1] if text.endswith(".") else text


def answers_equal(predicted: str, reference: str) -> bool:
    """Whether two final answers agree: both are :func:`normalize_answer`-ed; if both then parse with
    :func:`parse_number`, the exact numbers must be equal (``"1,234.0"`` = ``"1234"``, ``"0.5"`` =
    ``"\\frac{1}{2}"``, ``"50%"`` = ``"50"``); otherwise the normalised strings must be identical.
    """
    pred, ref = normalize_answer(predicted), normalize_answer(reference)
    pred_number, ref_number = parse_number(pred), parse_number(ref)
    if pred_number is not None and ref_number is not None:
        return pred_number == ref_number
    return pred == ref


def final_answer(completion: str) -> str | None:
    """The completion's final answer: its :func:`extract_hash_answer` if that is not None, else its
    :func:`extract_boxed` (None if it has neither)."""
    answer = extract_hash_answer(completion)
    return answer if answer is not None else extract_boxed(completion)


def verify_final_answer(completion: str, problem: TaskProblem) -> bool:
    """True iff the completion has a :func:`final_answer` and it :func:`answers_equal` ``problem.answer``."""
    answer = final_answer(completion)
    return answer is not None and answers_equal(answer, problem.answer)


def verify_arithmetic(completion: str, problem: TaskProblem) -> bool:
    """:func:`interlayer.arithmetic.check_answer`: the first ``"#### <integer>"`` is the integer answer."""
    return arithmetic.check_answer(completion, int(problem.answer))


# --------------------------------------------------------------------------------------------- rewards


def run_verifier(verifier: Verifier, completion: str, problem: TaskProblem) -> float:
    """The reward of ``completion``: +1.0 / -1.0 when ``verifier`` returns True / False, else the number it
    returns as a float. A verifier that raises, or returns a non-finite number or something else, is a
    :class:`UserError` naming the problem."""
    try:
        result = verifier(completion, problem)
    except Exception as exc:
        raise UserError(
            f"the verifier raised {type(exc).__name__}: {exc} "
            f"on problem {problem.source}: {problem.prompt[:80]!r}"
        ) from exc
    if isinstance(result, (bool, np.bool_)):
        return 1.0 if result else -1.0
    if isinstance(result, numbers.Real) and math.isfinite(float(result)):
        return float(result)
    raise UserError(
        f"the verifier returned {result!r:.60} ({type(result).__name__}), not a bool or a finite number, "
        f"on problem {problem.source}: {problem.prompt[:80]!r}"
    )


def is_correct(reward: float) -> bool:
    """A correct answer is a positive reward: True iff ``reward > 0``."""
    return reward > 0


# ------------------------------------------------------------------------------------------------- tasks


def arithmetic_task(train: int, validation: int, test: int, seed: int) -> Task:
    """:func:`interlayer.arithmetic.generate_problems` of each split (``count`` problems with ``seed``), with
    the problems' own prompts, sources ``arith:<split>#<i>`` and :func:`verify_arithmetic`."""
    counts = {"train": train, "validation": validation, "test": test}
    problems = {
        split: [
            TaskProblem(p.prompt, str(p.answer), f"arith:{split}#{i}")
            for i, p in enumerate(arithmetic.generate_problems(count, seed, split))
        ]
        for split, count in counts.items()
    }
    return Task("arith", problems, verify_arithmetic, 48)


def _load_dataset(label: str, *args: Any, **kwargs: Any) -> Mapping[str, Any]:
    """``datasets.load_dataset(*args, **kwargs)`` as a split -> rows mapping; a failure is a UserError."""
    import datasets  # imported here: it is slow to import and only dataset tasks need it

    try:
        loaded = datasets.load_dataset(*args, **kwargs)
    except Exception as exc:
        first = str(exc).strip().split("\n", 1)[0]
        raise UserError(f"could not load dataset {label}: {type(exc).__name__}: {first}") from exc
    return loaded if isinstance(loaded, Mapping) else {"train": loaded}


def _check_fields(label: str, data: Mapping[str, Any], fields: Sequence[tuple[str, str]]) -> None:
    """Every split of ``data`` has each field; ``fields`` pairs a field with the option that names it."""
    for split_rows in data.values():
        columns = list(split_rows.column_names)
        for field, option in fields:
            if field not in columns:
                hint = f" (use {option})" if option else ""
                raise UserError(
                    f"dataset {label} has no field {field!r}; its fields are: {', '.join(columns)}{hint}"
                )


def _fill(template: str, question: str) -> str:
    return template.replace("{question}", question)


def _check_template(template: str) -> None:
    if "{question}" not in template:
        raise UserError(f"the prompt template {template!r} has no {{question}} placeholder")


@dataclass(frozen=True)
class _Row:
    question: str
    problem: TaskProblem


def _rows(
    rows: Iterable[Mapping[str, Any]],
    prefix: str,
    question_field: str,
    reference: Callable[[Mapping[str, Any]], str | None],
    template: str,
) -> tuple[list[_Row], int]:
    """The usable rows as problems with sources ``<prefix>#<row>``, and how many were skipped."""
    out: list[_Row] = []
    skipped = 0
    for i, row in enumerate(rows):
        question = row.get(question_field)
        question = question.strip() if isinstance(question, str) else None
        answer = reference(row)
        if not question or not answer:
            skipped += 1
            continue
        out.append(_Row(question, TaskProblem(_fill(template, question), answer, f"{prefix}#{i}")))
    return out, skipped


def _split_names(label: str, data: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(name in ``data``, split it feeds) pairs: the splits named train/validation/test; a lone split of
    another name counts as train."""
    if len(data) == 1 and next(iter(data)) not in SPLITS:
        return [(next(iter(data)), "train")]
    names = [(s, s) for s in SPLITS if s in data]
    if not names:
        raise UserError(
            f"dataset {label} has the splits {', '.join(data)}; none is named train, validation or test"
        )
    return names


def _arrange(
    label: str, per_split: dict[str, list[_Row]], total: int, validation: int
) -> dict[str, list[TaskProblem]]:
    """The splits of the module docstring's rules, as problems."""
    if not any(per_split.values()):
        raise UserError(
            f"dataset {label} has no usable problems: none of its {total} rows has a question and a "
            "reference answer that can be extracted"
        )
    if set(per_split) == {"train"}:
        out: dict[str, list[TaskProblem]] = {split: [] for split in SPLITS}
        for row in per_split["train"]:
            out[arithmetic.split_of(row.question)].append(row.problem)
        return out
    train, held = per_split.get("train", []), per_split.get("validation")
    if held is None:
        if validation < 0:
            raise UserError(f"the validation slice must be >= 0, got {validation}")
        order = sorted(range(len(train)), key=lambda i: (hash_fraction(train[i].question), i))
        chosen = set(order[: min(validation, len(train) // 10)])
        held = [row for i, row in enumerate(train) if i in chosen]
        train = [row for i, row in enumerate(train) if i not in chosen]
    return {
        "train": [row.problem for row in train],
        "validation": [row.problem for row in held],
        "test": [row.problem for row in per_split.get("test", [])],
    }


def _dataset_task(
    name: str,
    label: str,
    data: Mapping[str, Any],
    question_field: str,
    reference: Callable[[Mapping[str, Any]], str | None],
    template: str,
    validation: int,
    verifier: Verifier,
    max_new_tokens: int,
    source: Callable[[str], str],
) -> Task:
    """A task from a loaded split -> rows mapping (``source(split)``: the prefix of the problems' sources)."""
    per_split: dict[str, list[_Row]] = {}
    skipped = total = 0
    for held_as, split in _split_names(label, data):
        rows, dropped = _rows(data[held_as], source(held_as), question_field, reference, template)
        per_split[split] = rows
        skipped += dropped
        total += len(data[held_as])
    problems = _arrange(label, per_split, total, validation)
    return Task(name, problems, verifier, max_new_tokens, skipped)


def _answer_reference(answer_field: str) -> Callable[[Mapping[str, Any]], str | None]:
    """The reference of a row: :func:`extract_hash_answer` of the answer if it has ``####``, else the
    answer as text, stripped (None for a missing answer)."""

    def reference(row: Mapping[str, Any]) -> str | None:
        value = row.get(answer_field)
        if value is None or isinstance(value, float) and not math.isfinite(value):
            return None
        text = str(value)
        return extract_hash_answer(text) if "####" in text else text.strip() or None

    return reference


def gsm8k_task(
    dataset: str = "openai/gsm8k",
    config: str = "main",
    validation: int = 500,
    prompt_template: str = DEFAULT_PROMPT,
) -> Task:
    """GSM8K: prompts ``prompt_template`` with the question (default ``"Question: {question}\\nAnswer:"``),
    references :func:`extract_hash_answer` of the answer field, splits train / test with the ``validation``
    train rows of smallest question hash (at most a tenth) as validation; sources
    ``gsm8k:<train|test>#<row>``."""
    _check_template(prompt_template)
    label = f"{dataset} (config {config})"
    data = _load_dataset(label, dataset, config)
    _check_fields(label, data, [("question", ""), ("answer", "")])

    def reference(row: Mapping[str, Any]) -> str | None:
        answer = row.get("answer")
        return extract_hash_answer(answer) if isinstance(answer, str) else None

    return _dataset_task(
        "gsm8k", label, data, "question", reference, prompt_template, validation, verify_final_answer, 512,
        lambda split: f"gsm8k:{split}",
    )  # fmt: skip


def math_task(
    dataset: str = "EleutherAI/hendrycks_math",
    configs: Sequence[str] = MATH_SUBJECTS,
    validation: int = 500,
    prompt_template: str = MATH_PROMPT,
    question_field: str = "problem",
    solution_field: str = "solution",
) -> Task:
    """MATH: each config of ``dataset`` (none: the dataset's default) loaded and its splits concatenated in
    order; prompts ``prompt_template`` with the problem, references :func:`extract_boxed` of the solution,
    the ``validation`` train rows of smallest problem hash (at most a tenth) as validation; sources
    ``math:<config>:<split>#<row>``."""
    _check_template(prompt_template)
    parts: list[tuple[str, Mapping[str, Any]]] = []
    for config in configs or [""]:
        label = f"{dataset} (config {config})" if config else dataset
        data = _load_dataset(label, dataset, config) if config else _load_dataset(label, dataset)
        _check_fields(label, data, [(question_field, ""), (solution_field, "")])
        parts.append((config, data))
    per_split: dict[str, list[_Row]] = {}
    skipped = total = 0

    def reference(row: Mapping[str, Any]) -> str | None:
        solution = row.get(solution_field)
        return extract_boxed(solution) if isinstance(solution, str) else None

    for config, data in parts:
        for name, split in _split_names(dataset, data):
            prefix = f"math:{config}:{name}" if config else f"math:{name}"
            rows, dropped = _rows(data[name], prefix, question_field, reference, prompt_template)
            per_split.setdefault(split, []).extend(rows)
            skipped += dropped
            total += len(data[name])
    problems = _arrange(dataset, per_split, total, validation)
    return Task("math", problems, verify_final_answer, 1024, skipped)


def _is_hub_id(spec: str) -> bool:
    return re.fullmatch(r"[\w.-]+/[\w.-]+", spec) is not None and not spec.startswith(".")


def file_task(
    path: str | Path,
    question_field: str = "question",
    answer_field: str = "answer",
    prompt_template: str = DEFAULT_PROMPT,
    validation: int = 500,
    max_new_tokens: int = 512,
) -> Task:
    """A local ``.jsonl``/``.json``/``.parquet``/``.csv`` file (optionally ``.gz``/``.bz2``/``.xz``/``.zst``),
    a folder ``datasets`` can read, or a hub dataset id, through ``datasets.load_dataset``. Prompts
    ``prompt_template`` with the question field; the reference is :func:`extract_hash_answer` of the answer
    field when it contains ``####``, else the field as text, stripped. Splits by the module docstring's rules
    (``validation`` is the slice taken from train when there is a train split but no validation split).
    Sources ``<file name>#<row>`` for one split, ``<name>:<split>#<row>`` for several."""
    _check_template(prompt_template)
    spec = str(path)
    local = Path(spec).expanduser()
    suffixes = [s.lower() for s in local.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSIONS:
        suffixes = suffixes[:-1]
    suffix = suffixes[-1] if suffixes else ""
    if local.is_dir():
        data = _load_dataset(spec, str(local))
    elif suffix in FILE_BUILDERS:
        if not local.is_file():
            raise UserError(f"no such dataset file: {spec}")
        data = _load_dataset(spec, FILE_BUILDERS[suffix], data_files=str(local))
    elif local.is_file():
        raise UserError(f"cannot read {spec}: use a .jsonl, .json, .parquet or .csv file")
    elif _is_hub_id(spec):
        data = _load_dataset(spec, spec)
    else:
        raise UserError(
            f"no such file or dataset: {spec} (give a .jsonl/.json/.parquet/.csv file or a hub id)"
        )
    _check_fields(spec, data, [(question_field, "--question-field"), (answer_field, "--answer-field")])
    name = local.name if local.exists() else spec
    return _dataset_task(
        spec, spec, data, question_field, _answer_reference(answer_field), prompt_template, validation,
        verify_final_answer, max_new_tokens, lambda split: name if len(data) == 1 else f"{name}:{split}",
    )  # fmt: skip


def load_task(
    spec: str = "arith",
    *,
    train: int,
    validation: int,
    test: int,
    seed: int = 0,
    question_field: str = "question",
    answer_field: str = "answer",
) -> Task:
    """The task ``spec`` names: ``arith`` (:func:`arithmetic_task` with exactly ``train``/``validation``/
    ``test`` problems drawn with ``seed``), ``gsm8k`` (:func:`gsm8k_task`), ``math`` (:func:`math_task`),
    else a file, folder or hub id (:func:`file_task` with the two field names). For a dataset the counts
    keep at most the first ``train``/``validation``/``test`` problems of each split (0: none) and ``seed`` is
    unused; how a dataset is split never depends on the counts."""
    counts = {"train": train, "validation": validation, "test": test}
    for split, count in counts.items():
        if count < 0:
            raise UserError(f"the number of {split} problems must be >= 0, got {count}")
    if spec == "arith":
        return arithmetic_task(train, validation, test, seed)
    if spec == "gsm8k":
        task = gsm8k_task()
    elif spec == "math":
        task = math_task()
    else:
        task = file_task(spec, question_field, answer_field)
    problems = {split: task.problems.get(split, [])[:count] for split, count in counts.items()}
    return Task(task.name, problems, task.verifier, task.max_new_tokens, task.skipped)

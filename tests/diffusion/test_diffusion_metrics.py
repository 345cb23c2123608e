"""Sample metrics against hand-computed values and slow, obvious references."""

from __future__ import annotations

import copy
import itertools
import math
import random
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tokenizers import processors
from transformers import PreTrainedTokenizerFast

from interlayer.diffusion.metrics import (
    generative_perplexity,
    mauve_score,
    ngram_diversity,
    python_validity,
    python_validity_batch,
    scorer_token_ids,
    summarize_samples,
    unigram_entropy,
)
from interlayer.errors import UserError
from interlayer.models import LoadedModel, load_model

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "def f(x):\n    return x + 1\n",
    "hello world",
    "a much longer sample of prose, with punctuation; and several clauses that go on for a while.",
    "import os",
]


# --------------------------------------------------------------------------------------------------------
# Generative perplexity
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scorers(tiny_models: dict[str, Path]) -> dict[str, LoadedModel]:
    return {family: load_model(str(tiny_models[family])) for family in ("llama", "gpt2", "qwen2")}


def reference_nll(scorer: LoadedModel, ids: list[int]) -> float:
    """Σ_{t≥1} −log p(x_t | x_<t), one text alone, a plain loop over positions."""
    with torch.no_grad():
        logp_TV = scorer.model(torch.tensor([ids])).logits[0].double().log_softmax(-1)
    return sum(-float(logp_TV[t - 1, ids[t]]) for t in range(1, len(ids)))


def test_gen_ppl_equals_hand_loop(scorers: dict[str, LoadedModel]) -> None:
    scorer = scorers["llama"]
    assert scorer.tokenizer.bos_token_id is None  # the MiniLM tokenizer: no BOS, the first token is context
    rows = [scorer.tokenizer(text, add_special_tokens=False).input_ids for text in TEXTS]
    nlls = [reference_nll(scorer, ids) for ids in rows]
    counts = [len(ids) - 1 for ids in rows]
    out = generative_perplexity(TEXTS, scorer, batch_size=2)
    assert out["tokens"] == sum(counts)
    assert out["skipped"] == 0 and out["skipped_index"] == []
    assert out["nll_per_sample"] == pytest.approx(
        [n / c for n, c in zip(nlls, counts, strict=True)], rel=1e-5
    )
    assert out["gen_ppl"] == pytest.approx(math.exp(sum(nlls) / sum(counts)), rel=1e-5)
    per_sample = sum(math.exp(n / c) for n, c in zip(nlls, counts, strict=True)) / len(TEXTS)
    assert out["gen_ppl_per_sample_mean"] == pytest.approx(per_sample, rel=1e-5)
    # token-weighted and per-sample means differ when the samples differ in length and NLL
    assert out["gen_ppl"] != pytest.approx(out["gen_ppl_per_sample_mean"], rel=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_gen_ppl_batched_equals_one_at_a_time(scorers: dict[str, LoadedModel], family: str) -> None:
    scorer = scorers[family]
    batched = generative_perplexity(
        TEXTS, scorer, batch_size=len(TEXTS)
    )  # one batch: every row but one padded
    alone = [generative_perplexity([text], scorer, batch_size=1) for text in TEXTS]
    assert batched["nll_per_sample"] == pytest.approx([a["nll_per_sample"][0] for a in alone], abs=1e-5)
    assert batched["tokens"] == sum(a["tokens"] for a in alone)
    total = sum(a["nll_per_sample"][0] * a["tokens"] for a in alone)
    assert batched["gen_ppl"] == pytest.approx(math.exp(total / batched["tokens"]), rel=1e-5)


def test_gen_ppl_truncates_to_max_length(scorers: dict[str, LoadedModel]) -> None:
    scorer = scorers["llama"]
    rows = [scorer.tokenizer(text, add_special_tokens=False).input_ids[:4] for text in TEXTS]
    out = generative_perplexity(TEXTS, scorer, max_length=4)
    assert out["tokens"] == sum(len(ids) - 1 for ids in rows)
    expected = [reference_nll(scorer, ids) / (len(ids) - 1) for ids in rows]
    assert out["nll_per_sample"] == pytest.approx(expected, rel=1e-5)


def test_gen_ppl_default_max_length_is_the_models_context(scorers: dict[str, LoadedModel]) -> None:
    scorer = scorers["gpt2"]  # learned positions: 256 of them, an index error past that
    assert scorer.model.config.max_position_embeddings == 256
    long_text = " ".join(["word"] * 400)
    out = generative_perplexity([long_text], scorer)
    assert out["tokens"] == 255
    ids = scorer.tokenizer(long_text, add_special_tokens=False).input_ids[:256]
    assert out["nll_per_sample"][0] == pytest.approx(reference_nll(scorer, ids) / 255, rel=1e-5)


def test_gen_ppl_skips_texts_with_nothing_to_score(scorers: dict[str, LoadedModel]) -> None:
    scorer = scorers["llama"]
    texts = ["", TEXTS[0], "hello", TEXTS[2]]  # "hello": one token and no BOS, nothing to predict
    out = generative_perplexity(texts, scorer)
    assert out["skipped"] == 2 and out["skipped_index"] == [0, 2]
    kept = generative_perplexity([TEXTS[0], TEXTS[2]], scorer)
    assert out["nll_per_sample"] == pytest.approx(kept["nll_per_sample"], rel=1e-6)
    assert out["gen_ppl"] == pytest.approx(kept["gen_ppl"], rel=1e-6)
    with pytest.raises(UserError, match="no text to score"):
        generative_perplexity(["", "hello"], scorer)


def test_gen_ppl_needs_a_causal_lm(tiny_models: dict[str, Path]) -> None:
    encoder = load_model(str(tiny_models["bert"]))
    with pytest.raises(UserError, match="not a causal LM"):
        generative_perplexity(TEXTS, encoder)


def bos_tokenizer(base: PreTrainedTokenizerFast, adds_bos: bool) -> PreTrainedTokenizerFast:
    """The MiniLM tokenizer with [CLS] as its BOS; its post-processor adds it (like the zoo's) or adds nothing."""
    backend = copy.deepcopy(base.backend_tokenizer)
    if adds_bos:
        backend.post_processor = processors.TemplateProcessing(
            single="[CLS] $A", pair="[CLS] $A $B", special_tokens=[("[CLS]", 101)]
        )
    else:
        backend.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B", special_tokens=[])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="[CLS]", pad_token="[PAD]")


@pytest.mark.parametrize("adds_bos", [True, False])
def test_one_bos_whether_or_not_the_tokenizer_adds_it(
    scorers: dict[str, LoadedModel], adds_bos: bool
) -> None:
    base = scorers["llama"].tokenizer
    tokenizer = bos_tokenizer(base, adds_bos)
    assert (tokenizer("x").input_ids[0] == 101) == adds_bos
    plain = base(TEXTS[0], add_special_tokens=False).input_ids
    assert scorer_token_ids(TEXTS[0], tokenizer, None) == [101, *plain]
    assert scorer_token_ids(TEXTS[0], tokenizer, 3) == [101, *plain[:2]]
    # with a BOS every token of the text is scored, and a one-token text has one token to score
    scorer = LoadedModel("bos", scorers["llama"].model, tokenizer, "causal_lm")
    out = generative_perplexity([TEXTS[0], "hello", ""], scorer)
    assert out["tokens"] == len(plain) + 1 and out["skipped_index"] == [2]
    expected = reference_nll(scorer, [101, *plain]) / len(plain)
    assert out["nll_per_sample"][0] == pytest.approx(expected, rel=1e-5)


# --------------------------------------------------------------------------------------------------------
# Unigram entropy and n-gram diversity
# --------------------------------------------------------------------------------------------------------


def test_unigram_entropy_by_hand() -> None:
    samples = [[1, 1, 2, 2], [5, 5, 5], [1, 2, 3], [7, 7, 7, 9], []]
    expected = [math.log(2), 0.0, math.log(3), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))]
    out = unigram_entropy(samples)
    assert out["entropy_per_sample"] == pytest.approx(expected, abs=1e-12)
    assert out["entropy"] == pytest.approx(sum(expected) / 4, abs=1e-12)
    assert out["skipped"] == 1
    # per sample, then averaged: not the entropy of the pooled tokens
    pooled = [t for s in samples for t in s]
    counts = [pooled.count(v) / len(pooled) for v in set(pooled)]
    assert out["entropy"] != pytest.approx(-sum(p * math.log(p) for p in counts))
    with pytest.raises(UserError, match="empty"):
        unigram_entropy([[], []])


def test_ngram_diversity_by_hand() -> None:
    samples = [[1, 2, 1, 2], [3, 4, 3]]  # joined, they would add the bigram (2, 3): it must not count
    out = ngram_diversity(samples, ns=(2, 3))
    assert out["ngrams_2"] == 5 and out["distinct_2"] == pytest.approx(4 / 5)
    assert out["ngrams_3"] == 3 and out["distinct_3"] == pytest.approx(1.0)
    assert out["diversity"] == pytest.approx(4 / 5)
    assert out["diversity_per_sample_mean"] == pytest.approx(((2 / 3) * 1.0 + 1.0 * 1.0) / 2)
    assert out["per_sample_count"] == 2

    default = ngram_diversity(samples)  # ns = 2, 3, 4: the 3-token sample has no 4-gram
    assert default["distinct_4"] == pytest.approx(1.0) and default["ngrams_4"] == 1
    assert default["diversity"] == pytest.approx(4 / 5)
    assert default["per_sample_count"] == 1
    assert default["diversity_per_sample_mean"] == pytest.approx(2 / 3)

    repeated = ngram_diversity([[1, 1, 1, 1, 1]], ns=(2, 3, 4))
    assert repeated["diversity"] == pytest.approx((1 / 4) * (1 / 3) * (1 / 2))
    with pytest.raises(UserError, match="shorter than 4"):
        ngram_diversity([[1, 2, 3], [4]])
    with pytest.raises(ValueError, match="ns"):
        ngram_diversity(samples, ns=())


def test_ngram_diversity_against_a_string_reference() -> None:
    rng = random.Random(0)
    samples = [[rng.randrange(6) for _ in range(rng.randrange(0, 30))] for _ in range(20)]
    out = ngram_diversity(samples)
    diversity, per_sample = 1.0, []
    for n in (2, 3, 4):
        grams = [",".join(map(str, s[i : i + n])) for s in samples for i in range(len(s)) if i + n <= len(s)]
        assert out[f"distinct_{n}"] == pytest.approx(len(set(grams)) / len(grams))
        diversity *= len(set(grams)) / len(grams)
    for s in samples:
        if len(s) >= 4:
            product = 1.0
            for n in (2, 3, 4):
                grams = [",".join(map(str, s[i : i + n])) for i in range(len(s) - n + 1)]
                product *= len(set(grams)) / len(grams)
            per_sample.append(product)
    assert out["diversity"] == pytest.approx(diversity)
    assert out["diversity_per_sample_mean"] == pytest.approx(sum(per_sample) / len(per_sample))


# --------------------------------------------------------------------------------------------------------
# Python validity
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "valid_prefix"),
    [
        ("x = 1\ny = (\n", "x = 1\n"),
        ("def f():\n    return 1\n", "def f():\n    return 1\n"),
        ("", ""),
        ("if x:\n", ""),
        ("x = (\n1)\n", "x = (\n1)\n"),  # not monotone: k = 1 fails, k = 2 parses
        ("x = (\n1)\ny = [\n", "x = (\n1)\n"),
        ("x = 1\ny = 2", "x = 1\ny = 2"),  # a last line without "\n" is a line
        ("x = 1\ny = ", "x = 1\n"),
        ("# only a comment\n\n", "# only a comment\n\n"),
        ("x = 1\n\x0cy = (\n", "x = 1\n"),  # a form feed does not end a line
        ("x = 1\ry = (\n", ""),  # nor does a lone carriage return
        ("x = 1\n\x00\n", "x = 1\n"),  # a null byte fails the parse, it does not raise
        ("for i in range(3):\n    pass\n  oops\n", "for i in range(3):\n    pass\n"),
        ("the quick brown fox\n", ""),
    ],
)
def test_python_validity_by_hand(text: str, valid_prefix: str) -> None:
    expected = len(valid_prefix) / len(text) if text else 0.0
    assert python_validity(text) == pytest.approx(expected, abs=0)


def test_python_validity_counts_characters_not_bytes() -> None:
    text = "s = 'ünïcödé'\nt = (\n"
    assert python_validity(text) == len("s = 'ünïcödé'\n") / len(text)
    assert len(text.encode()) != len(text)


def test_python_validity_never_runs_the_code() -> None:
    assert python_validity("import os\nos._exit(3)\n") == 1.0
    assert python_validity("raise SystemExit(3)\n") == 1.0


def test_python_validity_is_silent_on_syntax_warnings() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert python_validity('x = "\\d"\n') == 1.0
    assert caught == []


def reference_validity(text: str) -> float:
    """Every prefix of whole lines, parsed; the longest one that parses."""
    if not text:
        return 0.0
    cuts = [0] + [i + 1 for i, ch in enumerate(text) if ch == "\n"] + [len(text)]
    best = 0
    for cut in cuts:
        try:
            compile(text[:cut], "<ref>", "exec", flags=0x400)  # ast.PyCF_ONLY_AST
        except (SyntaxError, ValueError):
            continue
        best = max(best, cut)
    return best / len(text)


def test_python_validity_against_every_prefix() -> None:
    pool = [
        "x = 1\n",
        "def f(a):\n",
        "    return a\n",
        "y = (\n",
        "2)\n",
        "if y:\n",
        "pass\n",
        "z = ]\n",
        "w",
    ]
    rng = random.Random(0)
    texts = ["".join(rng.choice(pool) for _ in range(rng.randrange(0, 8))) for _ in range(300)]
    texts += ["".join(p) for p in itertools.permutations(pool[:5], 3)]
    for text in texts:
        assert python_validity(text) == pytest.approx(reference_validity(text), abs=0), repr(text)
    values = {python_validity(text) for text in texts}
    assert 0.0 in values and 1.0 in values and len(values) > 10  # the pool exercises partial prefixes


def test_python_validity_batch() -> None:
    texts = ["", "x = 1\n", "if x:\n", "x = 1\ny = (\n"]
    out = python_validity_batch(texts)
    partial = len("x = 1\n") / len(texts[3])
    assert out["validity_per_sample"] == [0.0, 1.0, 0.0, partial]
    assert out["validity"] == pytest.approx((1.0 + partial) / 4)
    assert out["fully_valid"] == pytest.approx(1 / 4)
    with pytest.raises(UserError):
        python_validity_batch([])


# --------------------------------------------------------------------------------------------------------
# MAUVE and the summary
# --------------------------------------------------------------------------------------------------------


def test_mauve_without_the_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mauve", None)
    with pytest.raises(
        UserError, match=r"MAUVE needs the optional package mauve-text \(pip install mauve-text\)"
    ):
        mauve_score(["a"], ["b"], None)


def test_mauve_passes_texts_and_feature_model(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def compute_mauve(**kwargs):
        calls.append(kwargs)
        return SimpleNamespace(mauve=0.75, frontier_integral=0.125)

    monkeypatch.setitem(sys.modules, "mauve", SimpleNamespace(compute_mauve=compute_mauve))
    out = mauve_score(("p1", "p2"), ["q1"], "gpt2", device_id=0)
    assert out == {"mauve": 0.75, "frontier_integral": 0.125}
    assert calls[0]["p_text"] == ["p1", "p2"] and calls[0]["q_text"] == ["q1"]
    assert calls[0]["featurize_model_name"] == "gpt2" and calls[0]["device_id"] == 0
    mauve_score(["p"], ["q"], None)
    assert "featurize_model_name" not in calls[1]  # the package's own default


def test_summarize_samples_combines_the_metrics(scorers: dict[str, LoadedModel]) -> None:
    scorer = scorers["llama"]
    ids = [scorer.tokenizer(text, add_special_tokens=False).input_ids for text in TEXTS]
    summary = summarize_samples(TEXTS, ids, scorer)
    diversity = ngram_diversity(ids)
    ppl = generative_perplexity(TEXTS, scorer)
    assert summary["samples"] == len(TEXTS)
    assert summary["entropy"] == unigram_entropy(ids)["entropy"]
    assert summary["diversity"] == diversity["diversity"]
    assert summary["distinct_3"] == diversity["distinct_3"]
    assert summary["python_validity"] == python_validity_batch(TEXTS)["validity"]
    assert summary["python_fully_valid"] == pytest.approx(2 / 5)  # the function and "import os"
    assert summary["gen_ppl"] == pytest.approx(ppl["gen_ppl"], rel=1e-6)
    assert summary["gen_ppl_tokens"] == ppl["tokens"]
    without = summarize_samples(TEXTS, ids)
    assert "gen_ppl" not in without and without["entropy"] == summary["entropy"]
    short = summarize_samples(["a b", "c"], [[1, 2], [3]])
    assert math.isnan(short["diversity"]) and short["entropy"] == pytest.approx(math.log(2) / 2)
    with pytest.raises(ValueError, match="one of each"):
        summarize_samples(TEXTS, ids[:2])


def test_perplexity_interval_is_a_bootstrap_of_whole_samples() -> None:
    from interlayer.diffusion.metrics import perplexity_interval

    assert perplexity_interval([2.0, 2.0, 2.0], [5, 7, 9]) == pytest.approx((math.exp(2.0), math.exp(2.0)))
    low, high = perplexity_interval([1.0, 3.0], [10, 10], resamples=4000)
    # resampling two samples: the weighted mean is 1, 2 or 3 with probabilities 1/4, 1/2, 1/4
    assert low == pytest.approx(math.exp(1.0)) and high == pytest.approx(math.exp(3.0))
    low, high = perplexity_interval([1.0] * 50 + [3.0] * 50, [10] * 100)
    assert math.exp(1.75) < low < math.exp(1.9) and math.exp(2.1) < high < math.exp(2.25)  # ± 1.96 · 0.1

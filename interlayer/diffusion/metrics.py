"""Metrics of generated samples: generative perplexity, unigram entropy, n-gram diversity, Python validity, MAUVE.

Each function states its exact formula. Conventions shared by all of them:

- A *sample* is one generated text (``texts``) or its token ids under the generating model's tokenizer
  (``token_ids``). Entropy and diversity read token ids; perplexity retokenizes the text with the scorer's
  own tokenizer; Python validity reads the text.
- A sample with nothing to measure (no scored token, no token, fewer than n tokens) is skipped and counted,
  never silently scored as 0; a set of samples with nothing to measure at all is a :class:`UserError`.
- ``log`` is the natural logarithm: entropies and NLLs are in nats.
"""

from __future__ import annotations

import ast
import math
import re
import warnings
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from interlayer.errors import UserError
from interlayer.models import LoadedModel

__all__ = [
    "generative_perplexity",
    "mauve_score",
    "ngram_diversity",
    "python_validity",
    "python_validity_batch",
    "summarize_samples",
    "unigram_entropy",
]


# --------------------------------------------------------------------------------------------------------
# Generative perplexity
# --------------------------------------------------------------------------------------------------------


def scorer_token_ids(text: str, tokenizer: Any, max_length: int | None) -> list[int]:
    """The ids the scorer reads for ``text``: ``[BOS] + tokenizer(text, add_special_tokens=False)``, the BOS
    only when the tokenizer has one (``bos_token_id`` not None), then cut to the first ``max_length`` ids.

    Tokenizing without special tokens and adding the BOS here gives one BOS whether or not the tokenizer's
    post-processor adds it itself (Llama, Gemma and the zoo tokenizers do, GPT-2's does not), and never a
    trailing EOS/[SEP]: a sample is a fragment, the scorer is not asked to predict its end."""
    ids = list(tokenizer(text, add_special_tokens=False).input_ids)
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None:
        ids = [int(bos), *ids]
    return ids if max_length is None else ids[:max_length]


def _default_max_length(model: Any) -> int | None:
    length = getattr(model.config, "max_position_embeddings", None)
    return int(length) if isinstance(length, int) and length > 0 else None


@torch.no_grad()
def _batch_nll(
    model: Any, rows: list[list[int]], pad_id: int, device: torch.device
) -> list[tuple[float, int]]:
    """(summed NLL of tokens 1.., number of those tokens) for each row, one forward pass, right padding."""
    width = max(len(row) for row in rows)
    ids_BT = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask_BT = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        ids_BT[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask_BT[b, : len(row)] = 1
    ids_BT, mask_BT = ids_BT.to(device), mask_BT.to(device)
    logits_BTV = model(input_ids=ids_BT, attention_mask=mask_BT).logits
    out = []
    for b, row in enumerate(rows):  # one row at a time: the float32 copy of the logits stays [T, V]
        n = len(row)
        nll_T = F.cross_entropy(logits_BTV[b, : n - 1].float(), ids_BT[b, 1:n], reduction="none")
        out.append((float(nll_T.double().sum()), n - 1))
    return out


def generative_perplexity(
    texts: list[str], scorer: LoadedModel, batch_size: int = 16, max_length: int | None = None
) -> dict:
    """Perplexity of ``texts`` under a separate causal LM (``scorer``), as in MDLM's evaluation.

    Each text is retokenized by :func:`scorer_token_ids` into x_0 … x_{n-1} (x_0 the BOS when the scorer's
    tokenizer has one), cut to ``max_length`` ids (default: the model's ``max_position_embeddings``; none when
    the config has no such field). Its NLL terms are ℓ_t = −log p(x_t | x_<t) for t = 1 … n−1: the first id is
    context only. Texts are scored in batches of ``batch_size`` (sorted by length, right-padded, with an
    attention mask); the result equals scoring each text alone, up to float rounding.

    Returns:
        ``gen_ppl``: exp(Σ_samples Σ_t ℓ_t / Σ_samples (n−1)), token-weighted (MDLM's convention);
        ``gen_ppl_per_sample_mean``: mean over samples of exp(mean_t ℓ_t);
        ``nll_per_sample``: mean_t ℓ_t of each scored sample, in input order (skipped ones left out);
        ``tokens_per_sample``: n−1 of each scored sample, in the same order;
        ``tokens``: Σ (n−1), the number of scored tokens;
        ``skipped``: the number of texts with no scored token (n ≤ 1: empty text and no BOS, or empty text);
        ``skipped_index``: their positions in ``texts``.

    Raises :class:`UserError` when the scorer is not a causal LM or no text has a token to score.
    """
    if not scorer.is_causal_lm:
        raise UserError(
            f"the perplexity scorer {scorer.name!r} is not a causal LM (its head is {scorer.head}); "
            "pass an autoregressive model such as zoo:code-lm"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model, tokenizer = scorer.model, scorer.tokenizer
    limit = max_length if max_length is not None else _default_max_length(model)
    if limit is not None and limit < 2:
        raise ValueError(f"max_length must be >= 2 (one context id and one scored id), got {limit}")
    rows = [scorer_token_ids(text, tokenizer, limit) for text in texts]
    kept = [i for i, row in enumerate(rows) if len(row) >= 2]
    skipped = [i for i, row in enumerate(rows) if len(row) < 2]
    if not kept:
        raise UserError(
            f"no text to score for generative perplexity: all {len(texts)} samples are empty "
            "(or one token long without a BOS); generate non-empty samples"
        )
    pad_id = next(
        (int(i) for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None),
        0,
    )
    order = sorted(kept, key=lambda i: len(rows[i]))
    scores: dict[int, tuple[float, int]] = {}
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        for i, score in zip(
            chunk, _batch_nll(model, [rows[i] for i in chunk], pad_id, scorer.device), strict=True
        ):
            scores[i] = score
    total_nll = sum(scores[i][0] for i in kept)
    total_tokens = sum(scores[i][1] for i in kept)
    per_sample = [scores[i][0] / scores[i][1] for i in kept]
    return {
        "gen_ppl": math.exp(total_nll / total_tokens),
        "gen_ppl_per_sample_mean": sum(math.exp(nll) for nll in per_sample) / len(per_sample),
        "nll_per_sample": per_sample,
        "tokens_per_sample": [scores[i][1] for i in kept],
        "tokens": total_tokens,
        "skipped": len(skipped),
        "skipped_index": skipped,
    }


# --------------------------------------------------------------------------------------------------------
# Token statistics
# --------------------------------------------------------------------------------------------------------


def unigram_entropy(token_ids: Sequence[Sequence[int]]) -> dict:
    """Entropy of each sample's empirical token distribution, then the mean over samples (MDLM/ReMDM).

    For a sample of L tokens in which token v occurs c_v times, p_v = c_v / L and
    H = −Σ_v p_v log p_v (nats; 0 for a sample of one repeated token, log L when all L tokens differ).

    Returns ``entropy``: mean of H over the non-empty samples; ``entropy_per_sample``: H of each non-empty
    sample in input order; ``skipped``: the number of empty samples (L = 0, H undefined).
    Raises :class:`UserError` when every sample is empty.
    """
    per_sample = []
    for sample in token_ids:
        length = len(sample)
        if length == 0:
            continue
        counts = Counter(int(t) for t in sample)
        per_sample.append(-sum(c / length * math.log(c / length) for c in counts.values()))
    if not per_sample:
        raise UserError(f"no tokens to measure entropy on: all {len(token_ids)} samples are empty")
    return {
        "entropy": sum(per_sample) / len(per_sample),
        "entropy_per_sample": per_sample,
        "skipped": len(token_ids) - len(per_sample),
    }


def _ngrams(sample: Sequence[int], n: int) -> list[tuple[int, ...]]:
    tokens = [int(t) for t in sample]
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def ngram_diversity(token_ids: Sequence[Sequence[int]], ns: Sequence[int] = (2, 3, 4)) -> dict:
    """Distinct-n ratios and their product, the diversity of ReMDM and G-Star.

    The n-grams of a sample of L tokens are its L − n + 1 windows (none when L < n); n-grams never cross
    from one sample into the next. Pooled over the whole set, for each n:
    distinct_n = |{distinct n-grams of all samples}| / (Σ_samples max(L − n + 1, 0)), and
    diversity = Π_{n ∈ ns} distinct_n (= Π_n (1 − rep_n) with rep_n = 1 − distinct_n).
    Per sample: d_s = Π_n (distinct n-grams of s / n-grams of s), averaged over the samples with at least
    max(ns) tokens (a shorter sample has no n-gram for the largest n and is left out of that mean only).

    Returns ``diversity`` (pooled product), ``distinct_{n}`` for each n (pooled ratio), ``ngrams_{n}`` (the
    pooled count of n-grams, the denominator), ``diversity_per_sample_mean`` (mean of d_s; NaN when no
    sample is long enough) and ``per_sample_count`` (how many samples that mean covers).
    Raises :class:`UserError` when no sample has max(ns) tokens (pooled ratio undefined), ValueError for
    an empty ``ns`` or an n < 1.
    """
    ns = tuple(int(n) for n in ns)
    if not ns or min(ns) < 1:
        raise ValueError(f"ns must be a non-empty list of n-gram sizes >= 1, got {ns}")
    result: dict[str, Any] = {}
    diversity = 1.0
    for n in ns:
        grams = [gram for sample in token_ids for gram in _ngrams(sample, n)]
        if not grams:
            raise UserError(
                f"no {n}-grams to measure diversity on: all {len(token_ids)} samples are shorter than {n} tokens"
            )
        result[f"distinct_{n}"] = len(set(grams)) / len(grams)
        result[f"ngrams_{n}"] = len(grams)
        diversity *= result[f"distinct_{n}"]
    per_sample = []
    for sample in token_ids:
        if len(sample) < max(ns):
            continue
        product = 1.0
        for n in ns:
            grams = _ngrams(sample, n)
            product *= len(set(grams)) / len(grams)
        per_sample.append(product)
    result["diversity"] = diversity
    result["diversity_per_sample_mean"] = sum(per_sample) / len(per_sample) if per_sample else math.nan
    result["per_sample_count"] = len(per_sample)
    return result


# --------------------------------------------------------------------------------------------------------
# Python validity
# --------------------------------------------------------------------------------------------------------

_LINE = re.compile(r"[^\n]*\n|[^\n]+\Z")


def _parses(source: str) -> bool:
    """True when ``source`` compiles to a Python AST (``ast.parse``: parsed only, never executed)."""
    try:
        with warnings.catch_warnings():  # invalid escape sequences and the like warn; they are still valid
            warnings.simplefilter("ignore")
            ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    return True


def python_validity(text: str) -> float:
    """The fraction of ``text``, by characters, covered by its longest prefix of whole lines that parses.

    The text is cut into lines after each ``"\\n"`` (the newline stays with its line; a last line without
    one is a line too; ``\\r`` and form feeds do not end a line). With lines l_1 … l_n, k* is the largest
    k in n, n−1, …, 0 such that l_1 + … + l_k passes ``ast.parse`` (k = 0, the empty prefix, always does), and
    validity = len(l_1 + … + l_k*) / len(text), lengths in characters (code points). An empty text is 0.0;
    a text that parses whole is 1.0, even one of only comments or blank lines.

    Validity is not monotone in k (``"x = (\\n1)\\n"`` fails at k = 1 and parses at k = 2), so every k is
    tried from n downwards until one parses: the whole text first (the common case, one parse), at worst
    n + 1 parses of growing prefixes.
    """
    if not text:
        return 0.0
    lines = _LINE.findall(text)
    ends = [0]
    for line in lines:
        ends.append(ends[-1] + len(line))
    for k in range(len(lines), 0, -1):
        if _parses(text[: ends[k]]):
            return ends[k] / len(text)
    return 0.0


def python_validity_batch(texts: Sequence[str]) -> dict:
    """:func:`python_validity` of each text and its mean.

    Returns ``validity``: mean over texts of python_validity(text); ``fully_valid``: the fraction of texts
    whose validity is 1.0 (non-empty and parsing whole); ``validity_per_sample``: each text's validity.
    Raises :class:`UserError` for an empty list.
    """
    if not texts:
        raise UserError("no samples to check for Python validity")
    per_sample = [python_validity(text) for text in texts]
    return {
        "validity": sum(per_sample) / len(per_sample),
        "fully_valid": sum(v == 1.0 for v in per_sample) / len(per_sample),
        "validity_per_sample": per_sample,
    }


# --------------------------------------------------------------------------------------------------------
# MAUVE (optional)
# --------------------------------------------------------------------------------------------------------


def mauve_score(
    texts_p: list[str],
    texts_q: list[str],
    featurize_model_name: str | None = None,
    device_id: int = -1,
    max_text_length: int = 1024,
    seed: int = 25,
) -> dict:
    """MAUVE (Pillutla et al. 2021) between the texts ``texts_p`` (say, references) and ``texts_q`` (samples).

    Delegates to ``mauve.compute_mauve`` of the optional package ``mauve-text``: both sets are embedded by
    the feature model ``featurize_model_name`` (None: the package's default, gpt2-large; it must be loadable
    by transformers, offline from its cache when there is no network), jointly quantised by k-means, and
    MAUVE = area under the divergence frontier {(exp(−c·KL(Q‖R_λ)), exp(−c·KL(P‖R_λ)))}, R_λ = λP + (1−λ)Q,
    c = 5 (the package's ``mauve_scaling_factor``). ``device_id`` −1 is the CPU, N the GPU N.

    Returns ``mauve`` and, when the package reports it, ``frontier_integral``.
    Raises :class:`UserError` when ``mauve-text`` is not installed (it is not a dependency of interlayer).
    """
    try:
        import mauve
    except ImportError:
        raise UserError(
            "MAUVE needs the optional package mauve-text (pip install mauve-text) and a feature model "
            f"({featurize_model_name or 'gpt2-large'}) that transformers can load; "
            "install it or leave MAUVE out"
        ) from None
    kwargs: dict[str, Any] = {"device_id": device_id, "max_text_length": max_text_length, "verbose": False}
    if featurize_model_name is not None:
        kwargs["featurize_model_name"] = featurize_model_name
    out = mauve.compute_mauve(p_text=list(texts_p), q_text=list(texts_q), seed=seed, **kwargs)
    result = {"mauve": float(out.mauve)}
    if getattr(out, "frontier_integral", None) is not None:
        result["frontier_integral"] = float(out.frontier_integral)
    return result


# --------------------------------------------------------------------------------------------------------
# All together
# --------------------------------------------------------------------------------------------------------


def summarize_samples(
    texts: Sequence[str],
    token_ids: Sequence[Sequence[int]],
    scorer: LoadedModel | None = None,
    batch_size: int = 16,
    max_length: int | None = None,
) -> dict:
    """The scalar metrics of one set of samples, each as its own function defines it.

    ``texts[i]`` and ``token_ids[i]`` are the same sample (its decoded text and its ids under the generating
    model's tokenizer). Returns ``samples`` (count), ``entropy`` (:func:`unigram_entropy`), ``diversity``,
    ``diversity_per_sample_mean``, ``distinct_2`` … ``distinct_4`` (:func:`ngram_diversity`, ns = 2, 3, 4;
    NaN when no sample has 4 tokens), ``python_validity`` and ``python_fully_valid``
    (:func:`python_validity_batch`), and with a ``scorer`` also ``gen_ppl``, ``gen_ppl_per_sample_mean``,
    ``gen_ppl_tokens`` and ``gen_ppl_skipped`` (:func:`generative_perplexity`) and ``gen_ppl_low`` /
    ``gen_ppl_high``, its 95% bootstrap interval (:func:`perplexity_interval`).
    """
    if len(texts) != len(token_ids):
        raise ValueError(f"{len(texts)} texts but {len(token_ids)} token id lists: one of each per sample")
    summary: dict[str, Any] = {"samples": len(texts)}
    summary["entropy"] = unigram_entropy(token_ids)["entropy"]
    try:
        diversity = ngram_diversity(token_ids)
    except UserError:  # every sample shorter than 4 tokens: the other metrics still stand
        diversity = {"diversity": math.nan, "diversity_per_sample_mean": math.nan}
        diversity.update({f"distinct_{n}": math.nan for n in (2, 3, 4)})
    for key in ("diversity", "diversity_per_sample_mean", "distinct_2", "distinct_3", "distinct_4"):
        summary[key] = diversity[key]
    validity = python_validity_batch(texts)
    summary["python_validity"] = validity["validity"]
    summary["python_fully_valid"] = validity["fully_valid"]
    if scorer is not None:
        ppl = generative_perplexity(list(texts), scorer, batch_size=batch_size, max_length=max_length)
        summary["gen_ppl"] = ppl["gen_ppl"]
        summary["gen_ppl_per_sample_mean"] = ppl["gen_ppl_per_sample_mean"]
        summary["gen_ppl_tokens"] = ppl["tokens"]
        summary["gen_ppl_skipped"] = ppl["skipped"]
        low, high = perplexity_interval(ppl["nll_per_sample"], ppl["tokens_per_sample"])
        summary["gen_ppl_low"], summary["gen_ppl_high"] = low, high
    return summary


def perplexity_interval(
    nll_per_sample: Sequence[float], tokens_per_sample: Sequence[int], resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """A 95% bootstrap interval of the token-weighted generative perplexity: samples are resampled with
    replacement ``resamples`` times (seeded) and exp(Σ n_i·nll_i / Σ n_i) is recomputed each time; returns
    its 2.5th and 97.5th percentiles. Samples, not tokens, are the independent units."""
    nll = torch.tensor(nll_per_sample, dtype=torch.float64)
    tokens = torch.tensor(tokens_per_sample, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(0, len(nll), (resamples, len(nll)), generator=generator)
    ppl = ((nll[index] * tokens[index]).sum(1) / tokens[index].sum(1)).exp()
    return float(ppl.quantile(0.025)), float(ppl.quantile(0.975))

"""Sampling completions in left-padded batches, and the log-probabilities of the sampled tokens.

Every prompt is encoded as ``[BOS] + tokens(prompt)`` (no BOS when the tokenizer has none), the same encoding
:func:`interlayer.arithmetic.greedy_completions` uses. A batch of prompts of different lengths is left-padded
to the longest (pad id: the tokenizer's pad token, else its EOS) with attention mask 0 on the pads, and
sampled with ``model.generate`` at the given temperature with no top-k or top-p truncation (a fresh
``GenerationConfig``, and the checkpoint's own ``generation_config`` set aside while sampling, so no repetition
penalty or other default it ships changes the distribution). The random
stream is ``torch.manual_seed(seed)`` inside :func:`torch.random.fork_rng`, so the caller's global RNG is left
alone and the same seed gives the same samples on the same machine, thread count and batch layout.

A completion is the generated tokens up to and including the first EOS (or all ``max_new_tokens`` of them);
its mask is 1 on those tokens. Scoring runs the model once on [left-padded prompt | completion] with
position ids ``cumsum(attention_mask) − 1`` (clamped at 0 on the pads), which are the positions ``generate``
gives a left-padded row, so a padded row scores exactly like the same sequence alone, up to float rounding.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig

from interlayer.models import plain_generation


@dataclass
class Rollout:
    """Sampled completions of a batch of prompts."""

    sequences_NT: torch.Tensor
    """[N, P + C] token ids: the left-padded prompt (P columns) then the completion (C columns, padded)."""
    attention_mask_NT: torch.Tensor
    """[N, P + C] 1 on real prompt tokens and completion tokens, 0 on pads."""
    prompt_width: int
    """P, the padded prompt length."""
    completions: list[str]
    """The decoded completions, cut before the first EOS."""

    @property
    def completion_mask_NC(self) -> torch.Tensor:
        """[N, C] 1 on completion tokens (up to and including the first EOS)."""
        return self.attention_mask_NT[:, self.prompt_width :]

    def rows(self, index: slice) -> Rollout:
        """The rollout of rows ``index`` (for micro-batches)."""
        return Rollout(
            self.sequences_NT[index],
            self.attention_mask_NT[index],
            self.prompt_width,
            self.completions[index],
        )


def pad_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its EOS id, else 0."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def encode_prompts(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    """``[BOS] + tokens(prompt)`` for each prompt."""
    start = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    return [start + ids for ids in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]


def left_pad(encoded: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, P], mask [B, P]) with every row right-aligned on P = the longest row."""
    width = max(len(ids) for ids in encoded)
    ids_BP = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask_BP = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, ids in enumerate(encoded):
        if ids:
            ids_BP[row, width - len(ids) :] = torch.tensor(ids)
            mask_BP[row, width - len(ids) :] = 1
    return ids_BP, mask_BP


def position_ids(attention_mask_NT: torch.Tensor) -> torch.Tensor:
    """``cumsum(mask) − 1`` clamped at 0: the position of every real token counted from the row's first."""
    return (attention_mask_NT.long().cumsum(-1) - 1).clamp_min(0)


def _completion_mask(completion_NC: torch.Tensor, eos: int | None) -> torch.Tensor:
    """1 up to and including the first EOS of each row (every column when there is none)."""
    if eos is None:
        return torch.ones_like(completion_NC)
    is_eos = (completion_NC == eos).long()
    before_or_at = (is_eos.cumsum(-1) - is_eos) == 0  # no EOS strictly before this column
    return before_or_at.long()


def _decode(tokenizer: Any, completion_NC: torch.Tensor, mask_NC: torch.Tensor, eos: int | None) -> list[str]:
    texts = []
    for ids, mask in zip(completion_NC.tolist(), mask_NC.tolist(), strict=True):
        kept = [t for t, m in zip(ids, mask, strict=True) if m and t != eos]
        texts.append(tokenizer.decode(kept))
    return texts


@torch.no_grad()
def sample(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    samples: int,
    seed: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    batch_size: int = 256,
) -> Rollout:
    """``samples`` completions of each prompt (rows ordered prompt-major: row p·samples + i is sample i of
    prompt p), generated ``batch_size`` rows at a time; ``temperature`` 0 means greedy."""
    device = next(model.parameters()).device
    pad = pad_id(tokenizer)
    eos = tokenizer.eos_token_id
    encoded = [ids for ids in encode_prompts(tokenizer, prompts) for _ in range(samples)]
    prompt_ids_NP, prompt_mask_NP = left_pad(encoded, pad)
    sampling = temperature > 0
    config = GenerationConfig(
        do_sample=sampling,
        temperature=temperature if sampling else 1.0,
        top_k=0 if sampling else None,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=pad,
        bos_token_id=tokenizer.bos_token_id,
    )
    chunks = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), plain_generation(model):
        torch.manual_seed(seed)
        for lo in range(0, len(encoded), batch_size):
            ids_BP = prompt_ids_NP[lo : lo + batch_size].to(device)
            out = model.generate(  # type: ignore[operator]
                input_ids=ids_BP,
                attention_mask=prompt_mask_NP[lo : lo + batch_size].to(device),
                generation_config=config,
            )
            chunks.append(out[:, ids_BP.shape[1] :].cpu())
    width = max(chunk.shape[1] for chunk in chunks)
    completion_NC = torch.cat(
        [nn.functional.pad(chunk, (0, width - chunk.shape[1]), value=pad) for chunk in chunks]
    )
    completion_mask_NC = _completion_mask(completion_NC, eos)
    return Rollout(
        sequences_NT=torch.cat([prompt_ids_NP, completion_NC], dim=1),
        attention_mask_NT=torch.cat([prompt_mask_NP, completion_mask_NC], dim=1),
        prompt_width=prompt_ids_NP.shape[1],
        completions=_decode(tokenizer, completion_NC, completion_mask_NC, eos),
    )


def completion_logprobs(model: nn.Module, rollout: Rollout, temperature: float = 1.0) -> torch.Tensor:
    """log π_T(o_t | prompt, o_<t) [N, C] of every completion token under ``model`` with its logits divided by
    ``temperature`` (the distribution the rollout was sampled from; 0 on padding columns), differentiable in
    whatever of the model requires grad."""
    device = next(model.parameters()).device
    ids_NT = rollout.sequences_NT.to(device)
    mask_NT = rollout.attention_mask_NT.to(device)
    start = rollout.prompt_width
    width = ids_NT.shape[1] - start  # C completion columns, predicted by the last C + 1 logits rows but one
    inputs: dict[str, Any] = {
        "input_ids": ids_NT,
        "attention_mask": mask_NT,
        "position_ids": position_ids(mask_NT),
    }
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        # the LM head runs on the rows that score the completion only: [N, C + 1, V] instead of [N, T, V]
        logits_NTV = model(**inputs, logits_to_keep=width + 1).logits
    else:
        logits_NTV = model(**inputs).logits[:, start - 1 :]
    logits_NCV = logits_NTV[:, :-1].float() / temperature
    targets_NC = ids_NT[:, start:]
    logp_NC = logits_NCV.log_softmax(-1).gather(-1, targets_NC.unsqueeze(-1)).squeeze(-1)
    return logp_NC * rollout.completion_mask_NC.to(device)

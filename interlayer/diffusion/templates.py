"""What to generate: template rows of token ids with [MASK] where the sampler writes.

A row is ``[BOS] + prompt + [MASK] × G + suffix`` (BOS when the tokenizer has one), right-padded with
the pad id (attention 0) to the longest row: G = ``gen_tokens``, or, when that is 0, whatever fills the row
to ``length``. With no prompt and no suffix this is unconditional generation; a suffix makes it infilling.
Sample i takes prompt i mod (number of prompts).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from interlayer.errors import UserError


def build_templates(
    tokenizer: Any,
    mask_id: int,
    count: int,
    length: int,
    prompts: Sequence[str] = (),
    suffix: str = "",
    gen_tokens: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(template [N, L'], attention [N, L']) of the module doc."""
    if count < 1:
        raise UserError(f"--num-samples must be at least 1, got {count}")
    if length < 1 or gen_tokens < 0:
        raise UserError(
            f"--length must be at least 1 and --gen-tokens at least 0, got {length} and {gen_tokens}"
        )
    start = [] if tokenizer.bos_token_id is None else [int(tokenizer.bos_token_id)]
    suffix_ids = tokenizer(suffix, add_special_tokens=False, verbose=False)["input_ids"] if suffix else []
    prompt_ids = [tokenizer(p, add_special_tokens=False, verbose=False)["input_ids"] for p in prompts] or [[]]
    rows = []
    for i in range(count):
        fixed = len(start) + len(prompt_ids[i % len(prompt_ids)]) + len(suffix_ids)
        gap = gen_tokens or length - fixed
        if gap < 1 or (gen_tokens and fixed + gap > length):
            raise UserError(
                f"the prompt {i % len(prompt_ids)} is {fixed} tokens with BOS and the suffix, leaving no room "
                f"for {max(gen_tokens, 1)} generated tokens in a sequence of {length}; use a longer --length "
                "or a shorter prompt"
            )
        rows.append(start + prompt_ids[i % len(prompt_ids)] + [mask_id] * gap + suffix_ids)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
    template = torch.full((count, width), int(pad), dtype=torch.long)
    attention = torch.zeros((count, width), dtype=torch.long)
    for i, row in enumerate(rows):
        template[i, : len(row)] = torch.tensor(row)
        attention[i, : len(row)] = 1
    return template, attention


def decode_samples(
    tokenizer: Any, tokens_NL: torch.Tensor, attention_NL: torch.Tensor
) -> tuple[list[str], list[list[int]]]:
    """Each sample's text (special tokens dropped) and its ids (real positions, BOS dropped)."""
    texts, ids = [], []
    special = set(tokenizer.all_special_ids)
    for row, keep in zip(tokens_NL.tolist(), attention_NL.bool().tolist(), strict=True):
        real = [t for t, k in zip(row, keep, strict=True) if k]
        texts.append(tokenizer.decode(real, skip_special_tokens=True))
        ids.append([t for t in real if t not in special])
    return texts, ids

"""Generation with and without steering, for ``flow steer`` and the steering benchmark."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from interlayer.flow.interventions import SteeringTerm, steer
from interlayer.models import LoadedModel


@torch.no_grad()
def generate_ids(
    lm: LoadedModel, prompt: str, terms: Sequence[SteeringTerm], max_new_tokens: int
) -> list[int]:
    """Greedy continuation of ``prompt`` (token ids, prompt excluded) under the steering ``terms`` (none: plain),
    with the KV cache."""
    input_ids = lm.tokenizer(prompt, return_tensors="pt")["input_ids"].to(lm.device)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.tokenizer.eos_token_id
    with steer(lm.model, terms):
        out = lm.model.generate(  # type: ignore[operator]
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=pad,
        )
    return out[0, input_ids.shape[1] :].tolist()


def generate_pair(
    lm: LoadedModel, prompt: str, terms: Sequence[SteeringTerm], max_new_tokens: int
) -> tuple[str, str]:
    """(continuation without steering, continuation with it), decoded."""
    plain = generate_ids(lm, prompt, [], max_new_tokens)
    steered = generate_ids(lm, prompt, terms, max_new_tokens)
    return str(lm.tokenizer.decode(plain)), str(lm.tokenizer.decode(steered))

"""An oracle denoiser that knows the true x0 of every sample, and a perfect remasker, for sampler tests."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from interlayer.diffusion.denoiser import Denoiser

VOCAB = 32
MASK = VOCAB - 1


class Oracle(nn.Module):
    """Logits +40 at x0's token everywhere; x0 is looked up by the row's first token (its sample key).

    Records every row it is called on (``calls[key]``) and the inputs (``inputs``) for exact NFE and mask
    counts."""

    def __init__(self, targets: dict[int, torch.Tensor]) -> None:
        super().__init__()
        self.targets = targets
        self.lm_head = nn.Linear(1, VOCAB, bias=False)
        self.config = SimpleNamespace(to_dict=lambda: {"name": "oracle"})
        self.calls: dict[int, int] = {}
        self.inputs: list[torch.Tensor] = []

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> SimpleNamespace:
        logits = torch.zeros(*input_ids.shape, VOCAB)
        for row, ids in enumerate(input_ids):
            key = int(ids[0])
            self.calls[key] = self.calls.get(key, 0) + 1
            logits[row].scatter_(-1, self.targets[key][: len(ids)].unsqueeze(-1), 40.0)
        self.inputs.append(input_ids.clone())
        return SimpleNamespace(logits=logits)


class PerfectRemasker:
    """Error logits +10 where the proposal differs from x0, −10 where it agrees."""

    def __init__(self, targets: dict[int, torch.Tensor]) -> None:
        self.targets = targets

    def __call__(self, x0_BL: torch.Tensor, attention_mask_BL: torch.Tensor | None) -> torch.Tensor:
        truth_BL = torch.stack([self.targets[int(row[0])][: x0_BL.shape[1]] for row in x0_BL])
        return torch.where(x0_BL != truth_BL, 10.0, -10.0)


def oracle_case(
    samples: int, length: int, seed: int = 0
) -> tuple[Denoiser, Oracle, torch.Tensor, dict[int, torch.Tensor]]:
    """``samples`` templates [key, MASK, ...] (keys 0..samples−1 at position 0) with random true x0."""
    generator = torch.Generator().manual_seed(seed)
    targets = {}
    for key in range(samples):
        x0 = torch.randint(0, MASK, (length,), generator=generator)
        x0[0] = key
        targets[key] = x0
    template = torch.full((samples, length), MASK)
    template[:, 0] = torch.arange(samples)
    oracle = Oracle(targets)
    return Denoiser(oracle, MASK, name="oracle"), oracle, template, targets

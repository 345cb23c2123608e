"""Top-activating contexts of every latent, kept in O(F·n) memory while streaming an evaluation set."""

from __future__ import annotations

import torch


class TopContexts:
    """For each latent, the n largest activations seen so far and where they occurred (context, position)."""

    def __init__(self, latents: int, n: int = 5) -> None:
        self.values_FN = torch.full((latents, n), float("-inf"))
        self.where_FN2 = torch.full((latents, n, 2), -1, dtype=torch.long)

    def update(self, z_MF: torch.Tensor, where_M2: torch.Tensor) -> None:
        """Merge a batch of codes ``z_MF`` for tokens at (context, position) ``where_M2``."""
        n = self.values_FN.shape[1]
        top_vals_FK, top_rows_FK = z_MF.float().cpu().T.topk(min(n, z_MF.shape[0]), dim=1)
        values = torch.cat([self.values_FN, top_vals_FK], dim=1)
        where = torch.cat([self.where_FN2, where_M2.cpu()[top_rows_FK]], dim=1)
        self.values_FN, keep_FN = values.topk(n, dim=1)
        self.where_FN2 = where.gather(1, keep_FN.unsqueeze(-1).expand(-1, -1, 2))

    def examples(self, feature: int) -> list[tuple[float, int, int]]:
        """(value, context, position) of the positive top activations of ``feature``, highest first."""
        return [
            (float(v), int(c), int(p))
            for v, (c, p) in zip(self.values_FN[feature], self.where_FN2[feature], strict=True)
            if v > 0
        ]

"""Wire a training run together: one SAE config per site of an activation source (a model or a cache,
:mod:`interlayer.sources`), handed to :func:`interlayer.sae.trainer.train_saes`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from interlayer.distributed import SINGLE, ProcessGroup, local_sites
from interlayer.sae.config import SAEConfig
from interlayer.sae.trainer import SiteSummary, TrainConfig, train_saes
from interlayer.sources import ActivationSource


def train_from_source(
    out: str | Path,
    source: ActivationSource,
    template: SAEConfig,
    train_cfg: TrainConfig,
    device: str = "cpu",
    on_step: Callable[[int, dict[str, SiteSummary]], None] | None = None,
    group: ProcessGroup = SINGLE,
    distribute: str = "sites",
) -> dict[str, Any]:
    """Train one SAE per site of ``source``, shaped like ``template`` (architecture, latents, k).

    Under ``torchrun`` (see :mod:`interlayer.distributed`): with ``distribute="sites"`` this rank computes
    and trains only its block of sites; with ``"data"`` it runs its share of the model batches and trains
    every site on its share of each batch.
    """
    sae_cfgs = {
        name: replace(template, d_in=source.width, site=name, model=source.model) for name in source.sites
    }
    mine = local_sites(source.sites, group, distribute)
    deal = SINGLE if distribute == "sites" else group  # by data, ranks share the model batches
    return train_saes(
        out,
        lambda start: source.site_chunks(mine, start, deal),
        sae_cfgs,
        train_cfg,
        source.settings,
        device=device,
        on_step=on_step,
        group=group,
        distribute=distribute,
    )

"""The core training loop's parameter groups: which AdamW group each parameter lands in, at which rate."""

from __future__ import annotations

import torch
from torch import nn

from interlayer.training import ParamGroup, TrainingLoop, _param_groups, row_seed


def test_parameters_go_to_the_first_group_whose_text_they_contain() -> None:
    module = nn.ModuleDict(
        {
            "router": nn.Linear(3, 2),
            "router_gate": nn.Linear(2, 2, bias=False),
            "proj": nn.Linear(3, 3),
        }
    )
    loop = TrainingLoop(
        module,
        lambda step, g: (torch.zeros(()), {}),
        steps=1,
        lr=1e-3,
        seed=0,
        weight_decay=0.1,
        groups=(ParamGroup("router_gate", 5e-2), ParamGroup("router", 1e-2, 0.01)),
    )
    groups = _param_groups(loop, loop.trainable())
    named = {id(p): n for n, p in module.named_parameters()}
    summary = [(sorted(named[id(p)] for p in g["params"]), g["peak_lr"], g["weight_decay"]) for g in groups]
    assert summary == [
        (["router_gate.weight"], 5e-2, 0.0),
        (["router.bias", "router.weight"], 1e-2, 0.01),
        (["proj.weight"], 1e-3, 0.1),
        (["proj.bias"], 1e-3, 0.0),
    ]


def test_row_seed_depends_on_seed_and_index_alone() -> None:
    assert row_seed(3, 7) == row_seed(3, 7)
    assert len({row_seed(3, 7), row_seed(3, 8), row_seed(4, 7)}) == 3
    assert row_seed(0, 0) == 6956993988634818902  # 63 bits of sha256("0:0"), fixed so that old runs resume

"""``LimeConfig``: a :class:`~transformers.LlamaConfig` with LIMe's router options.

Every Llama field keeps its name and default, so a Llama config's dictionary (or
``LimeConfig(**llama_config.to_dict())``) describes the LIMe model of the same shape; ``model_type`` is ``lime``,
which :mod:`interlayer.lime` registers with transformers' Auto classes.
"""

from __future__ import annotations

from typing import Any

from transformers import LlamaConfig

ROUTERS = ("static", "dynamic")


class LimeConfig(LlamaConfig):
    """A Llama-architecture decoder whose attention at layer r reads keys and values mixed from layers 0..r."""

    model_type = "lime"

    lime_router: str = "static"
    """``static``: a free linear mix per layer, W_r [R, (r+1)·R] (the paper's main model); ``dynamic``: the
    same static mix plus an input-dependent one, Δ_r(x_t) = reshape(U_r · norm(x_t)) with U_r initialised to
    zero, so a dynamic model starts as its static one."""

    def __post_init__(self, **kwargs: Any) -> None:
        kwargs.pop("model_type", None)  # LimeConfig(**llama_config.to_dict()) is a lime config
        super().__post_init__(**kwargs)
        if self.lime_router not in ROUTERS:
            raise ValueError(f"lime_router must be one of {', '.join(ROUTERS)}, not {self.lime_router!r}")

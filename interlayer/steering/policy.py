"""What an RL run trains: steering vectors (all layers, one layer, low rank), the whole model, or LoRA adapters.

Every mode exposes the same four things to the trainer: the trainable parameters, a context in which the
policy π_θ runs, a context in which the frozen reference π_ref runs (for the KL term), and the files of the
result. The reference is the model without the vectors (vector modes), with the adapters disabled (LoRA), or
a frozen copy of the initial weights made only when β > 0 (full fine-tuning).

LoRA (through ``peft``) adapts each block's MLP down projection, found structurally: the last ``nn.Linear``
(or GPT-2 ``Conv1D``) inside the module of site ``layers.N.mlp`` that maps back to the model width
(``down_proj``, ``c_proj``, ``dense_4h_to_h``, ``fc2``), with rank r = 4 and α = 2r (scale 2) by default.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from interlayer.errors import UserError
from interlayer.sites import model_sites
from interlayer.steering.vectors import SteeringVectors

MODES = ("vectors", "single", "lowrank", "full", "lora")
"""``vectors``: one vector per chosen site (all layers by default); ``single``: one vector; ``lowrank``:
S = A·B over the sites; ``full``: every weight; ``lora``: LoRA on the MLP down projections."""
VECTOR_MODES = ("vectors", "single", "lowrank")
DEFAULT_LR = {"vectors": 1e-3, "single": 1e-3, "lowrank": 1e-3, "full": 1e-6, "lora": 1e-4}
"""The paper's learning rates (steering 1e-3, full fine-tuning 1e-6, LoRA 1e-4)."""


def down_projections(model: nn.Module) -> list[str]:
    """The module path of each block's MLP down projection (see the module docstring). Where the MLP site is
    a post-norm (Gemma 2/3, OLMo 2), the projection is looked for in the block's MLP child instead."""
    config: Any = model.config
    width = int(config.hidden_size)
    paths = []
    for name, site in model_sites(model).items():
        if not name.endswith(".mlp"):
            continue
        path = _last_projection(model, site.module_path, width)
        if path is None:  # the site is a norm after the MLP: search the block's MLP module
            block = site.module_path.rpartition(".")[0]
            for child in ("mlp", "feed_forward", "ffn"):
                if hasattr(model.get_submodule(block), child):
                    path = _last_projection(model, f"{block}.{child}", width)
                    break
        if path is None:
            raise UserError(f"no down projection found in {site.module_path} for LoRA")
        paths.append(path)
    if not paths:
        raise UserError("this model has no MLP sites, so LoRA on the down projection has nothing to adapt")
    return paths


def _last_projection(model: nn.Module, module_path: str, width: int) -> str | None:
    """The last linear (or ``Conv1D``) module in ``module_path`` (itself included) that outputs ``width``."""
    found = None
    for child, sub in model.get_submodule(module_path).named_modules():
        if _output_width(sub) == width:
            found = f"{module_path}.{child}" if child else module_path
    return found


def _output_width(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.out_features
    if type(module).__name__ == "Conv1D":  # GPT-2's transposed linear layer
        return int(module.nf)  # type: ignore[arg-type]
    return None


class Policy:
    """The trainable part of an RL run over ``model`` (frozen on entry), in one of :data:`MODES`."""

    def __init__(
        self,
        model: nn.Module,
        mode: str,
        sites: str = "",
        rank: int = 2,
        lora_rank: int = 4,
        kl: bool = False,
        model_name: str = "",
        seed: int = 0,
    ) -> None:
        if mode not in MODES:
            raise UserError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
        self.mode = mode
        self.vectors: SteeringVectors | None = None
        self.reference_model: nn.Module | None = None
        if mode in VECTOR_MODES:
            if not sites:
                config: Any = model.config
                depth = int(config.num_hidden_layers)
                sites = f"layers.{depth // 2}" if mode == "single" else "layers.*"
            kind = {"vectors": "all", "single": "single", "lowrank": "lowrank"}[mode]
            self.vectors = SteeringVectors.zeros(model, sites, kind, rank, model_name, seed)
            self.vectors.to(next(model.parameters()).device)
            self.model = model
        elif mode == "full":
            if kl:
                self.reference_model = copy.deepcopy(model).requires_grad_(False)
            self.model = model.requires_grad_(True)
        else:
            from peft import LoraConfig, get_peft_model

            targets = down_projections(model)
            transposed = any(type(model.get_submodule(t)).__name__ == "Conv1D" for t in targets)
            config = LoraConfig(
                r=lora_rank,
                lora_alpha=2 * lora_rank,
                lora_dropout=0.0,
                target_modules=targets,
                fan_in_fan_out=transposed,  # GPT-2's Conv1D stores the weight transposed
            )
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.model = get_peft_model(model, config)  # type: ignore[arg-type]

    def parameters(self) -> list[nn.Parameter]:
        """The trainable parameters, in a fixed order."""
        return [p for _, p in self.named_parameters()]

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of every trainable parameter."""
        if self.vectors is not None:
            return list(self.vectors.named_parameters())
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def policy(self) -> Any:
        """The context in which ``self.model`` computes π_θ."""
        return self.vectors.applied(self.model) if self.vectors is not None else nullcontext()

    @contextmanager
    def reference(self) -> Iterator[nn.Module]:
        """The frozen reference model π_ref (as a context yielding the module to run)."""
        if self.mode == "lora":
            with self.model.disable_adapter():  # type: ignore[operator]
                yield self.model
        elif self.reference_model is not None:
            yield self.reference_model
        else:
            yield self.model  # vector modes: the model without the vectors

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The trainable parameters by name (CPU copies)."""
        return {name: p.detach().cpu().clone() for name, p in self.named_parameters()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, param in self.named_parameters():
                param.copy_(tensors[name])

    def save_result(self, out: Path, tokenizer: Any) -> Path:
        """Write the trained result into ``out``: ``vectors/`` (vector modes), ``model/`` (full fine-tuning, with
        the tokenizer, loadable as ``--model``), or for LoRA ``adapter/`` (peft's safetensors format) and
        ``model/`` with the adapters merged into the weights. Returns the folder of the main result."""
        if self.vectors is not None:
            return self.vectors.save(out / "vectors")
        if self.mode == "lora":
            self.model.save_pretrained(out / "adapter", safe_serialization=True)  # type: ignore[operator]
            merged = copy.deepcopy(self.model).merge_and_unload()  # type: ignore[operator]
            merged.save_pretrained(out / "model", safe_serialization=True)
            tokenizer.save_pretrained(out / "model")
            return out / "adapter"
        self.model.save_pretrained(out / "model", safe_serialization=True)  # type: ignore[operator]
        tokenizer.save_pretrained(out / "model")
        return out / "model"

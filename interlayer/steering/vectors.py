"""Steering vectors: one vector per chosen site, added to what flows through that site at every position.

With sites σ_1..σ_n (by default the residual stream after every block, ``layers.0`` … ``layers.{L-1}``), the
steered model computes, at each site σ_i and every token t,

    h_{σ_i}[t] ← h_{σ_i}[t] + s_i,        S = [s_1; …; s_n] ∈ R^{n×d}

so every later block reads the shifted value. Three parametrisations of S (arXiv:2505.18706 and its variants):

- ``all``: S is free, n·d numbers, initialised to zero (the paper's one vector per layer);
- ``single``: n = 1, one vector at one site, d numbers;
- ``lowrank``: S = A·B with A ∈ R^{n×r}, B ∈ R^{r×d}, r·(n + d) numbers. A starts at zero and B at
  N(0, 1/d), so S = 0 at the start and both factors receive gradient after the first step (with A and B both
  zero neither would).

The official code adds s_ℓ as a zero-initialised bias on layer ℓ's MLP down projection; in every block whose
MLP output is added to the residual directly (pre-norm Llama/Qwen/GPT-2/GPT-NeoX blocks) that is exactly the
vector at ``layers.ℓ`` (tested). The vector is constant over positions: with left-padded batches it is also
added at the pad positions, which the attention mask hides from every real token, and in ``generate`` with the
KV cache the prefill pass shifts the whole prompt and each step the new token, which is what a full forward
of the sequence computes (tested equal).

On disk a set of vectors is a folder with ``vectors.safetensors`` (``S`` [n, d] for ``all``/``single``, ``A``
and ``B`` for ``lowrank``) and ``vectors.json`` naming the model, its width and depth, the sites and the
kind. Loading checks the width and depth against the model it is applied to and refuses a mismatch.

>>> vectors = SteeringVectors.zeros(model, sites="layers.*")
>>> with vectors.applied(model):
...     out = model.generate(input_ids, max_new_tokens=20)
>>> vectors.save("my_vectors"); same = SteeringVectors.load("my_vectors")
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from interlayer import atomic
from interlayer.errors import UserError
from interlayer.sites import Site, hooks, match_site_names, model_sites, resolve_sites

KINDS = ("all", "single", "lowrank")
"""The parametrisations of the steering matrix S."""
FORMAT_VERSION = 1
_WEIGHTS = "vectors.safetensors"
_META = "vectors.json"


@dataclass(frozen=True)
class VectorsMeta:
    """What a vector file says about itself (``vectors.json``)."""

    kind: str
    """``all``, ``single`` or ``lowrank``."""
    sites: tuple[str, ...]
    """The site of each row of S, in order."""
    d_model: int
    """The width d of every vector (the model's hidden size)."""
    num_layers: int
    """The depth of the model the vectors were made for."""
    model: str
    """The model they were trained on (a name as the user typed it; informational)."""
    rank: int = 0
    """r for ``lowrank``; 0 otherwise."""
    version: int = FORMAT_VERSION
    """The format version."""


def _depth(model: nn.Module) -> int:
    config: Any = model.config
    return int(config.num_hidden_layers)


def _width(model: nn.Module) -> int:
    config: Any = model.config
    return int(config.hidden_size)


class SteeringVectors(nn.Module):
    """A steering matrix S [n, d] over n sites, with its parametrisation (see the module docstring)."""

    def __init__(self, meta: VectorsMeta, tensors: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        if meta.kind not in KINDS:
            raise UserError(f"unknown steering kind {meta.kind!r}; use one of {', '.join(KINDS)}")
        if not meta.sites:
            raise UserError("steering vectors need at least one site")
        if meta.kind == "single" and len(meta.sites) != 1:
            raise UserError(f"a single steering vector takes exactly one site, got {len(meta.sites)}")
        if meta.kind == "lowrank" and meta.rank < 1:
            raise UserError(f"a low-rank steering matrix needs rank >= 1, got {meta.rank}")
        self.meta = meta
        n, d = len(meta.sites), meta.d_model
        if meta.kind == "lowrank":
            self.A = nn.Parameter(torch.zeros(n, meta.rank))
            # drawn only for fresh vectors, so loading a file leaves the global random stream alone
            fresh_B = (
                torch.randn(meta.rank, d) / math.sqrt(d) if tensors is None else torch.empty(meta.rank, d)
            )
            self.B = nn.Parameter(fresh_B)
        else:
            self.S = nn.Parameter(torch.zeros(n, d))
        if tensors is not None:
            self._load_tensors(tensors)

    def _load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        expected = {name: tuple(p.shape) for name, p in self.named_parameters()}
        got = {name: tuple(t.shape) for name, t in tensors.items()}
        if got != expected:
            raise UserError(f"the vector file holds tensors {got}, but its vectors.json describes {expected}")
        with torch.no_grad():
            for name, param in self.named_parameters():
                param.copy_(tensors[name])

    @classmethod
    def zeros(
        cls,
        model: nn.Module,
        sites: Sequence[str] | str = "layers.*",
        kind: str = "all",
        rank: int = 0,
        model_name: str = "",
        seed: int = 0,
    ) -> SteeringVectors:
        """Vectors for ``model`` at the sites matching ``sites`` (globs allowed; in site order), S = 0.
        ``seed`` draws the low-rank B factor."""
        names = tuple(site.name for site in resolve_sites(model, sites))
        meta = VectorsMeta(kind, names, _width(model), _depth(model), model_name, rank)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(meta)

    def matrix(self) -> torch.Tensor:
        """S [n, d] (A·B for ``lowrank``), differentiable in the parameters."""
        return self.A @ self.B if self.meta.kind == "lowrank" else self.S

    def by_site(self) -> dict[str, torch.Tensor]:
        """Each site's vector s_i [d], detached."""
        matrix_ND = self.matrix().detach()
        return {site: matrix_ND[i] for i, site in enumerate(self.meta.sites)}

    def num_parameters(self) -> int:
        """The number of trainable numbers: n·d, d or r·(n + d)."""
        return sum(p.numel() for p in self.parameters())

    def check_model(self, model: nn.Module) -> dict[str, Site]:
        """The model's sites for these vectors; a model of another width or depth, or one without one of the
        sites, is refused with one line."""
        width, depth = _width(model), _depth(model)
        if (self.meta.d_model, self.meta.num_layers) != (width, depth):
            raise UserError(
                f"these steering vectors are for a model of width {self.meta.d_model} and "
                f"{self.meta.num_layers} layers ({self.meta.model or 'unnamed'}), but this model has width "
                f"{width} and {depth} layers"
            )
        sites = model_sites(model)
        missing = [name for name in self.meta.sites if name not in sites]
        if missing:
            raise UserError(f"unknown site {missing[0]!r}; valid sites: {', '.join(sites)}")
        return {name: sites[name] for name in self.meta.sites}

    @contextmanager
    def applied(self, model: nn.Module, scale: float = 1.0) -> Iterator[None]:
        """Add scale·s_i at site σ_i in every forward pass (and ``generate`` step) run inside the block.

        S is recomputed from the parameters at each forward pass, so gradients reach them. The hooks are
        removed on exit, also when the block raises."""
        sites = self.check_model(model)
        index = {name: i for i, name in enumerate(self.meta.sites)}

        def add(i: int) -> Callable[[torch.Tensor], torch.Tensor]:
            def fn(value_BTD: torch.Tensor) -> torch.Tensor:
                s_D = self.matrix()[i]
                return value_BTD + (scale * s_D).to(device=value_BTD.device, dtype=value_BTD.dtype)

            return fn

        with hooks(model, {site: add(index[name]) for name, site in sites.items()}):
            yield

    def attach(self, model: nn.Module, scale: float = 1.0) -> SteeringHandle:
        """:meth:`applied` without a ``with`` block: the returned handle's ``remove()`` restores the model."""
        stack = ExitStack()
        stack.enter_context(self.applied(model, scale))
        return SteeringHandle(stack)

    def only(self, sites: Sequence[str] | str) -> SteeringVectors:
        """A ``single``/``all`` copy holding only the rows of ``sites`` (names or globs), as fixed vectors."""
        names = match_site_names(list(self.meta.sites), sites)
        by_site = self.by_site()
        kind = "single" if len(names) == 1 else "all"
        meta = VectorsMeta(kind, tuple(names), self.meta.d_model, self.meta.num_layers, self.meta.model)
        return SteeringVectors(meta, {"S": torch.stack([by_site[n] for n in names])})

    def save(self, folder: str | Path) -> Path:
        """Write ``vectors.safetensors`` then ``vectors.json`` into ``folder`` (atomic writes)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {name: p.detach().cpu().contiguous() for name, p in self.named_parameters()}
        atomic.write_tensors(folder / _WEIGHTS, tensors)
        meta = asdict(self.meta)
        meta["sites"] = list(self.meta.sites)
        atomic.write_json(folder / _META, meta)
        return folder

    @classmethod
    def load(cls, folder: str | Path, model: nn.Module | None = None) -> SteeringVectors:
        """Read a folder written by :meth:`save` (safetensors and JSON only); with ``model``, also check that the
        vectors fit it (:meth:`check_model`)."""
        folder = Path(folder)
        if not (folder / _META).is_file():
            raise UserError(f"no steering vectors in {folder} (expected {_META} and {_WEIGHTS})")
        raw: dict[str, Any] = atomic.read_json_object(folder / _META, "steering vector metadata")
        try:
            meta = VectorsMeta(
                kind=str(raw["kind"]),
                sites=tuple(str(s) for s in raw["sites"]),
                d_model=int(raw["d_model"]),
                num_layers=int(raw["num_layers"]),
                model=str(raw.get("model", "")),
                rank=int(raw.get("rank", 0)),
                version=int(raw.get("version", FORMAT_VERSION)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{folder / _META} is not a steering vector description ({exc})") from None
        if meta.version > FORMAT_VERSION:
            raise UserError(
                f"{folder / _META} has format version {meta.version}; this interlayer reads up to 1"
            )
        vectors = cls(meta, atomic.read_tensors(folder / _WEIGHTS, "steering vectors"))
        if model is not None:
            vectors.check_model(model)
        return vectors


class SteeringHandle:
    """Returned by :meth:`SteeringVectors.attach`; ``remove()`` takes the vectors out of the model (idempotent)."""

    def __init__(self, stack: ExitStack) -> None:
        self._stack = stack

    def remove(self) -> None:
        self._stack.close()

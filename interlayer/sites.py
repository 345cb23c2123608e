"""Named sites inside a transformer, and hooks that capture or replace what flows through them.

Site names (a contract users type):

- ``embed``: the residual stream entering block 0 (token + position embeddings, after any embedding norm);
- ``layers.N``: the residual stream after block N;
- ``layers.N.attn``: the attention output after its output projection, as it is added to the residual;
- ``layers.N.mlp``: the MLP output, as it is added to the residual;
- globs over these names, where ``*`` matches within one dot-separated part and ``**`` across parts:
  ``layers.*`` is every residual site, ``layers.*.mlp`` every MLP output, ``**`` every site.

Resolution is structural, not a table per model family: the blocks are the ``nn.ModuleList`` whose length
is ``config.num_hidden_layers`` (the first with an attention child, when a speech encoder's convolution list
has that length too); inside a block the attention is the child whose name contains ``attn`` or
``attention`` (not a norm or dropout) and the MLP the child named ``mlp``/``feed_forward``/``ffn``. A module
site is always the tensor the block adds to the residual stream, so that in every pre-norm, parallel or
sandwich block ``layers.N == layers.N-1 + layers.N.attn + layers.N.mlp`` (``layers.-1`` being ``embed``).
Four layouts need one extra rule each, checked in this order:

- Post-norms on the module outputs (a ``post_feedforward_layernorm`` child: Gemma 2/3 sandwich blocks, OLMo 2)
  normalise each module's output before the residual add, so the sites are the norms
  ``post_attention_layernorm`` and ``post_feedforward_layernorm``.
- Post-LN encoders (BERT family: an attention with an ``output.dense`` submodule) fold the residual add and
  LayerNorm into an ``output`` submodule, so their sites are the projections ``attention.output.dense`` and
  ``output.dense``. These blocks normalise after the add: the identity above does not hold for them.
- A module whose ``forward`` takes a ``residual`` argument adds the residual inside (BLOOM), so its site is its
  last ``nn.Linear`` child projecting to the model width (``self_attention.dense``, ``mlp.dense_4h_to_h``),
  whose output is exactly the module's contribution.
- A block with no MLP child (OPT) has its MLP output in its last direct ``nn.Linear`` child projecting to the
  model width (``fc2``). Such a block may run it on tokens flattened to [batch·tokens, width]; the site's value
  is still handed over (and must be returned) as [batch, tokens, width] (:attr:`Site.flattened`).

Captured values are copies: a model that later updates a module output in place (Falcon's parallel block runs
``mlp_output += attention_output``) cannot change them. Likewise the value a splice function returns is copied
before the model sees it, so such in-place updates never reach the caller's tensors.

Hooks never outlive their context manager: they are removed in ``finally`` even when the body raises.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from interlayer.errors import UserError

_ATTN_WORDS = ("attn", "attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn")


@dataclass(frozen=True)
class Site:
    """One named place in the model where a [batch, seq, width] tensor flows."""

    name: str
    """The user-facing name, e.g. ``layers.3.mlp``."""
    module_path: str
    """The dotted path of the hooked module inside the model."""
    layer: int
    """The block index (``-1`` for ``embed``)."""
    width: int
    """The size of the last dimension."""
    is_block_input: bool = False
    """True for ``embed``: hooked as the input of block 0 rather than a module output."""
    flattened: bool = False
    """True for a projection that its block may call on tokens flattened to [batch·tokens, width] (OPT's
    ``fc2``): the block's input shape is recorded by a pre-hook on the block, and the value is viewed as
    [batch, tokens, width] for capture and splice."""


def _block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ``nn.ModuleList`` of ``config.num_hidden_layers`` blocks; where several lists have that length (a
    speech encoder's convolutional feature encoder may), the first whose blocks have an attention child."""
    n_layers = getattr(model.config, "num_hidden_layers", None)
    candidates = [
        (path, module)
        for path, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == n_layers and len(module) > 0
    ]
    for path, module in candidates:
        if _child_path(module[0], lambda n: any(w in n for w in _ATTN_WORDS)) is not None:
            return path, module
    if candidates:
        return candidates[0]
    raise UserError(
        f"could not find the transformer blocks of {type(model).__name__} (no ModuleList of {n_layers} layers)"
    )


def _child_path(block: nn.Module, want: Callable[[str], bool]) -> str | None:
    return next((name for name, _ in block.named_children() if want(name.lower())), None)


def _adds_residual_inside(module: nn.Module) -> bool:
    """True when ``module.forward`` takes the residual and adds it itself (BLOOM's attention and MLP)."""
    return "residual" in inspect.signature(module.forward).parameters


def _last_projection(module: nn.Module, width: int) -> str | None:
    """The name of the last direct ``nn.Linear`` child of ``module`` with ``width`` outputs, if any."""
    names = [n for n, c in module.named_children() if isinstance(c, nn.Linear) and c.out_features == width]
    return names[-1] if names else None


def _module_site(block: nn.Module, child: str, width: int) -> str:
    """The site inside the module ``child`` of ``block``: the module itself, or, where the module adds the
    residual inside, its output projection."""
    module = block.get_submodule(child)
    if _adds_residual_inside(module):
        projection = _last_projection(module, width)
        if projection is None:
            raise UserError(
                f"{type(module).__name__} adds the residual inside but has no Linear child of width {width}; "
                "its sites cannot be resolved"
            )
        return f"{child}.{projection}"
    return child


def _module_sites(block: nn.Module, width: int) -> dict[str, tuple[str, bool]]:
    """Relative paths of the ``attn`` and ``mlp`` sites inside one block, each with its
    :attr:`Site.flattened` flag (either site may be missing)."""
    children = dict(block.named_children())
    if "post_feedforward_layernorm" in children and "post_attention_layernorm" in children:
        return {"attn": ("post_attention_layernorm", False), "mlp": ("post_feedforward_layernorm", False)}
    found: dict[str, tuple[str, bool]] = {}
    attn = _child_path(
        block, lambda n: any(w in n for w in _ATTN_WORDS) and "norm" not in n and "dropout" not in n
    )
    if attn is not None:
        inner = dict(children[attn].named_modules())
        found["attn"] = (
            f"{attn}.output.dense" if "output.dense" in inner else _module_site(block, attn, width),
            False,
        )
    mlp = _child_path(block, lambda n: n in _MLP_NAMES)
    if mlp is not None:
        found["mlp"] = (_module_site(block, mlp, width), False)
    elif "output" in children and hasattr(children["output"], "dense"):
        found["mlp"] = ("output.dense", False)
    elif (projection := _last_projection(block, width)) is not None:
        found["mlp"] = (projection, True)
    return found


def model_sites(model: nn.Module) -> dict[str, Site]:
    """Every site of ``model`` by name, in forward order."""
    width = int(model.config.hidden_size)  # type: ignore[union-attr,arg-type]
    blocks_path, blocks = _block_list(model)
    sites = {"embed": Site("embed", f"{blocks_path}.0", -1, width, is_block_input=True)}
    for index, block in enumerate(blocks):
        prefix = f"{blocks_path}.{index}"
        for kind, (rel, flattened) in _module_sites(block, width).items():
            name = f"layers.{index}.{kind}"
            sites[name] = Site(name, f"{prefix}.{rel}", index, width, flattened=flattened)
        sites[f"layers.{index}"] = Site(f"layers.{index}", prefix, index, width)
    return sites


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """``*`` matches within one dot-separated part, ``**`` across parts, ``?`` one character."""
    parts = re.split(r"(\*\*|\*|\?)", pattern)
    wild = {"**": ".*", "*": "[^.]*", "?": "[^.]"}
    return re.compile("".join(wild.get(part, re.escape(part)) for part in parts) + r"\Z")


def match_site_names(available: Sequence[str], patterns: Sequence[str] | str) -> list[str]:
    """The names in ``available`` matching ``patterns`` (names or globs; comma-separated allowed), in the
    order of ``available``. An unknown name ends in a :class:`UserError` that lists the valid ones."""
    if isinstance(patterns, str):
        patterns = [patterns]
    wanted = [p.strip() for item in patterns for p in item.split(",") if p.strip()]
    if not wanted:
        raise UserError(f"no site given; valid sites: {', '.join(available)}")
    chosen: set[str] = set()
    for pattern in wanted:
        regex = _glob_regex(pattern)
        hits = [name for name in available if regex.match(name)]
        if not hits:
            raise UserError(f"unknown site {pattern!r}; valid sites: {', '.join(available)}")
        chosen.update(hits)
    return [name for name in available if name in chosen]


def resolve_sites(model: nn.Module, patterns: Sequence[str] | str) -> list[Site]:
    """The :class:`Site` objects of ``model`` matching ``patterns``, in forward order."""
    sites = model_sites(model)
    return [sites[name] for name in match_site_names(list(sites), patterns)]


class _StopForward(Exception):
    """Raised by a hook once every wanted site has been seen, to skip the rest of the forward pass."""


def _main_tensor(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _with_main_tensor(output: Any, tensor: torch.Tensor) -> Any:
    return (tensor, *output[1:]) if isinstance(output, tuple) else tensor


def _input_hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _register(
    model: nn.Module, site: Site, fn: Callable[[torch.Tensor], torch.Tensor | None]
) -> list[torch.utils.hooks.RemovableHandle]:
    """Hook ``fn`` on ``site``; when ``fn`` returns a tensor it replaces the site's value. A
    :attr:`Site.flattened` site takes one more hook, a pre-hook on its block that records the token shape.
    Returns the handles in registration order."""
    module = model.get_submodule(site.module_path)
    if site.is_block_input:

        def pre_hook(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            new = fn(_input_hidden(args, kwargs))
            if new is None:
                return None
            if args:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": new}

        return [module.register_forward_pre_hook(pre_hook, with_kwargs=True)]

    handles = []
    tokens_shape: list[torch.Size] = []  # [batch, tokens] of the block's current input (flattened sites)
    if site.flattened:
        block = model.get_submodule(site.module_path.rpartition(".")[0])

        def shape_hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            tokens_shape[:] = [_input_hidden(args, kwargs).shape[:-1]]

        handles.append(block.register_forward_pre_hook(shape_hook, with_kwargs=True))

    def hook(_m: nn.Module, _args: tuple, output: Any) -> Any:
        value = _main_tensor(output)
        flat = site.flattened and value.dim() == 2
        if flat:
            if not tokens_shape or math.prod(tokens_shape[0]) != value.shape[0]:
                raise RuntimeError(
                    f"site {site.name}: {value.shape[0]} flattened rows do not match the block input"
                )
            value = value.view(*tokens_shape[0], value.shape[-1])
        new = fn(value)
        if new is None:
            return None
        return _with_main_tensor(output, new.reshape(-1, new.shape[-1]) if flat else new)

    handles.append(module.register_forward_hook(hook))
    return handles


@contextmanager
def hooks(
    model: nn.Module, fns: Mapping[Site, Callable[[torch.Tensor], torch.Tensor | None]]
) -> Iterator[None]:
    """Register one function per site for the duration of the block; all hooks are removed on exit."""
    handles = []
    try:
        for site, fn in fns.items():
            handles.extend(_register(model, site, fn))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def capture(model: nn.Module, sites: Sequence[Site]) -> Iterator[dict[str, torch.Tensor]]:
    """Record a detached copy of the value at each site during the forward passes run inside the block
    (a copy, so that in-place updates the model makes after the site cannot change it).

    >>> with capture(model, resolve_sites(model, "layers.*")) as acts:
    ...     model(**batch)
    >>> acts["layers.0"].shape  # [batch, seq, width]
    """
    acts: dict[str, torch.Tensor] = {}

    def recorder(name: str) -> Callable[[torch.Tensor], None]:
        def record(tensor: torch.Tensor) -> None:
            acts[name] = tensor.detach().clone()

        return record

    with hooks(model, {site: recorder(site.name) for site in sites}):
        yield acts


def replace_kept(
    keep_BT: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A site function that applies ``fn`` to the kept positions only.

    ``keep_BT`` is a bool [batch, tokens] mask (e.g. False at special tokens). The returned function, given the
    site's [batch, tokens, d] value, hands ``fn`` the kept rows as one [n, d] float32 tensor and puts its
    result back at those positions (cast to the site's dtype); every other position keeps its value exactly.
    This is how SAEs are spliced for evaluation: special tokens never reach them.
    """

    def replace(t_BTD: torch.Tensor) -> torch.Tensor:
        if t_BTD.shape[:2] != keep_BT.shape:
            raise ValueError(
                f"keep mask of shape {tuple(keep_BT.shape)} does not match the site's [batch, tokens] "
                f"{tuple(t_BTD.shape[:2])}"
            )
        mask_BT = keep_BT.to(device=t_BTD.device, dtype=torch.bool)
        out_BTD = t_BTD.clone()
        out_BTD[mask_BT] = fn(t_BTD[mask_BT].float()).to(t_BTD.dtype)
        return out_BTD

    return replace


def _copied(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fn`` whose result is copied, so that the model never holds (and updates in place) the caller's tensor."""

    def copy(t: torch.Tensor) -> torch.Tensor:
        return fn(t).clone()

    return copy


@contextmanager
def splice(
    model: nn.Module,
    replacements: Mapping[Site, Callable[[torch.Tensor], torch.Tensor]],
    keep: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
) -> Iterator[None]:
    """Replace each site's value by ``fn(value)`` during the forward passes run inside the block.

    Without ``keep``, ``fn`` gets the site's whole [batch, tokens, d] tensor. With ``keep``, a bool
    [batch, tokens] mask (or a mapping from site name to such a mask; sites it does not name get the whole
    tensor), ``fn`` gets only the kept positions as an [n, d] float32 tensor and the others keep their value
    (see :func:`replace_kept`). The value ``fn`` returns is copied before the model sees it, so a model that
    updates the site's value in place (Falcon) never changes a tensor the caller holds:

    >>> keep = ~torch.isin(inputs["input_ids"], torch.tensor(tokenizer.all_special_ids))
    >>> with splice(model, {site: sae}, keep=keep):
    ...     out = model(**inputs)
    """
    fns: dict[Site, Callable[[torch.Tensor], torch.Tensor]] = {}
    for site, fn in replacements.items():
        mask = keep.get(site.name) if isinstance(keep, Mapping) else keep
        # replace_kept already returns a new tensor that only the model sees
        fns[site] = _copied(fn) if mask is None else replace_kept(mask, fn)
    with hooks(model, fns):
        yield


def run_to_sites(model: nn.Module, sites: Sequence[Site], **inputs: Any) -> dict[str, torch.Tensor]:
    """One forward pass that records ``sites`` and stops right after the last block any of them needs."""
    last_layer = max(site.layer for site in sites)
    blocks_path, _ = _block_list(model)
    stop_site = Site(
        "stop", f"{blocks_path}.{max(last_layer, 0)}", last_layer, 0, is_block_input=last_layer < 0
    )

    def stop(_tensor: torch.Tensor) -> None:
        raise _StopForward

    with capture(model, sites) as acts, hooks(model, {stop_site: stop}), suppress(_StopForward):
        model(**inputs)
    return dict(acts)

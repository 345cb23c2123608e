"""Hook-point names of other libraries → interlayer sites (and back, for export).

SAELens / TransformerLens: ``blocks.N.hook_resid_post`` → ``layers.N``, ``blocks.N.hook_resid_pre`` (N ≥ 1,
the residual stream entering block N, which is block N − 1's output) → ``layers.{N−1}``,
``blocks.N.hook_mlp_out`` → ``layers.N.mlp``, ``blocks.N.hook_attn_out`` → ``layers.N.attn``. sparsify (module paths of the HF model):
``layers.N`` / ``h.N`` / ``model.layers.N`` / ``gpt_neox.layers.N`` → ``layers.N``, ``….mlp`` → ``layers.N.mlp``,
``….self_attn`` / ``….attn`` / ``….attention`` → ``layers.N.attn``. ``….mlp``/``….attn`` are the
modules' outputs: for Gemma-2/3 and OLMo 2 (post-norms) interlayer's ``.mlp``/``.attn`` sites sit after a norm,
for BERT (post-LN) and BLOOM (residual added inside the module) they are the output projections, so such an
SAE reads a different activation there. A name that matches none of these
is kept as it is, with a warning: the SAE still loads, and a run that names that site fails with the list of valid ones.
"""

from __future__ import annotations

import re
import warnings

_SAELENS = re.compile(r"^blocks\.(\d+)\.hook_(resid_post|mlp_out|attn_out)$")
_RESID_PRE = re.compile(r"^blocks\.([1-9]\d*)\.hook_resid_pre$")
_SAELENS_SITE = {"resid_post": "", "mlp_out": ".mlp", "attn_out": ".attn"}
_MODULE = re.compile(
    r"^(?:model\.|transformer\.|gpt_neox\.|encoder\.)?(?:layers|h|layer)\.(\d+)(?:\.(mlp|self_attn|attn|attention))?$"
)
_MODULE_SITE = {None: "", "mlp": ".mlp", "self_attn": ".attn", "attn": ".attn", "attention": ".attn"}


def site_from_saelens(hook_name: str) -> str:
    """The interlayer site of a TransformerLens hook name (see the module docstring)."""
    if not hook_name:
        return ""
    pre = _RESID_PRE.match(hook_name)
    if pre is not None:
        return f"layers.{int(pre.group(1)) - 1}"
    match = _SAELENS.match(hook_name)
    if match is None:
        return _unmapped(hook_name, "SAELens")
    return f"layers.{match.group(1)}{_SAELENS_SITE[match.group(2)]}"


def site_from_module(hookpoint: str, library: str = "sparsify") -> str:
    """The interlayer site of a module-path hook point (sparsify, dictionary_learning)."""
    if not hookpoint:
        return ""
    match = _MODULE.match(hookpoint)
    if match is None:
        return _unmapped(hookpoint, library)
    return f"layers.{match.group(1)}{_MODULE_SITE[match.group(2)]}"


def saelens_hook(site: str) -> str:
    """The TransformerLens hook name of an interlayer site (the site itself when it has none)."""
    match = re.match(r"^layers\.(\d+)(\.mlp|\.attn)?$", site)
    if match is None:
        return site
    return (
        f"blocks.{match.group(1)}.hook_"
        + {None: "resid_post", ".mlp": "mlp_out", ".attn": "attn_out"}[match.group(2)]
    )


def _unmapped(name: str, library: str) -> str:
    warnings.warn(
        f"{library} hook point {name!r} has no interlayer site; it is kept as the SAE's site as it is",
        stacklevel=3,
    )
    return name

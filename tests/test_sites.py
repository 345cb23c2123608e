"""Tests for interlayer.sites: site resolution per family, capture/splice semantics, early stop, hook cleanup."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import DECODERS, FAMILIES
from torch import nn

from interlayer.errors import UserError
from interlayer.models import LoadedModel, load_model
from interlayer.sites import (
    Site,
    capture,
    hooks,
    match_site_names,
    model_sites,
    replace_kept,
    resolve_sites,
    run_to_sites,
    splice,
)

ALL_NAMES = [
    "embed",
    *(f"layers.{n}{suffix}" for n in range(3) for suffix in (".attn", ".mlp", "")),
]
# (blocks, attn inside a block, mlp inside a block), per family.
LAYOUT = {
    "llama": ("model.layers", "self_attn", "mlp"),
    "qwen2": ("model.layers", "self_attn", "mlp"),
    "gemma2": ("model.layers", "post_attention_layernorm", "post_feedforward_layernorm"),
    "gpt2": ("transformer.h", "attn", "mlp"),
    "gpt_neox": ("gpt_neox.layers", "attention", "mlp"),
    "bert": ("encoder.layer", "attention.output.dense", "output.dense"),
    "gemma3": ("model.layers", "post_attention_layernorm", "post_feedforward_layernorm"),
    "olmo2": ("model.layers", "post_attention_layernorm", "post_feedforward_layernorm"),
    "qwen3": ("model.layers", "self_attn", "mlp"),
    "mistral": ("model.layers", "self_attn", "mlp"),
    "phi3": ("model.layers", "self_attn", "mlp"),
    "falcon": ("transformer.h", "self_attention", "mlp"),
    "bloom": ("transformer.h", "self_attention.dense", "mlp.dense_4h_to_h"),
    "opt": ("model.decoder.layers", "self_attn", "fc2"),
    "gptj": ("transformer.h", "attn", "mlp"),
}
# Sites hooked on a projection that the block runs on tokens flattened to [batch*tokens, width].
FLATTENED = {"opt": ("mlp",)}
# The literal module paths of layer 1, written out rather than derived from LAYOUT.
LAYER1_PATHS = {
    "llama": ("model.layers.1", "model.layers.1.self_attn", "model.layers.1.mlp"),
    "qwen2": ("model.layers.1", "model.layers.1.self_attn", "model.layers.1.mlp"),
    "gemma2": (
        "model.layers.1",
        "model.layers.1.post_attention_layernorm",
        "model.layers.1.post_feedforward_layernorm",
    ),
    "gpt2": ("transformer.h.1", "transformer.h.1.attn", "transformer.h.1.mlp"),
    "gpt_neox": ("gpt_neox.layers.1", "gpt_neox.layers.1.attention", "gpt_neox.layers.1.mlp"),
    "bert": ("encoder.layer.1", "encoder.layer.1.attention.output.dense", "encoder.layer.1.output.dense"),
    "gemma3": (
        "model.layers.1",
        "model.layers.1.post_attention_layernorm",
        "model.layers.1.post_feedforward_layernorm",
    ),
    "olmo2": (
        "model.layers.1",
        "model.layers.1.post_attention_layernorm",
        "model.layers.1.post_feedforward_layernorm",
    ),
    "qwen3": ("model.layers.1", "model.layers.1.self_attn", "model.layers.1.mlp"),
    "mistral": ("model.layers.1", "model.layers.1.self_attn", "model.layers.1.mlp"),
    "phi3": ("model.layers.1", "model.layers.1.self_attn", "model.layers.1.mlp"),
    "falcon": ("transformer.h.1", "transformer.h.1.self_attention", "transformer.h.1.mlp"),
    "bloom": ("transformer.h.1", "transformer.h.1.self_attention.dense", "transformer.h.1.mlp.dense_4h_to_h"),
    "opt": ("model.decoder.layers.1", "model.decoder.layers.1.self_attn", "model.decoder.layers.1.fc2"),
    "gptj": ("transformer.h.1", "transformer.h.1.attn", "transformer.h.1.mlp"),
}
# Class names of the modules behind layers.1 / layers.1.attn / layers.1.mlp.
LAYER1_CLASSES = {
    "llama": ("LlamaDecoderLayer", "LlamaAttention", "LlamaMLP"),
    "qwen2": ("Qwen2DecoderLayer", "Qwen2Attention", "Qwen2MLP"),
    "gemma2": ("Gemma2DecoderLayer", "Gemma2RMSNorm", "Gemma2RMSNorm"),
    "gpt2": ("GPT2Block", "GPT2Attention", "GPT2MLP"),
    "gpt_neox": ("GPTNeoXLayer", "GPTNeoXAttention", "GPTNeoXMLP"),
    "bert": ("BertLayer", "Linear", "Linear"),
    "gemma3": ("Gemma3DecoderLayer", "Gemma3RMSNorm", "Gemma3RMSNorm"),
    "olmo2": ("Olmo2DecoderLayer", "Olmo2RMSNorm", "Olmo2RMSNorm"),
    "qwen3": ("Qwen3DecoderLayer", "Qwen3Attention", "Qwen3MLP"),
    "mistral": ("MistralDecoderLayer", "MistralAttention", "MistralMLP"),
    "phi3": ("Phi3DecoderLayer", "Phi3Attention", "Phi3MLP"),
    "falcon": ("FalconDecoderLayer", "FalconAttention", "FalconMLP"),
    "bloom": ("BloomBlock", "Linear", "Linear"),
    "opt": ("OPTDecoderLayer", "OPTAttention", "Linear"),
    "gptj": ("GPTJBlock", "GPTJAttention", "GPTJMLP"),
}
FINAL_NORM = {
    "llama": "model.norm",
    "qwen2": "model.norm",
    "gemma2": "model.norm",
    "gpt2": "transformer.ln_f",
    "gpt_neox": "gpt_neox.final_layer_norm",
    "gemma3": "model.norm",
    "olmo2": "model.norm",
    "qwen3": "model.norm",
    "mistral": "model.norm",
    "phi3": "model.norm",
    "falcon": "transformer.ln_f",
    "bloom": "transformer.ln_f",
    "opt": "model.decoder.final_layer_norm",
    "gptj": "transformer.ln_f",
}


@pytest.fixture(scope="module")
def lms(tiny_models: dict[str, Path]) -> dict[str, LoadedModel]:
    return {family: load_model(str(tiny_models[family])) for family in FAMILIES}


def _inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1000, 29000, (2, 12), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def _output(lm: LoadedModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits for an LM, the last hidden state for an encoder."""
    out = lm.model(**inputs)
    return out.logits if lm.is_causal_lm else out.last_hidden_state


def _capture_all(lm: LoadedModel, inputs: dict[str, torch.Tensor], **kw: bool) -> tuple[dict, object]:
    with capture(lm.model, list(model_sites(lm.model).values())) as acts:
        out = lm.model(**inputs, **kw)
    return dict(acts), out


_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
)


def _hook_ids(model: nn.Module) -> set[tuple[str, str, int]]:
    """Every forward (pre-)hook registered anywhere in ``model``, as (module path, kind, handle id).

    transformers installs its own output-recording hooks the first time ``output_hidden_states=True`` is used,
    so tests on shared models compare against a snapshot; tests on fresh models assert the set is empty.
    """
    return {
        (path, kind, hook_id)
        for path, module in model.named_modules()
        for kind in ("_forward_hooks", "_forward_pre_hooks")  # the *_with_kwargs dicts only flag these ids
        for hook_id in getattr(module, kind)
    }


# ---------------------------------------------------------------- resolution


@pytest.mark.parametrize("family", FAMILIES)
def test_site_names_and_module_paths(lms: dict[str, LoadedModel], family: str) -> None:
    model = lms[family].model
    sites = model_sites(model)
    assert list(sites) == ALL_NAMES
    blocks, attn, mlp = LAYOUT[family]
    assert sites["embed"] == Site("embed", f"{blocks}.0", -1, 32, is_block_input=True)
    for n in range(3):
        assert sites[f"layers.{n}"] == Site(f"layers.{n}", f"{blocks}.{n}", n, 32)
        flat = FLATTENED.get(family, ())
        assert sites[f"layers.{n}.attn"] == Site(
            f"layers.{n}.attn", f"{blocks}.{n}.{attn}", n, 32, flattened="attn" in flat
        )
        assert sites[f"layers.{n}.mlp"] == Site(
            f"layers.{n}.mlp", f"{blocks}.{n}.{mlp}", n, 32, flattened="mlp" in flat
        )
    paths = tuple(sites[name].module_path for name in ("layers.1", "layers.1.attn", "layers.1.mlp"))
    assert paths == LAYER1_PATHS[family]
    classes = tuple(type(model.get_submodule(path)).__name__ for path in paths)
    assert classes == LAYER1_CLASSES[family]


def test_gpt_neox_attn_is_the_attention_not_its_dropout(lms: dict[str, LoadedModel]) -> None:
    # GPT-NeoX blocks register post_attention_dropout (a name containing "attention") before attention.
    children = [name for name, _ in lms["gpt_neox"].model.gpt_neox.layers[0].named_children()]
    assert children.index("post_attention_dropout") < children.index("attention")
    assert model_sites(lms["gpt_neox"].model)["layers.0.attn"].module_path == "gpt_neox.layers.0.attention"


# ---------------------------------------------------------------- semantics


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


@pytest.mark.parametrize("family", DECODERS)
def test_residual_is_sum_of_module_outputs(lms: dict[str, LoadedModel], family: str) -> None:
    # The contract of the module sites: layers.N == layers.N-1 + layers.N.attn + layers.N.mlp (layers.-1 =
    # embed) in pre-norm (Llama, Mistral, Qwen, Phi-3, OPT, BLOOM), parallel (GPT-J, GPT-NeoX, Falcon) and
    # post-norm/sandwich (Gemma 2/3, OLMo 2) blocks alike.
    acts, _ = _capture_all(lms[family], _inputs())
    for n in range(3):
        before = acts["embed"] if n == 0 else acts[f"layers.{n - 1}"]
        attn, mlp, after = acts[f"layers.{n}.attn"], acts[f"layers.{n}.mlp"], acts[f"layers.{n}"]
        assert attn.shape == mlp.shape == before.shape == (2, 12, 32)
        # Both terms are substantial, so the identity is not satisfied by a vanishing module output.
        assert attn.abs().max() > 1e-3 and mlp.abs().max() > 1e-3
        assert _relative_error(before + attn + mlp, after) <= 1e-5
        torch.testing.assert_close(after, before + attn + mlp, atol=1e-5, rtol=0)
        # Dropping either term breaks it.
        assert _relative_error(before + attn, after) > 1e-3  # BLOOM: 7e-3 (small init), against <= 1e-5
        assert _relative_error(before + mlp, after) > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_sites_match_hidden_states(lms: dict[str, LoadedModel], family: str) -> None:
    lm = lms[family]
    acts, out = _capture_all(lm, _inputs(), output_hidden_states=True)
    hidden = out.hidden_states
    assert len(hidden) == 4
    assert torch.equal(acts["embed"], hidden[0])
    assert torch.equal(acts["layers.0"], hidden[1])
    assert torch.equal(acts["layers.1"], hidden[2])
    if family == "bert":
        assert torch.equal(acts["layers.2"], hidden[3])
    else:
        # Decoders report the last hidden state after the final norm; layers.2 is the block output itself.
        final_norm = lm.model.get_submodule(FINAL_NORM[family])
        assert (acts["layers.2"] - hidden[3]).abs().max() > 1e-2
        torch.testing.assert_close(final_norm(acts["layers.2"]), hidden[3], atol=1e-6, rtol=0)
        logits = lm.model.lm_head(hidden[3])
        cap = getattr(lm.model.config, "final_logit_softcapping", None)  # Gemma 2: 30.0
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        torch.testing.assert_close(logits, out.logits, atol=1e-5, rtol=0)


def test_gemma2_embed_is_scaled_block_input(lms: dict[str, LoadedModel]) -> None:
    model = lms["gemma2"].model
    inputs = _inputs()
    acts, _ = _capture_all(lms["gemma2"], inputs)
    # Gemma multiplies the looked-up embedding rows by sqrt(d_model) before block 0.
    raw = model.model.embed_tokens.weight[inputs["input_ids"]]
    torch.testing.assert_close(acts["embed"], raw * math.sqrt(32), atol=1e-6, rtol=1e-6)
    assert (acts["embed"] - raw).abs().max() > 1e-3


def test_bert_post_ln_sites(lms: dict[str, LoadedModel]) -> None:
    model = lms["bert"].model
    inputs = _inputs()
    acts, _ = _capture_all(lms["bert"], inputs)
    torch.testing.assert_close(
        acts["embed"], model.embeddings(input_ids=inputs["input_ids"]), atol=1e-6, rtol=0
    )
    for n in range(3):
        block = model.encoder.layer[n]
        before = acts["embed"] if n == 0 else acts[f"layers.{n - 1}"]
        attention_out = block.attention.output.LayerNorm(acts[f"layers.{n}.attn"] + before)
        expected = block.output.LayerNorm(acts[f"layers.{n}.mlp"] + attention_out)
        torch.testing.assert_close(acts[f"layers.{n}"], expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- early stop


class _Counter:
    def __init__(self, model: nn.Module, paths: list[str]) -> None:
        self.calls = dict.fromkeys(paths, 0)
        self.handles = [model.get_submodule(p).register_forward_hook(self._hook(p)) for p in paths]

    def _hook(self, path: str):
        def hook(*_args: object) -> None:
            self.calls[path] += 1

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    ("pattern", "ran"),
    [("embed", ()), ("layers.0", (0,)), ("embed,layers.1.mlp", (0, 1)), ("layers.*", (0, 1, 2))],
)
def test_run_to_sites_stops_early(
    lms: dict[str, LoadedModel], family: str, pattern: str, ran: tuple[int, ...]
) -> None:
    lm = lms[family]
    blocks = LAYOUT[family][0]
    inputs = _inputs()
    full, _ = _capture_all(lm, inputs)
    sites = resolve_sites(lm.model, pattern)
    watched = [f"{blocks}.{n}" for n in range(3)] + (["lm_head"] if lm.is_causal_lm else [])
    before = _hook_ids(lm.model)
    counter = _Counter(lm.model, watched)
    try:
        acts = run_to_sites(lm.model, sites, **inputs)
    finally:
        counter.remove()
    assert sorted(acts) == sorted(s.name for s in sites)
    for name, tensor in acts.items():
        assert torch.equal(tensor, full[name]), name
    assert counter.calls == {path: int(path in {f"{blocks}.{n}" for n in ran}) for path in watched}
    assert _hook_ids(lm.model) == before


# ---------------------------------------------------------------- splice


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_splice_everywhere_is_bit_exact(lms: dict[str, LoadedModel], family: str) -> None:
    lm = lms[family]
    inputs = _inputs()
    clean = _output(lm, inputs)
    seen: list[str] = []

    def identity(name: str):
        def fn(tensor: torch.Tensor) -> torch.Tensor:
            seen.append(name)
            return tensor.clone()

        return fn

    with splice(lm.model, {site: identity(site.name) for site in model_sites(lm.model).values()}):
        spliced = _output(lm, inputs)
    assert seen == ALL_NAMES
    assert torch.equal(spliced, clean)


@pytest.mark.parametrize("family", DECODERS)
def test_adding_a_vector_at_layers_1(lms: dict[str, LoadedModel], family: str) -> None:
    lm = lms[family]
    inputs = _inputs()
    clean, out = _capture_all(lm, inputs)
    before = _hook_ids(lm.model)
    vector = torch.linspace(-1.0, 1.0, 32)
    sites = model_sites(lm.model)
    with (
        splice(lm.model, {sites["layers.1"]: lambda t: t + vector}),
        capture(lm.model, list(sites.values())) as acts,
    ):
        logits = lm.model(**inputs).logits
    # Upstream of the splice nothing changes; at the splice the value is exactly clean + vector.
    for name in ("embed", "layers.0.attn", "layers.0.mlp", "layers.0", "layers.1.attn", "layers.1.mlp"):
        assert torch.equal(acts[name], clean[name]), name
    assert torch.equal(acts["layers.1"], clean["layers.1"] + vector)
    # Downstream sees the edited stream: block 2 changes and still sums onto the spliced residual.
    assert (acts["layers.2.attn"] - clean["layers.2.attn"]).abs().max() > 1e-4
    torch.testing.assert_close(
        acts["layers.2"],
        acts["layers.1"] + acts["layers.2.attn"] + acts["layers.2.mlp"],
        atol=1e-5,
        rtol=0,
    )
    assert (logits - out.logits).abs().max() > 1e-3
    assert _hook_ids(lm.model) == before


@pytest.mark.parametrize("family", DECODERS)
def test_adding_a_vector_to_the_mlp_output_shifts_the_residual(
    lms: dict[str, LoadedModel], family: str
) -> None:
    lm = lms[family]
    inputs = _inputs()
    clean, _ = _capture_all(lm, inputs)
    vector = torch.linspace(0.5, -0.5, 32)
    sites = model_sites(lm.model)
    with (
        splice(lm.model, {sites["layers.1.mlp"]: lambda t: t + vector}),
        capture(lm.model, [sites["layers.1.mlp"], sites["layers.1"]]) as acts,
    ):
        lm.model(**inputs)
    assert torch.equal(acts["layers.1.mlp"], clean["layers.1.mlp"] + vector)
    torch.testing.assert_close(acts["layers.1"], clean["layers.1"] + vector, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", DECODERS)
@pytest.mark.parametrize("site_name", ["embed", "layers.1"])
def test_patching_the_residual_reproduces_the_other_input(
    lms: dict[str, LoadedModel], family: str, site_name: str
) -> None:
    # The residual stream carries everything later blocks read, so replacing it with input B's (same length)
    # makes the run on input A produce exactly B's logits.
    lm = lms[family]
    inputs_a, inputs_b = _inputs(0), _inputs(1)
    site = model_sites(lm.model)[site_name]
    acts_b = run_to_sites(lm.model, [site], **inputs_b)
    logits_a, logits_b = _output(lm, inputs_a), _output(lm, inputs_b)
    assert (logits_a - logits_b).abs().max() > 1e-3
    with splice(lm.model, {site: lambda _t: acts_b[site_name]}):
        patched = _output(lm, inputs_a)
    torch.testing.assert_close(patched, logits_b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["attn", "mlp"])
def test_splicing_in_the_captured_value_is_bit_exact(
    lms: dict[str, LoadedModel], family: str, kind: str
) -> None:
    # A splice replaces exactly what capture records: handing back a copy of the captured value (not the live
    # tensor) leaves the output bit for bit, and the model never writes into the tensor the caller holds
    # (Falcon adds the attention output into the MLP output in place, after the MLP site).
    lm = lms[family]
    inputs = _inputs()
    clean = _output(lm, inputs)
    site = model_sites(lm.model)[f"layers.1.{kind}"]
    held = run_to_sites(lm.model, [site], **inputs)[site.name]
    kept = held.clone()
    with splice(lm.model, {site: lambda _t: held}):
        spliced = _output(lm, inputs)
    assert torch.equal(spliced, clean)
    assert torch.equal(held, kept)


@pytest.mark.parametrize("family", DECODERS)
@pytest.mark.parametrize("kind", ["attn", "mlp"])
def test_zero_splice_removes_exactly_the_module_output(
    lms: dict[str, LoadedModel], family: str, kind: str
) -> None:
    lm = lms[family]
    inputs = _inputs()
    clean, out = _capture_all(lm, inputs)
    sites = model_sites(lm.model)
    other = "mlp" if kind == "attn" else "attn"
    with (
        splice(lm.model, {sites[f"layers.1.{kind}"]: torch.zeros_like}),
        capture(lm.model, list(sites.values())) as acts,
    ):
        logits = lm.model(**inputs).logits
    assert torch.equal(acts[f"layers.1.{kind}"], torch.zeros(2, 12, 32))
    assert torch.equal(acts["layers.0"], clean["layers.0"])
    # The block now adds only the other module's output (recomputed where it reads the zeroed one).
    assert _relative_error(acts["layers.0"] + acts[f"layers.1.{other}"], acts["layers.1"]) <= 1e-5
    if kind == "mlp":  # nothing in the block reads the MLP output: the residual loses exactly clean's
        torch.testing.assert_close(
            acts["layers.1"], clean["layers.1"] - clean["layers.1.mlp"], atol=1e-5, rtol=0
        )
    assert (logits - out.logits).abs().max() > 1e-3


def _keep_mask() -> torch.Tensor:
    keep_BT = torch.ones(2, 12, dtype=torch.bool)
    keep_BT[:, 0] = keep_BT[0, 7] = keep_BT[1, -1] = False  # like [CLS]/BOS, a SEP inside, a final EOS
    return keep_BT


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert", "opt", "bloom", "falcon"])
@pytest.mark.parametrize("site_name", ["embed", "layers.1", "layers.1.mlp"])
def test_splice_with_keep_replaces_kept_positions_only(
    lms: dict[str, LoadedModel], family: str, site_name: str
) -> None:
    lm = lms[family]
    inputs = _inputs()
    keep_BT = _keep_mask()
    site = model_sites(lm.model)[site_name]
    clean = run_to_sites(lm.model, [site], **inputs)[site_name]
    seen: list[torch.Tensor] = []

    def fn(x_ND: torch.Tensor) -> torch.Tensor:
        seen.append(x_ND.clone())
        return x_ND * -3.0 + 0.25

    for keep in (keep_BT, {site_name: keep_BT}):
        seen.clear()
        with splice(lm.model, {site: fn}, keep=keep), capture(lm.model, [site]) as acts:
            lm.model(**inputs)
        assert len(seen) == 1 and seen[0].shape == (int(keep_BT.sum()), 32) and seen[0].dtype == torch.float32
        assert torch.equal(seen[0], clean[keep_BT])  # the kept rows, in row-major order
        got = acts[site_name]
        assert torch.equal(got[~keep_BT], clean[~keep_BT])  # bit for bit
        assert torch.equal(got[keep_BT], clean[keep_BT] * -3.0 + 0.25)
        assert got.shape == clean.shape


def test_splice_without_keep_hands_over_the_whole_tensor(lms: dict[str, LoadedModel]) -> None:
    lm = lms["llama"]
    inputs = _inputs()
    sites = model_sites(lm.model)
    shapes: list[tuple[int, ...]] = []

    def fn(t: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(t.shape))
        return t

    # A mapping of masks that does not name a site leaves that site's function the whole tensor.
    with splice(lm.model, {sites["layers.0"]: fn, sites["layers.2"]: fn}, keep={"layers.2": _keep_mask()}):
        lm.model(**inputs)
    assert shapes == [(2, 12, 32), (int(_keep_mask().sum()), 32)]


def test_replace_kept_keeps_dtype_and_checks_the_mask_shape() -> None:
    t_BTD = torch.arange(2 * 3 * 4, dtype=torch.float64).reshape(2, 3, 4).to(torch.bfloat16)
    keep_BT = torch.tensor([[True, False, True], [False, False, True]])
    out = replace_kept(keep_BT, lambda x: torch.zeros_like(x) + x.dtype.itemsize)(t_BTD)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out[keep_BT], torch.full((3, 4), 4.0, dtype=torch.bfloat16))  # fn saw float32
    assert torch.equal(out[~keep_BT], t_BTD[~keep_BT])
    with pytest.raises(ValueError, match="keep mask of shape"):
        replace_kept(keep_BT[:, :2], lambda x: x)(t_BTD)


# ---------------------------------------------------------------- cleanup


@pytest.mark.parametrize("family", FAMILIES)
def test_hooks_removed_when_body_raises(tiny_models: dict[str, Path], family: str) -> None:
    lm = load_model(str(tiny_models[family]))  # fresh: no hooks at all yet
    inputs = _inputs()
    clean = _output(lm, inputs)
    assert _hook_ids(lm.model) == set()
    sites = model_sites(lm.model)
    with pytest.raises(RuntimeError, match="boom"):  # noqa: SIM117
        with capture(lm.model, list(sites.values())) as acts:
            with splice(lm.model, {s: (lambda t: t * 2.0) for s in resolve_sites(lm.model, "layers.*")}):
                # One hook per site, plus a shape-recording pre-hook on the block per flattened site.
                assert len(_hook_ids(lm.model)) == 13 + 3 * len(FLATTENED.get(family, ()))
                doubled = _output(lm, inputs)
                raise RuntimeError("boom")
    assert len(acts) == 10
    assert (doubled - clean).abs().max() > 1e-3
    for module in lm.model.modules():
        for kind in _HOOK_DICTS:
            assert len(getattr(module, kind)) == 0
    assert torch.equal(_output(lm, inputs), clean)


def test_hooks_removed_when_a_hook_raises(tiny_models: dict[str, Path]) -> None:
    lm = load_model(str(tiny_models["llama"]))
    inputs = _inputs()
    clean = _output(lm, inputs)

    def bad(_t: torch.Tensor) -> torch.Tensor:
        raise ValueError("bad splice")

    with (
        pytest.raises(ValueError, match="bad splice"),
        splice(lm.model, {model_sites(lm.model)["layers.1.mlp"]: bad}),
    ):
        _output(lm, inputs)
    assert _hook_ids(lm.model) == set()
    assert torch.equal(_output(lm, inputs), clean)


def test_hooks_removed_when_registration_fails(tiny_models: dict[str, Path]) -> None:
    lm = load_model(str(tiny_models["llama"]))
    good = model_sites(lm.model)["layers.0"]
    missing = Site("layers.9", "model.layers.9", 9, 32)
    with pytest.raises(AttributeError), hooks(lm.model, {good: lambda t: None, missing: lambda t: None}):
        pass
    assert _hook_ids(lm.model) == set()


# ---------------------------------------------------------------- globs


@pytest.mark.parametrize(
    ("patterns", "expected"),
    [
        ("layers.*", ["layers.0", "layers.1", "layers.2"]),
        ("layers.?", ["layers.0", "layers.1", "layers.2"]),
        ("layers.*.mlp", ["layers.0.mlp", "layers.1.mlp", "layers.2.mlp"]),
        ("layers.*.attn", ["layers.0.attn", "layers.1.attn", "layers.2.attn"]),
        ("**", ALL_NAMES),
        ("layers.**", ALL_NAMES[1:]),
        ("*", ["embed"]),
        ("layers.1*", ["layers.1"]),
        ("layers.2.mlp, embed", ["embed", "layers.2.mlp"]),
        (["layers.1", "layers.1.attn,layers.1"], ["layers.1.attn", "layers.1"]),
        ("layers.0,layers.*.mlp", ["layers.0.mlp", "layers.0", "layers.1.mlp", "layers.2.mlp"]),
    ],
)
def test_globs(lms: dict[str, LoadedModel], patterns: str | list[str], expected: list[str]) -> None:
    assert match_site_names(ALL_NAMES, patterns) == expected
    assert [s.name for s in resolve_sites(lms["llama"].model, patterns)] == expected


@pytest.mark.parametrize("pattern", ["layers.3", "layers.1.mlp,bogus", "layers.*.ffn", "Layers.0"])
def test_unknown_site_lists_valid_ones(lms: dict[str, LoadedModel], pattern: str) -> None:
    with pytest.raises(UserError, match="unknown site") as info:
        resolve_sites(lms["gpt2"].model, pattern)
    message = str(info.value)
    assert "\n" not in message
    bad = pattern.split(",")[-1]
    assert repr(bad) in message
    assert "valid sites: " + ", ".join(ALL_NAMES) in message
    assert "layers.0.mlp" in message


def test_empty_site_list() -> None:
    with pytest.raises(UserError, match="no site given; valid sites: embed, layers.0.attn"):
        match_site_names(ALL_NAMES, " , ")

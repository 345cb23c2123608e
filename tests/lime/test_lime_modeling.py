"""LimeForCausalLM: equal to Llama at identity routers, equal to a slow per-head reference with random
routers, cached generation = full recomputation, gradients reach the routers, the KV cache is Llama's size,
save → load through the Auto classes, sites resolve."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from interlayer.lime import LimeConfig, LimeForCausalLM
from interlayer.models import load_model
from interlayer.sites import capture, model_sites, resolve_sites

LLAMA = LlamaConfig(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def _lime(router: str = "static", seed: int = 0) -> LimeForCausalLM:
    torch.manual_seed(seed)
    return LimeForCausalLM(LimeConfig(**LLAMA.to_dict(), lime_router=router)).eval()


def _ids(batch: int = 2, tokens: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, LLAMA.vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(seed))


def test_identity_routers_give_llamas_logits() -> None:
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LLAMA).eval()
    lime = LimeForCausalLM.from_llama(llama).eval()
    ids = _ids()
    assert torch.allclose(lime(ids).logits, llama(ids).logits, atol=1e-6, rtol=0)
    # and a LIMe model whose earlier blocks are not zero is a different function
    assert not torch.allclose(_lime()(ids).logits, llama(ids).logits, atol=1e-2)


def test_router_initialisation_follows_the_official_code() -> None:
    torch.manual_seed(0)
    model = LimeForCausalLM(
        LimeConfig(**{**LLAMA.to_dict(), "num_hidden_layers": 8, "num_key_value_heads": 4})
    )
    routers = model.routers()
    assert [r.layer_idx for r in routers] == list(range(1, 8))
    assert model.model.layers[0].self_attn.router is None
    for router in routers:
        weight = router.weight.detach()
        assert weight.shape == (4, 4 * (router.layer_idx + 1))
        assert torch.equal(weight[:, -4:], torch.eye(4))
        bound = math.sqrt(3 / (4 * (router.layer_idx + 1)))
        assert weight[:, :-4].abs().max() <= bound
    last = routers[-1].weight.detach()[:, :-4]  # 112 draws of U(-b, b): std b/√3
    assert abs(last.std().item() / (math.sqrt(3 / 32) / math.sqrt(3)) - 1) < 0.25
    assert {n for n, _ in model.named_parameters() if "router" in n} == {
        f"model.layers.{r}.self_attn.router.weight" for r in range(1, 8)
    }


def _reference_logits(model: LimeForCausalLM, ids_BT: torch.Tensor) -> torch.Tensor:
    """LIMe written out per head and per layer with loops: K‖V of kv-head j at layer r = Σ_{m ≤ r, i}
    w[j, m·R + i] · (K‖V)_{m,i} before RoPE, with w = W_r (static) or, per token, W_r + reshape(U_r ·
    RMSNorm(x_t)) (dynamic); RoPE on the mixed keys; causal softmax attention with queries grouped onto
    kv-heads (query head h reads kv-head h // (H / R))."""
    cfg = model.config
    heads, kv_heads, head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    tokens = ids_BT.shape[1]
    hidden = model.model.embed_tokens(ids_BT)
    positions = torch.arange(tokens, dtype=torch.float64)
    theta = getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]  # transformers 4 / 5
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2).double() / head_dim))
    angles = positions[:, None] * inv_freq[None, :]
    dtype = model.lm_head.weight.dtype
    cos, sin = torch.cat([angles.cos()] * 2, -1).to(dtype), torch.cat([angles.sin()] * 2, -1).to(dtype)

    def rope(x_TC: torch.Tensor) -> torch.Tensor:
        half = head_dim // 2
        rotated = torch.cat([-x_TC[:, half:], x_TC[:, :half]], -1)
        return x_TC * cos + rotated * sin

    earlier: list[list[tuple[torch.Tensor, torch.Tensor]]] = []  # [layer][kv-head] -> (K, V) [B, T, d_head]
    for r, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        q = attn.q_proj(x).view(*x.shape[:2], heads, head_dim)
        k = attn.k_proj(x).view(*x.shape[:2], kv_heads, head_dim)
        v = attn.v_proj(x).view(*x.shape[:2], kv_heads, head_dim)
        earlier.append([(k[:, :, i], v[:, :, i]) for i in range(kv_heads)])
        mixed = []
        router = attn.router
        if router is not None:  # w[b, t, j, n]: the static mix, plus the per-token one if dynamic
            w = router.weight.expand(*x.shape[:2], *router.weight.shape)
            if router.dynamic is not None:
                scale = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + router.dynamic_norm.variance_epsilon)
                w = w + (router.dynamic.weight @ (router.dynamic_norm.weight * x * scale)[..., None])[
                    ..., 0
                ].view(w.shape)
        for j in range(kv_heads):
            if router is None:
                mixed.append(earlier[r][j])
                continue
            sources = [(m, i) for m in range(r + 1) for i in range(kv_heads)]
            key = sum(w[:, :, j, m * kv_heads + i, None] * earlier[m][i][0] for m, i in sources)
            value = sum(w[:, :, j, m * kv_heads + i, None] * earlier[m][i][1] for m, i in sources)
            mixed.append((key, value))
        outputs = []
        for h in range(heads):
            key, value = mixed[h // (heads // kv_heads)]
            out_b = []
            for b in range(ids_BT.shape[0]):
                scores = rope(q[b, :, h]) @ rope(key[b]).T / math.sqrt(head_dim)
                scores = scores.masked_fill(torch.ones(tokens, tokens).triu(1).bool(), float("-inf"))
                out_b.append(F.softmax(scores, -1) @ value[b])
            outputs.append(torch.stack(out_b))
        hidden = hidden + attn.o_proj(torch.cat(outputs, -1))
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return model.lm_head(model.model.norm(hidden))


@torch.no_grad()
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_random_routers_match_a_slow_per_head_reference(attention: str) -> None:
    model = _lime()
    model.config._attn_implementation = attention
    ids = _ids(tokens=9)
    assert torch.allclose(model(ids).logits, _reference_logits(model, ids), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("router", ["static", "dynamic"])
def test_every_gradient_equals_autograd_through_the_slow_reference(router: str) -> None:
    """The hand-written backward of the mix (gradients of the sources summed in place across layers) gives
    every parameter the gradient plain autograd gives through the per-head reference; a second backward
    through the retained graph gives the same again (the in-place sums start from zero each time)."""
    model = _lime(router).double().train()
    if router == "dynamic":
        for r in model.routers():
            torch.nn.init.normal_(r.dynamic.weight, std=0.1)
    ids = _ids(tokens=7)
    weights = torch.randn(
        2, 7, LLAMA.vocab_size, dtype=torch.double, generator=torch.Generator().manual_seed(0)
    )
    params = [p for _, p in model.named_parameters()]
    ours_loss = (model(ids).logits * weights).sum()
    ours = torch.autograd.grad(ours_loss, params, retain_graph=True, allow_unused=True)
    again = torch.autograd.grad(ours_loss, params, allow_unused=True)
    reference = torch.autograd.grad(
        (_reference_logits(model, ids) * weights).sum(), params, allow_unused=True
    )
    names = [n for n, _ in model.named_parameters()]
    for name, a, b, c in zip(names, ours, again, reference, strict=True):
        # relative to the gradient's norm (RoPE's angles are float32 inside the model, float64 here)
        assert a is not None and c is not None and (a - c).norm() <= 1e-6 * c.norm(), name
        assert torch.equal(a, b), name
    assert all(r.weight.grad is None for r in model.routers())  # autograd.grad leaves .grad alone


@pytest.mark.parametrize("router", ["static", "dynamic"])
def test_gradients_reach_every_router(router: str) -> None:
    model = _lime(router).train()
    if router == "dynamic":  # its per-token part starts at zero; give it a value so its input gradient flows
        for r in model.routers():
            torch.nn.init.normal_(r.dynamic.weight, std=0.1)
    ids = _ids()
    F.cross_entropy(model(ids).logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    for r in model.routers():
        assert r.weight.grad is not None and torch.isfinite(r.weight.grad).all()
        assert (r.weight.grad != 0).float().mean() > 0.9  # every source layer's block gets a gradient
        if router == "dynamic":
            assert r.dynamic.weight.grad.abs().sum() > 0


def test_dynamic_router_starts_as_the_static_one() -> None:
    static, dynamic = _lime("static"), _lime("dynamic")
    dynamic.load_state_dict(static.state_dict(), strict=False)
    ids = _ids()
    assert torch.allclose(dynamic(ids).logits, static(ids).logits, atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("router", ["static", "dynamic"])
def test_cached_decoding_equals_full_recomputation(router: str) -> None:
    model = _lime(router)
    if router == "dynamic":
        for r in model.routers():
            torch.nn.init.normal_(r.dynamic.weight, std=0.1)
    ids = _ids(tokens=14)
    full = model(ids).logits
    out = model(ids[:, :5], use_cache=True)
    cache, pieces = out.past_key_values, [out.logits]
    for t in range(5, 14):  # one token at a time, as generate does
        out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        pieces.append(out.logits)
    assert torch.allclose(torch.cat(pieces, 1), full, atol=1e-5)
    prompt = ids[:, :4]
    cached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True)
    uncached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    assert cached.shape == (2, 12) and torch.equal(cached, uncached)


@torch.no_grad()
def test_the_kv_cache_is_no_larger_than_llamas() -> None:
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LLAMA).eval()
    ids = _ids(tokens=10)

    def cache_bytes(model: torch.nn.Module) -> tuple[int, list[tuple[int, ...]]]:
        cache = model(ids, use_cache=True).past_key_values
        tensors = [t for layer in cache.layers for t in (layer.keys, layer.values)]
        return sum(t.numel() * t.element_size() for t in tensors), [tuple(t.shape) for t in tensors]

    lime_bytes, lime_shapes = cache_bytes(_lime())
    llama_bytes, llama_shapes = cache_bytes(llama)
    assert lime_bytes == llama_bytes and lime_shapes == llama_shapes
    assert lime_shapes[0] == (2, 2, 10, 8)  # [batch, kv-heads, tokens, d_head]


@torch.no_grad()
def test_padded_rows_equal_unpadded_ones() -> None:
    """The mix is per token: left padding in a batch changes nothing at the real positions."""
    model = _lime()
    short = _ids(batch=1, tokens=6, seed=3)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)], 1)
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    logits = model(padded, attention_mask=mask, position_ids=position_ids).logits[:, 3:]
    assert torch.allclose(logits, model(short).logits, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("router", ["static", "dynamic"])
def test_save_then_load_through_the_auto_classes(router: str, tmp_path: Path) -> None:
    model = _lime(router)
    ids = _ids()
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "lime"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is LimeForCausalLM and loaded.config.lime_router == router
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_config_keeps_llamas_fields_and_checks_its_own() -> None:
    config = LimeConfig(**LLAMA.to_dict())
    assert (config.hidden_size, config.num_key_value_heads, config.head_dim, config.lime_router) == (
        32,
        2,
        8,
        "static",
    )
    with pytest.raises(ValueError, match="lime_router must be one of static, dynamic"):
        LimeConfig(**LLAMA.to_dict(), lime_router="softmax")


@torch.no_grad()
def test_load_model_and_sites_work_on_a_lime_folder(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    model = _lime()
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(str(tiny_models["llama"])).save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.head == "causal_lm" and isinstance(loaded.model, LimeForCausalLM)
    sites = model_sites(loaded.model)
    assert sites["layers.2.attn"].module_path == "model.layers.2.self_attn"
    assert sites["layers.2.mlp"].module_path == "model.layers.2.mlp"
    wanted = resolve_sites(loaded.model, ["layers.1", "layers.2", "layers.2.attn", "layers.2.mlp"])
    with capture(loaded.model, wanted) as captured:
        loaded.model(_ids())
    total = captured["layers.1"] + captured["layers.2.attn"] + captured["layers.2.mlp"]
    assert torch.allclose(total, captured["layers.2"], atol=1e-5)


@torch.no_grad()
def test_denseformer_starts_as_llama_and_averages_every_earlier_output(tmp_path: Path) -> None:
    from interlayer.lime import DenseFormerConfig, DenseFormerForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LLAMA).eval()
    dense = DenseFormerForCausalLM(DenseFormerConfig(**LLAMA.to_dict())).eval()
    dense.load_state_dict(llama.state_dict(), strict=False)
    ids = _ids()
    assert torch.allclose(dense(ids).logits, llama(ids).logits, atol=1e-6, rtol=0)
    for average in dense.model.dwa:
        average.weight.normal_()
    # by hand: block i reads x'_i, and x'_{i+1} = Σ_j α_i[j] X_j over X_0 (embeddings) and the block outputs
    model = dense.model
    hidden = model.embed_tokens(ids)
    positions = torch.arange(ids.shape[1])[None]
    rotary = model.rotary_emb(hidden, positions)
    mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)[None, None]
    outputs = [hidden]
    for i, layer in enumerate(model.layers):
        # forward, not __call__: the block without the DenseFormer hooks under test
        outputs.append(
            layer.forward(hidden, attention_mask=mask, position_embeddings=rotary, position_ids=positions)
        )
        hidden = sum(w * x for w, x in zip(model.dwa[i].weight, outputs, strict=True))
    reference = dense.lm_head(model.norm(hidden))
    assert torch.allclose(dense(ids).logits, reference, atol=1e-5)
    out = dense(ids[:, :5], use_cache=True)
    step = dense(ids[:, 5:], past_key_values=out.past_key_values, use_cache=True).logits
    assert torch.allclose(step, reference[:, 5:], atol=1e-5)
    dense.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is DenseFormerForCausalLM and torch.equal(loaded(ids).logits, dense(ids).logits)


@pytest.mark.parametrize("router", ["static", "dynamic"])
def test_a_training_step_leaves_nothing_of_its_memory_behind(router: str) -> None:
    """The mix's graph nodes keep only buffers outside autograd: once the loss is gone nothing of a step's
    memory survives (a reference cycle through the graph leaked every step's buffers before: 24 GB in 300
    steps of the benchmark)."""
    import gc
    import weakref

    from interlayer.lime.modeling import LayerMemory, MixBuffers

    model = _lime(router).train()
    kept: list[weakref.ref] = []
    append = LayerMemory.append

    def spy(self: LayerMemory, kv: torch.Tensor) -> None:
        append(self, kv)
        kept.append(weakref.ref(self))
        assert isinstance(self.buffers, MixBuffers)
        kept.append(weakref.ref(self.buffers))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(LayerMemory, "append", spy)
        loss = model(_ids()).logits.square().mean()
        loss.backward()
    del loss
    gc.collect()
    assert kept and all(ref() is None for ref in kept)

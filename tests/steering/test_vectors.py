"""Steering vectors: exactness (zero vector, MLP-bias equivalence, cached and left-padded generation), gradient
flow, the low-rank form, save/load and the refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from interlayer.errors import UserError
from interlayer.models import load_model
from interlayer.sites import capture, resolve_sites
from interlayer.steering.vectors import SteeringVectors, VectorsMeta

FAMILIES = ("llama", "qwen2", "gemma2", "gpt2", "gpt_neox")


def _ids(seed: int = 0, batch: int = 2, tokens: int = 7) -> torch.Tensor:
    return torch.randint(1000, 3000, (batch, tokens), generator=torch.Generator().manual_seed(seed))


def _random_vectors(
    model: nn.Module, sites: str = "layers.*", seed: int = 1, scale: float = 0.5
) -> SteeringVectors:
    vectors = SteeringVectors.zeros(model, sites)
    with torch.no_grad():
        vectors.S.copy_(scale * torch.randn(vectors.S.shape, generator=torch.Generator().manual_seed(seed)))
    return vectors


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_vectors_change_nothing(tiny_models: dict[str, Path], family: str) -> None:
    lm = load_model(str(tiny_models[family]))
    ids = _ids()
    plain = lm.model(input_ids=ids).logits
    with SteeringVectors.zeros(lm.model, "layers.*").applied(lm.model):
        steered = lm.model(input_ids=ids).logits
    assert torch.equal(plain, steered)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "gpt_neox"])
def test_vector_equals_a_bias_on_the_mlp_down_projection(tiny_models: dict[str, Path], family: str) -> None:
    """In blocks that add the MLP output to the residual directly, s at layers.ℓ is a bias s on that layer's
    down projection (the official code's form)."""
    lm = load_model(str(tiny_models[family]))
    layer = 1
    vectors = _random_vectors(lm.model, f"layers.{layer}")
    ids = _ids(3)
    with vectors.applied(lm.model):
        steered = lm.model(input_ids=ids).logits
    block = resolve_sites(lm.model, f"layers.{layer}.mlp")[0]
    down = {"llama": "down_proj", "qwen2": "down_proj", "gpt2": "c_proj", "gpt_neox": "dense_4h_to_h"}[family]
    projection = lm.model.get_submodule(f"{block.module_path}.{down}")
    s_D = vectors.S[0].detach()
    if projection.bias is None:
        projection.bias = nn.Parameter(s_D.clone(), requires_grad=False)
    else:
        projection.bias.data += s_D
    biased = lm.model(input_ids=ids).logits
    torch.testing.assert_close(biased, steered, rtol=0, atol=1e-5)
    assert not torch.allclose(steered, load_model(str(tiny_models[family])).model(input_ids=ids).logits)


def test_the_vector_is_added_at_every_position_of_its_site(tiny_models: dict[str, Path]) -> None:
    lm = load_model(str(tiny_models["llama"]))
    vectors = _random_vectors(lm.model, "layers.0")
    ids = _ids()
    with capture(lm.model, resolve_sites(lm.model, "layers.0")) as plain:
        lm.model(input_ids=ids)
    # a capture hook registered after the vectors sees the steered value
    with vectors.applied(lm.model), capture(lm.model, resolve_sites(lm.model, "layers.0")) as steered:
        lm.model(input_ids=ids)
    torch.testing.assert_close(
        steered["layers.0"] - plain["layers.0"], vectors.S[0].detach().expand(2, 7, -1)
    )


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cached_generation_equals_uncached_with_vectors_on(tiny_models: dict[str, Path], family: str) -> None:
    lm = load_model(str(tiny_models[family]))
    vectors = _random_vectors(lm.model, scale=2.0)
    ids = _ids(5, batch=2, tokens=5)
    kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    with vectors.applied(lm.model):
        cached = lm.model.generate(input_ids=ids, use_cache=True, **kwargs)
        uncached = lm.model.generate(input_ids=ids, use_cache=False, **kwargs)
        # and both equal a greedy loop of full forward passes
        seq = ids
        for _ in range(8):
            nxt = lm.model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    plain = lm.model.generate(input_ids=ids, **kwargs)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, seq)
    assert not torch.equal(cached, plain)  # the vectors do change the continuation


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_left_padded_batch_generation_equals_one_prompt_at_a_time(
    tiny_models: dict[str, Path], family: str
) -> None:
    lm = load_model(str(tiny_models[family]))
    vectors = _random_vectors(lm.model, scale=2.0)
    short, long = _ids(6, 1, 3)[0], _ids(7, 1, 6)[0]
    batch = torch.zeros(2, 6, dtype=torch.long)
    mask = torch.zeros(2, 6, dtype=torch.long)
    batch[0, 3:], mask[0, 3:] = short, 1
    batch[1], mask[1] = long, 1
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with vectors.applied(lm.model):
        padded = lm.model.generate(input_ids=batch, attention_mask=mask, **kwargs)[:, 6:]
        alone = [lm.model.generate(input_ids=row[None], **kwargs)[0, len(row) :] for row in (short, long)]
    assert torch.equal(padded[0], alone[0])
    assert torch.equal(padded[1], alone[1])


def test_gradients_reach_only_the_vectors(tiny_models: dict[str, Path]) -> None:
    lm = load_model(str(tiny_models["llama"]))
    vectors = SteeringVectors.zeros(lm.model, "layers.*")
    with vectors.applied(lm.model):
        logits = lm.model(input_ids=_ids()).logits
    logits.logsumexp(-1).sum().backward()
    assert vectors.S.grad is not None and bool((vectors.S.grad.abs().sum(-1) > 0).all())
    assert all(p.grad is None for p in lm.model.parameters())


def test_lowrank_matrix_is_a_times_b_and_starts_at_zero(tiny_models: dict[str, Path]) -> None:
    lm = load_model(str(tiny_models["llama"]))
    vectors = SteeringVectors.zeros(lm.model, "layers.*", kind="lowrank", rank=2, seed=4)
    assert vectors.num_parameters() == 2 * (3 + 32)
    assert torch.equal(vectors.matrix(), torch.zeros(3, 32))
    with torch.no_grad():
        vectors.A.copy_(torch.randn(3, 2))
    torch.testing.assert_close(vectors.matrix(), vectors.A @ vectors.B)
    manual = [(vectors.A[i] @ vectors.B).detach() for i in range(3)]
    for i, row in enumerate(vectors.by_site().values()):
        torch.testing.assert_close(row, manual[i])


def test_save_load_gives_identical_outputs(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    lm = load_model(str(tiny_models["llama"]))
    for kind, rank in (("all", 0), ("lowrank", 2)):
        vectors = SteeringVectors.zeros(lm.model, "layers.*", kind=kind, rank=rank, model_name="tiny")
        with torch.no_grad():
            for p in vectors.parameters():
                p.copy_(torch.randn(p.shape))
        vectors.save(tmp_path / kind)
        loaded = SteeringVectors.load(tmp_path / kind, lm.model)
        assert loaded.meta == vectors.meta
        ids = _ids()
        with vectors.applied(lm.model):
            a = lm.model(input_ids=ids).logits
        with loaded.applied(lm.model):
            b = lm.model(input_ids=ids).logits
        assert torch.equal(a, b)


def test_handle_and_context_always_restore_the_model(tiny_models: dict[str, Path]) -> None:
    lm = load_model(str(tiny_models["llama"]))
    ids = _ids()
    plain = lm.model(input_ids=ids).logits
    vectors = _random_vectors(lm.model)
    handle = vectors.attach(lm.model)
    assert not torch.equal(lm.model(input_ids=ids).logits, plain)
    handle.remove()
    handle.remove()  # idempotent
    assert torch.equal(lm.model(input_ids=ids).logits, plain)
    with pytest.raises(RuntimeError, match="boom"), vectors.applied(lm.model):
        raise RuntimeError("boom")
    assert torch.equal(lm.model(input_ids=ids).logits, plain)


def test_vectors_for_another_width_or_depth_are_refused(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    lm = load_model(str(tiny_models["llama"]))
    for d, n, needle in ((64, 3, "width 64"), (32, 5, "5 layers")):
        meta = VectorsMeta("all", ("layers.0",), d, n, "other")
        SteeringVectors(meta).save(tmp_path / f"{d}-{n}")
        with pytest.raises(UserError, match=needle):
            SteeringVectors.load(tmp_path / f"{d}-{n}", lm.model)
    with pytest.raises(UserError, match="unknown site 'layers.9'.*valid sites: embed, layers.0"):
        SteeringVectors.zeros(lm.model, "layers.9")
    meta = VectorsMeta("all", ("layers.7",), 32, 3, "x")
    with pytest.raises(UserError, match="unknown site 'layers.7'"), SteeringVectors(meta).applied(lm.model):
        pass


def test_a_tampered_vector_file_is_refused(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    from interlayer import atomic

    lm = load_model(str(tiny_models["llama"]))
    SteeringVectors.zeros(lm.model).save(tmp_path)
    atomic.write_tensors(tmp_path / "vectors.safetensors", {"S": torch.zeros(2, 32)})
    with pytest.raises(UserError, match=r"holds tensors \{'S': \(2, 32\)\}"):
        SteeringVectors.load(tmp_path)

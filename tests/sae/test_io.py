"""The SAE folder format: exact round trips, the cfg.json contract, and clear errors for bad folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from interlayer.errors import UserError
from interlayer.sae.architectures import build_sae, config_from_json, make_config
from interlayer.sae.batchtopk import BatchTopKSAE
from interlayer.sae.config import FORMAT_VERSION
from interlayer.sae.io import CFG_FILE, WEIGHTS_FILE, folded_copy, load_sae, save_sae
from interlayer.sae.topk import TopKConfig, TopKSAE

D, F, K = 10, 24, 3


def random_sae(architecture: str, seed: int = 0, **cfg_kw) -> TopKSAE | BatchTopKSAE:
    cfg = make_config(architecture, d_in=D, latents=F, k=K, site="layers.2", model="zoo:tiny", **cfg_kw)
    sae = build_sae(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in sae.parameters():
            param.copy_(torch.randn(param.shape, generator=g))
        if isinstance(sae, BatchTopKSAE):
            sae.threshold.fill_(0.375)
    return sae  # type: ignore[return-value]


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_round_trip_is_exact(tmp_path: Path, architecture: str) -> None:
    sae = random_sae(architecture)
    save_sae(sae, tmp_path / "sae")
    loaded = load_sae(tmp_path / "sae")
    assert type(loaded) is type(sae)
    assert loaded.cfg == sae.cfg
    want, got = sae.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    if architecture == "batchtopk":
        assert float(got["threshold"]) == 0.375
    x = torch.randn(7, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(x), sae(x))
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    # the file holds exactly the documented tensor names
    names = set(load_file(str(tmp_path / "sae" / WEIGHTS_FILE)))
    assert names == {"W_enc", "b_enc", "W_dec", "b_dec"} | (
        {"threshold"} if architecture == "batchtopk" else set()
    )


def test_cfg_json_fields(tmp_path: Path) -> None:
    sae = random_sae("batchtopk", normalisation="mean_squared_norm", input_scale=2.5)
    save_sae(sae, tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / CFG_FILE).read_text())
    for field in ("architecture", "d_in", "latents", "k", "site", "model", "normalisation", "version"):
        assert field in cfg, field
    assert cfg["architecture"] == "batchtopk"
    assert (cfg["d_in"], cfg["latents"], cfg["k"]) == (D, F, K)
    assert (cfg["site"], cfg["model"]) == ("layers.2", "zoo:tiny")
    assert cfg["normalisation"] == "mean_squared_norm"
    assert cfg["version"] == FORMAT_VERSION
    assert config_from_json(cfg) == sae.cfg


def test_wrong_shape_names_file_and_dimension(tmp_path: Path) -> None:
    folder = save_sae(random_sae("topk"), tmp_path / "sae")
    weights = folder / WEIGHTS_FILE
    tensors = load_file(str(weights))
    tensors["W_dec"] = torch.zeros(F, D + 1)
    save_file(tensors, str(weights))
    with pytest.raises(UserError) as info:
        load_sae(folder)
    message = str(info.value)
    assert str(weights) in message
    assert "W_dec" in message and "dimension 1" in message
    # a tensor with the wrong number of dimensions is also a UserError, not an IndexError
    tensors["W_dec"] = torch.zeros(F, D)
    tensors["b_enc"] = torch.zeros(F, 1)
    save_file(tensors, str(weights))
    with pytest.raises(UserError, match="dimension"):
        load_sae(folder)
    tensors["b_enc"] = torch.zeros(())
    save_file(tensors, str(weights))
    with pytest.raises(UserError, match="dimension 0"):
        load_sae(folder)


def test_missing_tensor_is_user_error(tmp_path: Path) -> None:
    folder = save_sae(random_sae("batchtopk"), tmp_path / "sae")
    tensors = load_file(str(folder / WEIGHTS_FILE))
    del tensors["threshold"]
    save_file(tensors, str(folder / WEIGHTS_FILE))
    with pytest.raises(UserError, match="threshold"):
        load_sae(folder)


def test_missing_files_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        load_sae(tmp_path / "nothing-here")
    folder = save_sae(random_sae("topk"), tmp_path / "sae")
    (folder / WEIGHTS_FILE).unlink()
    with pytest.raises(UserError) as info:
        load_sae(folder)
    assert str(folder / WEIGHTS_FILE) in str(info.value)
    (folder / WEIGHTS_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="safetensors"):
        load_sae(folder)
    (folder / CFG_FILE).write_text("{not json")
    with pytest.raises(UserError, match="JSON"):
        load_sae(folder)


def test_config_validation() -> None:
    with pytest.raises(UserError, match="k"):
        TopKConfig(d_in=4, latents=8, k=9)
    TopKConfig(d_in=4, latents=8, k=8)  # k == latents is allowed
    with pytest.raises(UserError, match="unknown architecture 'gated'"):
        make_config("gated", d_in=4, latents=8, k=2)
    with pytest.raises(UserError, match="d_in"):
        TopKConfig(d_in=0, latents=8, k=2)
    with pytest.raises(UserError, match="normalisation"):
        TopKConfig(d_in=4, latents=8, k=2, normalisation="layernorm")
    with pytest.raises(UserError, match="input_scale"):
        TopKConfig(d_in=4, latents=8, k=2, input_scale=0.0)


def test_from_json_missing_fields_and_newer_version() -> None:
    with pytest.raises(UserError) as info:
        config_from_json({"d_in": 4, "architecture": "topk"}, source="x/cfg.json")
    assert "x/cfg.json" in str(info.value) and "k" in str(info.value) and "latents" in str(info.value)
    with pytest.raises(UserError, match="version"):
        config_from_json({"d_in": 4, "latents": 8, "k": 2, "version": FORMAT_VERSION + 1})
    # unknown fields (from a newer writer of the same version) are ignored
    cfg = config_from_json({"d_in": 4, "latents": 8, "k": 2, "future_field": 1})
    assert cfg == TopKConfig(d_in=4, latents=8, k=2)


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_folded_copy_reads_raw_activations(architecture: str) -> None:
    c = 0.37
    sae = random_sae(architecture, seed=2, normalisation="mean_squared_norm", input_scale=c)
    folded = folded_copy(sae)
    assert folded is not sae and folded.cfg == sae.cfg
    x = torch.randn(25, D, generator=torch.Generator().manual_seed(3), dtype=torch.float32) * 4
    with torch.no_grad():
        torch.testing.assert_close(folded(x), sae(c * x) / c, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(folded.encode(x), sae.encode(c * x), rtol=1e-5, atol=1e-5)
    # the original is untouched
    assert torch.equal(sae.W_enc_FD, random_sae(architecture, seed=2).W_enc_FD)


def test_cfg_json_field_of_the_wrong_type_is_one_line() -> None:
    with pytest.raises(UserError, match="x/cfg.json: a field has the wrong type"):
        config_from_json(
            {"d_in": 4, "latents": 8, "k": 2, "architecture": "matryoshka", "prefixes": 5}, "x/cfg.json"
        )


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_folders_written_by_interlayer_0_1_load_with_the_same_outputs(architecture: str) -> None:
    """tests/fixtures/format1 was written by interlayer 0.1 itself (tests/fixtures/make_format1.py)."""
    fixtures = Path(__file__).resolve().parents[1] / "fixtures" / "format1"
    assert json.loads((fixtures / architecture / CFG_FILE).read_text())["version"] == 1
    want = load_file(str(fixtures / "outputs.safetensors"))
    sae = load_sae(fixtures / architecture)
    assert sae.cfg.architecture == architecture and sae.cfg.k == 3
    with torch.no_grad():
        torch.testing.assert_close(sae(want["x"]), want[f"{architecture}.x_hat"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(sae.encode(want["x"]), want[f"{architecture}.z"], rtol=1e-6, atol=1e-6)

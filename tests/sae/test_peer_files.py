"""SAEs the peers wrote with their own save functions (tests/fixtures/peers, made by make_peer_saes.py),
with the outputs the peers computed from those files: our readers reproduce them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import peer
from safetensors.torch import load_file

from interlayer.errors import UserError
from interlayer.sae import load_sae
from interlayer.sae.io import load_saes

PEERS = Path(__file__).resolve().parents[1] / "fixtures" / "peers"
READ = {
    # folder: (architecture read as, site, source_site)
    "saelens_standard": ("relu", "layers.2", "blocks.2.hook_resid_post"),
    "saelens_standard_nob": ("relu", None, None),
    "saelens_topk": ("topk", "layers.1.mlp", "blocks.1.hook_mlp_out"),
    "saelens_topk_rescale": ("topk", None, None),
    "saelens_jumprelu": ("jumprelu", "layers.0.attn", "blocks.0.hook_attn_out"),
    "saelens_batchtopk": ("jumprelu", None, None),  # SAELens saves BatchTopK for inference as JumpReLU
    "saelens_matryoshka": ("jumprelu", None, None),
    "saelens_norm": ("relu", None, None),
    "sparsify_single": ("topk", None, None),
    "gemmascope": ("jumprelu", "", ""),  # a local folder: no hub path to name the layer
    "dictlearn_standard": ("relu", "layers.2", "resid_post_layer_2"),
    "dictlearn_standard_april": ("relu", "layers.2", "resid_post_layer_2"),
    "dictlearn_topk": ("topk", "layers.2", "resid_post_layer_2"),
    "dictlearn_batchtopk": ("batchtopk", "layers.2", "resid_post_layer_2"),
    "dictlearn_matryoshka": ("matryoshka", "layers.2", "resid_post_layer_2"),
    "dictlearn_jumprelu": ("jumprelu", "layers.2", "resid_post_layer_2"),
}


def expected(name: str) -> dict[str, torch.Tensor]:
    return load_file(str(PEERS / f"{name}.expected.safetensors"))


@pytest.mark.parametrize("name", list(READ))
def test_reader_reproduces_the_peer_outputs(name: str) -> None:
    want = expected(name)
    sae = load_sae(PEERS / name)
    x = want["x"]
    assert x.dim() == 3, "the fixtures use a leading shape of two dimensions"
    # saelens_norm is a training checkpoint with its stored input scale s: read as SAELens's training
    # computes it (encode(s·x), decode / s), which its end-of-training fold also gives
    latents, recon = ("latents_scaled", "recon_scaled") if name == "saelens_norm" else ("latents", "recon")
    torch.testing.assert_close(sae.encode(x), want[latents], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae(x), want[recon], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.reconstruct(x)[0], want[recon], rtol=1e-5, atol=1e-5)
    if name == "saelens_norm":
        assert not torch.allclose(want["latents"], want["latents_scaled"]), "the scale must matter"
    fired = int((want[latents] != 0).sum())
    assert 0 < fired < want[latents].numel(), "the fixture must have latents on and off"
    architecture, site, source_site = READ[name]
    if architecture is not None:
        assert sae.cfg.architecture == architecture
    if site is not None:
        assert (sae.cfg.site, sae.cfg.source_site) == (site, source_site)


def test_sparsify_run_folder_is_one_sae_per_hookpoint() -> None:
    saes = load_saes(PEERS / "sparsify_run")
    assert sorted(saes) == ["layers.0", "layers.1.mlp"]
    for site, sae in saes.items():
        want = expected(f"sparsify_run.{site}")
        torch.testing.assert_close(sae.encode(want["x"]), want["latents"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae(want["x"]), want["recon"], rtol=1e-5, atol=1e-5)
        assert sae.cfg.source_format == "sparsify" and sae.cfg.source_site == site
    with pytest.raises(UserError, match="holds 2 SAEs"):
        load_sae(PEERS / "sparsify_run")


@pytest.mark.parametrize(
    ("name", "needle"),
    [
        ("saelens_gated", "SAELens architecture 'gated' is not one interlayer reads"),
        ("sparsify_skip", "has a skip connection"),
        ("sparsify_transcode", "is a transcoder"),
        ("gemmascope_missing", "lacks the array(s) threshold"),
        ("gemmascope_object", "holds object arrays"),
        ("dictlearn_pickled", "holds more than tensors"),
    ],
)
def test_what_the_peers_wrote_and_we_refuse(name: str, needle: str) -> None:
    with pytest.raises(UserError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        load_sae(PEERS / name)


def test_a_pre_6_saelens_topk_config_is_topk_as_saelens_reads_it(tmp_path: Path) -> None:
    """SAELens < 6 wrote ``architecture: standard`` with ``activation_fn_str: topk``; SAELens reads a TopK SAE."""
    import json
    import shutil

    folder = tmp_path / "old"
    shutil.copytree(PEERS / "saelens_topk", folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    old = {
        "d_in": cfg["d_in"],
        "d_sae": cfg["d_sae"],
        "dtype": "float32",
        "architecture": "standard",
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": cfg["k"]},
        "hook_point": "blocks.1.hook_mlp_out",
        "model_name": "gpt2",
        "apply_b_dec_to_input": True,
        "normalize_activations": False,
    }
    (folder / "cfg.json").write_text(json.dumps(old))
    sae = load_sae(folder)
    want = expected("saelens_topk")
    assert sae.cfg.architecture == "topk" and sae.cfg.site == "layers.1.mlp"
    torch.testing.assert_close(sae(want["x"]), want["recon"], rtol=1e-5, atol=1e-5)


def test_gemma_scope_exported_to_saelens_is_the_same_function_for_saelens(tmp_path: Path) -> None:
    """Import, then export: the b_enc fold and the threshold survive into a file SAELens itself computes from."""
    from interlayer.sae.formats import write_as

    SAE = peer("sae_lens").SAE
    write_as(load_sae(PEERS / "gemmascope"), "saelens", tmp_path / "sl")
    want = expected("gemmascope")
    theirs = SAE.load_from_disk(tmp_path / "sl")
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(want["x"]), want["latents"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs(want["x"]), want["recon"], rtol=1e-5, atol=1e-5)

"""SAEs the peers wrote with their own save functions (tests/fixtures/peers, made by make_peer_saes.py),
with the outputs the peers computed from those files: our readers reproduce them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
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
    "saelens_batchtopk": (None, None, None),
    "saelens_matryoshka": (None, None, None),
    "saelens_norm": ("relu", None, None),
    "sparsify_single": ("topk", None, None),
    "gemmascope": ("jumprelu", None, None),
    "dictlearn_standard": ("relu", None, None),
    "dictlearn_standard_april": ("relu", None, None),
    "dictlearn_topk": ("topk", None, None),
    "dictlearn_batchtopk": ("batchtopk", None, None),
    "dictlearn_matryoshka": ("matryoshka", None, None),
    "dictlearn_jumprelu": ("jumprelu", None, None),
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

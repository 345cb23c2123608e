"""Other libraries' SAE formats: what we write, the peers load (with their own code) and compute the same
codes and reconstruction from; what the peers wrote, we read (tests/sae/test_peer_files.py); bad files are
one line and exit code 2."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import peer

from interlayer.errors import UserError
from interlayer.sae import build_sae, load_sae, make_config, save_sae
from interlayer.sae.formats import hooks, write_as
from interlayer.sae.formats.hub import SAE_FILES, parse_hub_path
from interlayer.sae.io import load_saes

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_cli import TEXT, assert_user_error, run_cli  # noqa: E402

D, F = 8, 32
OPTIONS = {
    "relu": {},
    "topk": {"k": 4},
    "hierarchical": {"k": 5},
    "jumprelu": {},
    "batchtopk": {"k": 4},
    "matryoshka": {"k": 4, "prefixes": (8, 32)},
    "kron": {"k": 4, "heads": 4, "m": 2, "n": 4},
}


def random_sae(architecture: str, seed: int = 0, site: str = "layers.2"):
    """An SAE with every parameter random (thresholds positive, so both sides of each threshold occur)."""
    sae = build_sae(
        make_config(architecture, d_in=D, latents=F, site=site, model="m", **OPTIONS[architecture])
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sae.named_parameters():
            param.copy_(torch.randn(param.shape, generator=g) * 0.5)
            if name == "log_threshold_F":
                param.copy_(torch.log(torch.rand(param.shape, generator=g) * 0.4 + 0.05))
        if hasattr(sae, "threshold") and sae.threshold.dim() == 0:
            sae.threshold.fill_(0.15)
    return sae.eval()


def inputs(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, D, generator=torch.Generator().manual_seed(seed))


# ---- export: the peers load what we write ----------------------------------------------------------------
@pytest.mark.parametrize(
    "architecture", ["relu", "topk", "hierarchical", "jumprelu", "batchtopk", "matryoshka"]
)
def test_saelens_loads_our_export_and_computes_the_same(architecture: str, tmp_path: Path) -> None:
    SAE = peer("sae_lens").SAE
    sae = random_sae(architecture)
    write_as(sae, "saelens", tmp_path / "out")
    theirs = SAE.load_from_disk(tmp_path / "out")
    x = inputs()
    with torch.no_grad():
        z = theirs.encode(x)
        torch.testing.assert_close(z, sae.encode(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(theirs(x), sae(x), rtol=1e-5, atol=1e-5)
    assert 0 < int((z != 0).sum()) < z.numel(), "the inputs must make some latents fire and some not"
    assert theirs.cfg.metadata.hook_name == "blocks.2.hook_resid_post"
    back = load_sae(tmp_path / "out")  # and the folder reads back as the same function
    torch.testing.assert_close(back(x), sae(x), rtol=1e-6, atol=1e-6)
    assert back.cfg.site == "layers.2" and back.cfg.source_format == "saelens"


@pytest.mark.parametrize("architecture", ["topk", "hierarchical"])
def test_sparsify_loads_our_export_and_computes_the_same(architecture: str, tmp_path: Path) -> None:
    SparseCoder = peer("sparsify").SparseCoder
    sae = random_sae(architecture)
    write_as(sae, "sparsify", tmp_path / "layers.2")
    theirs = SparseCoder.load_from_disk(tmp_path / "layers.2")
    x = inputs().reshape(-1, D)
    with torch.no_grad():
        out = theirs.encode(x)
        z = torch.zeros(x.shape[0], F).scatter_(1, out.top_indices, out.top_acts)
        torch.testing.assert_close(z, sae.encode(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(theirs.decode(out.top_acts, out.top_indices), sae(x), rtol=1e-5, atol=1e-5)
    assert load_sae(tmp_path / "layers.2").cfg.site == "layers.2"


def test_export_cli_writes_a_run_as_one_folder_per_hook_point(tmp_path: Path, capsys) -> None:
    for site, seed in (("layers.0", 0), ("layers.1.mlp", 1)):
        save_sae(random_sae("topk", seed, site), tmp_path / "run" / site)
    code, _out, err = run_cli(
        ["sae", "export", str(tmp_path / "run"), "--to", "saelens", "--out", str(tmp_path / "sl")], capsys
    )
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "sl").iterdir()) == [
        "blocks.0.hook_resid_post",
        "blocks.1.hook_mlp_out",
    ]
    code, _out, err = run_cli(
        ["sae", "export", str(tmp_path / "run"), "--to", "sparsify", "--out", str(tmp_path / "sp")], capsys
    )
    assert code == 0, err
    got = load_saes(tmp_path / "sp")
    x = inputs()
    for site, seed in (("layers.0", 0), ("layers.1.mlp", 1)):
        torch.testing.assert_close(got[site](x), random_sae("topk", seed, site)(x), rtol=1e-6, atol=1e-6)


def test_export_refuses_a_boosted_sae_and_a_folder_in_use(tmp_path: Path, capsys) -> None:
    from interlayer.sae.boosted import boost_config

    base = random_sae("topk")
    save_sae(base, tmp_path / "base")
    boosted = build_sae(boost_config(base, tmp_path / "base", 8, 2, "stdlib:code"))
    boosted.initialise_(torch.Generator().manual_seed(0))
    save_sae(boosted, tmp_path / "boosted")
    result = run_cli(
        ["sae", "export", str(tmp_path / "boosted"), "--to", "saelens", "--out", str(tmp_path / "o")], capsys
    )
    assert_user_error(result, "a boosted SAE cannot be written as a SAELens SAE", "export its base")
    result = run_cli(
        ["sae", "export", str(tmp_path / "base"), "--to", "saelens", "--out", str(tmp_path / "boosted")],
        capsys,
    )
    assert_user_error(result, "is not empty; choose a new folder")
    assert load_sae(tmp_path / "boosted").cfg.architecture == "boosted", "the folder is untouched"
    (tmp_path / "base" / "other.npz").write_bytes(b"")
    with pytest.raises(UserError, match="is a file; pass the SAE's folder"):
        load_sae(tmp_path / "base" / "other.npz")


@pytest.mark.parametrize(
    ("architecture", "to", "needle"),
    [
        ("kron", "saelens", "a kron SAE cannot be written as a SAELens SAE"),
        ("jumprelu", "sparsify", "a jumprelu SAE cannot be written as a sparsify SAE"),
        ("topk", "dictionary_learning", "--to must be one of saelens, sparsify"),
    ],
)
def test_export_refuses_what_the_format_cannot_express(
    architecture, to, needle, tmp_path: Path, capsys
) -> None:
    save_sae(random_sae(architecture), tmp_path / "sae")
    result = run_cli(
        ["sae", "export", str(tmp_path / "sae"), "--to", to, "--out", str(tmp_path / "out")], capsys
    )
    assert_user_error(result, needle)
    assert not (tmp_path / "out").exists(), "nothing may be written"


# ---- hook names ------------------------------------------------------------------------------------------
def test_hook_names_map_to_sites_and_back() -> None:
    table = {
        "blocks.3.hook_resid_post": "layers.3",
        "blocks.11.hook_mlp_out": "layers.11.mlp",
        "blocks.0.hook_attn_out": "layers.0.attn",
    }
    for hook, site in table.items():
        assert hooks.site_from_saelens(hook) == site
        assert hooks.saelens_hook(site) == hook
    modules = {
        "layers.4": "layers.4",
        "layers.4.mlp": "layers.4.mlp",
        "model.layers.4.self_attn": "layers.4.attn",
        "h.2": "layers.2",
        "h.2.attn": "layers.2.attn",
        "gpt_neox.layers.7.mlp": "layers.7.mlp",
    }
    for hookpoint, site in modules.items():
        assert hooks.site_from_module(hookpoint) == site
    assert hooks.site_from_saelens("blocks.8.hook_resid_pre") == "layers.7"  # block 7's output
    with pytest.warns(UserWarning, match="'blocks.0.hook_resid_pre' has no interlayer site"):
        assert hooks.site_from_saelens("blocks.0.hook_resid_pre") == "blocks.0.hook_resid_pre"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert hooks.site_from_saelens("") == ""  # no name: nothing to warn about


# ---- Gemma Scope: the fold of b_dec into b_enc is exact --------------------------------------------------
def gemma_arrays(seed: int = 0, d: int = D, f: int = F) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "W_enc": rng.normal(size=(d, f)).astype(np.float32) * 0.5,
        "W_dec": rng.normal(size=(f, d)).astype(np.float32) * 0.5,
        "b_enc": rng.normal(size=f).astype(np.float32) * 0.5,
        "b_dec": rng.normal(size=d).astype(np.float32) * 2.0,  # large, so forgetting the fold shows
        "threshold": rng.uniform(0.05, 0.5, size=f).astype(np.float32),
    }


def test_gemmascope_equals_its_formula_with_no_b_dec_subtraction(tmp_path: Path) -> None:
    arrays = gemma_arrays()
    (tmp_path / "g").mkdir()
    np.savez(tmp_path / "g" / "params.npz", **arrays)
    sae = load_sae(tmp_path / "g")
    x = inputs().double().numpy()
    pre = x @ arrays["W_enc"].astype(np.float64) + arrays["b_enc"]
    z = np.maximum(pre, 0) * (pre > arrays["threshold"])
    x_hat = z @ arrays["W_dec"].astype(np.float64) + arrays["b_dec"]
    xt = torch.from_numpy(x).float()
    torch.testing.assert_close(sae.encode(xt).double(), torch.from_numpy(z), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae(xt).double(), torch.from_numpy(x_hat), rtol=1e-5, atol=1e-5)
    assert 0 < (z != 0).sum() < z.size
    assert sae.cfg.architecture == "jumprelu" and sae.cfg.source_format == "gemmascope"


# ---- the hub ---------------------------------------------------------------------------------------------
def test_hub_path_downloads_only_that_folder_and_reads_it(tmp_path: Path, monkeypatch) -> None:
    """hf:// goes through huggingface_hub.snapshot_download (replaced here by a local folder laid out like
    the hub repository: no network) and then through the same readers."""
    import huggingface_hub

    repo = tmp_path / "google--gemma-scope-2b-pt-res"
    inner = "layer_3/width_16k/average_l0_10"
    (repo / inner).mkdir(parents=True)
    np.savez(repo / inner / "params.npz", **gemma_arrays())
    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        calls.append((repo_id, revision, allow_patterns))
        return str(repo)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    sae = load_sae(f"hf://google/gemma-scope-2b-pt-res@main/{inner}")
    # only the SAE files there and one folder down: never the whole repository or every width and L0 below
    assert calls == [
        (
            "google/gemma-scope-2b-pt-res",
            "main",
            [f"{inner}/{name}" for name in SAE_FILES] + [f"{inner}/*/{name}" for name in SAE_FILES],
        )
    ]
    assert sae.cfg.site == "layers.3" and sae.cfg.source_site == "res layer 3"
    torch.testing.assert_close(sae(inputs()), load_sae(repo / inner)(inputs()), rtol=0, atol=0)
    with pytest.raises(UserError, match="has nothing at 'layer_9'"):
        load_sae("hf://google/gemma-scope-2b-pt-res/layer_9")
    assert parse_hub_path("hf://a/b@v2/c/d") == ("a/b", "v2", "c/d")
    with pytest.raises(UserError, match="names a whole repository"):
        parse_hub_path("hf://a/b")
    with pytest.raises(UserError, match="may not contain '..'"):
        parse_hub_path("hf://a/b/../../etc")
    with pytest.raises(UserError, match="not a hub path"):
        parse_hub_path("hf://just-one-part")
    from huggingface_hub.errors import HFValidationError

    def invalid(repo_id, **kwargs):
        raise HFValidationError(f"Repo id must use alphanumeric chars: {repo_id!r}")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", invalid)
    with pytest.raises(UserError, match="could not fetch hf://own er/repo/x from the Hugging Face hub"):
        load_sae("hf://own er/repo/x")


# ---- bad files: one line, exit code 2 --------------------------------------------------------------------
def _load_via_export(path: Path, capsys) -> tuple[int, str, str]:
    """``interlayer sae export PATH``: it reads PATH first, so a bad file is that command's one-line error."""
    return run_cli(
        ["sae", "export", str(path), "--to", "saelens", "--out", str(path.parent / "never")], capsys
    )


def test_gemmascope_missing_array_and_object_array(tmp_path: Path, capsys) -> None:
    arrays = gemma_arrays()
    (tmp_path / "missing").mkdir()
    np.savez(tmp_path / "missing" / "params.npz", **{k: v for k, v in arrays.items() if k != "threshold"})
    assert_user_error(
        _load_via_export(tmp_path / "missing", capsys), "params.npz lacks the array(s) threshold"
    )
    (tmp_path / "objects").mkdir()
    objects = arrays | {"threshold": np.array([{"a": 1}] * F, dtype=object)}
    np.savez(tmp_path / "objects" / "params.npz", **objects)
    assert_user_error(
        _load_via_export(tmp_path / "objects", capsys), "holds object arrays", "never unpickles"
    )
    (tmp_path / "shape").mkdir()
    np.savez(tmp_path / "shape" / "params.npz", **(arrays | {"b_dec": np.zeros(D + 1, np.float32)}))
    assert_user_error(
        _load_via_export(tmp_path / "shape", capsys),
        "params.npz: tensor 'b_dec' has shape (9,)",
        "dimension 0",
    )
    (tmp_path / "text").mkdir()
    np.savez(tmp_path / "text" / "params.npz", **(arrays | {"b_enc": np.array(["a"] * F)}))
    assert_user_error(
        _load_via_export(tmp_path / "text", capsys), "array 'b_enc' has dtype <U1, not a number type"
    )
    (tmp_path / "notzip").mkdir()
    (tmp_path / "notzip" / "params.npz").write_bytes(b"not a zip")
    assert_user_error(
        _load_via_export(tmp_path / "notzip", capsys), "is not a readable .npz file (not a zip archive)"
    )


def test_saelens_refusals(tmp_path: Path, capsys) -> None:
    sae = random_sae("relu")
    write_as(sae, "saelens", tmp_path / "ok")
    for name, change, needle in [
        ("gated", {"architecture": "gated"}, "SAELens architecture 'gated' is not one interlayer reads"),
        (
            "norm",
            {"normalize_activations": "constant_norm_rescale"},
            "rescales each input by its own statistics",
        ),
        (
            "width",
            {"d_sae": F + 1},
            "sae_weights.safetensors: tensor 'W_enc' has shape (8, 32) but the config implies (8, 33)",
        ),
    ]:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "sae_weights.safetensors").write_bytes(
            (tmp_path / "ok" / "sae_weights.safetensors").read_bytes()
        )
        cfg = json.loads((tmp_path / "ok" / "cfg.json").read_text()) | change
        (folder / "cfg.json").write_text(json.dumps(cfg))
        assert_user_error(_load_via_export(folder, capsys), needle)


def test_sparsify_refusals(tmp_path: Path, capsys) -> None:
    write_as(random_sae("topk"), "sparsify", tmp_path / "ok")
    for name, change, needle in [
        ("transcode", {"transcode": True}, "is a transcoder"),
        ("skip", {"skip_connection": True}, "has a skip connection"),
        ("groupmax", {"activation": "groupmax"}, "sparsify activation 'groupmax'"),
    ]:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "sae.safetensors").write_bytes((tmp_path / "ok" / "sae.safetensors").read_bytes())
        cfg = json.loads((tmp_path / "ok" / "cfg.json").read_text()) | change
        (folder / "cfg.json").write_text(json.dumps(cfg))
        assert_user_error(_load_via_export(folder, capsys), needle)


def test_ae_pt_with_pickled_objects_is_refused_unread(tmp_path: Path, capsys) -> None:
    (tmp_path / "dl").mkdir()
    torch.save({"encoder.weight": torch.zeros(F, D), "note": Path("/etc")}, tmp_path / "dl" / "ae.pt")
    assert_user_error(
        _load_via_export(tmp_path / "dl", capsys), "ae.pt holds more than tensors", "weights_only=True"
    )


def test_nothing_there_is_one_line(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    assert_user_error(_load_via_export(tmp_path / "empty", capsys), "no SAE found at")


def test_eval_site_places_an_sae_whose_hook_has_no_site(tiny_models, tmp_path: Path, capsys) -> None:
    """A SAELens SAE on ``hook_z`` gets no interlayer site; ``sae eval --site`` says where it reads."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(8):
        (corpus / f"doc{i}.txt").write_text(f"Document {i}. " + TEXT * 3)
    sae = build_sae(make_config("relu", d_in=32, latents=16, site="layers.1"))
    sae.initialise_(torch.Generator().manual_seed(0))
    write_as(sae, "saelens", tmp_path / "sl")
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    cfg["metadata"]["hook_name"] = "blocks.1.attn.hook_z"
    (tmp_path / "sl" / "cfg.json").write_text(json.dumps(cfg))
    args = ["sae", "eval", "--sae", str(tmp_path / "sl"), "--model", str(tiny_models["llama"])]
    args += ["--data", str(corpus), "--tokens", "50", "--context-len", "32", "--json"]
    assert_user_error(run_cli(args, capsys), "blocks.1.attn.hook_z")  # an unknown site, with the valid ones
    code, out, err = run_cli([*args, "--site", "layers.1"], capsys)
    assert code == 0, err
    metrics = json.loads(out.strip().splitlines()[-1])["sites"]["layers.1"]
    assert metrics["tokens"] >= 50 and 0 < metrics["l0"] <= 16

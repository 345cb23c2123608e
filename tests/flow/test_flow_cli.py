"""``interlayer flow match`` and ``flow graph`` end to end on SAEs of a tiny model: outputs, resume, errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from interlayer.flow.match import FeatureMatch
from interlayer.sae import JumpReLUConfig, JumpReLUSAE, TopKConfig, TopKSAE, load_sae, save_sae

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_cli import assert_user_error, run_cli  # noqa: E402


def write_run(folder: Path, model: Path, width: int, latents: int = 48, sites: tuple[str, ...] = ()) -> Path:
    """A run folder of TopK SAEs at the tiny model's residual and module sites of layers 0..2; the SAE at
    layers.1 is layers.0's permuted (so the pair has a known answer)."""
    sites = sites or ("layers.0", "layers.1", "layers.2", "layers.1.mlp", "layers.2.mlp", "layers.1.attn")
    for i, site in enumerate(sites):
        sae = TopKSAE(TopKConfig(d_in=width, latents=latents, k=4, site=site, model=str(model)))
        sae.initialise_(torch.Generator().manual_seed(i))
        save_sae(sae, folder / site)
    a, b = load_sae(folder / "layers.0"), load_sae(folder / "layers.1")
    perm = torch.randperm(latents, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        for name in ("W_enc_FD", "W_dec_FD", "b_enc_F"):
            getattr(b, name)[perm] = getattr(a, name)
        b.b_dec_D.copy_(a.b_dec_D)
    save_sae(b, folder / "layers.1")
    torch.save(perm, folder.parent / "perm.pt")
    return folder


def test_match_writes_pairs_scores_and_resumes(tiny_models, tmp_path, capsys) -> None:
    model = tiny_models["llama"]
    run = write_run(tmp_path / "run", model, 32)
    perm = torch.load(tmp_path / "perm.pt", weights_only=True)
    out = tmp_path / "match"
    args = ["flow", "match", "--saes", str(run), "--out", str(out), "--data", "stdlib:docs"]
    args += ["--tokens", "300", "--skip-tokens", "100", "--context-len", "32", "--json"]
    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    pairs = {(p["site_a"], p["site_b"]): p for p in summary["pairs"]}
    assert set(pairs) == {
        ("layers.0", "layers.1"),
        ("layers.1", "layers.2"),
        ("layers.1.mlp", "layers.2.mlp"),
    }
    match = FeatureMatch.load(out / "pairs" / "layers.0--layers.1")
    assert torch.equal(match.permutation, perm)  # data scales differ per feature, but the copy matches back
    first = pairs[("layers.0", "layers.1")]
    assert first["fold"] == "data" and first["matching_score"] > first["random_score"] + 0.3
    skip = first["layer_skipping"]
    assert set(skip) == {"permuted", "drop_layer", "sae_at_t"}
    assert skip["permuted"]["ev"] != skip["drop_layer"]["ev"]
    assert "layer_skipping" not in pairs[("layers.1.mlp", "layers.2.mlp")]  # module sites: no skipping
    composed = [(c["site_a"], c["site_b"], c["distance"]) for c in summary["compositions"]]
    assert composed == [("layers.0", "layers.1", 1), ("layers.0", "layers.2", 2), ("layers.1", "layers.2", 1)]

    # resume: a pair whose scores.json is gone is redone, identically; the others are read back
    done = out / "pairs" / "layers.1--layers.2" / "scores.json"
    kept = done.stat().st_mtime_ns
    (out / "pairs" / "layers.0--layers.1" / "scores.json").unlink()
    code, stdout2, err = run_cli(args, capsys)
    assert code == 0, err
    assert json.loads(stdout2.strip().splitlines()[-1]) == summary
    assert done.stat().st_mtime_ns == kept
    # other settings, or other SAEs at the same sites, into the same folder are refused, not mixed in
    assert_user_error(run_cli([*args[:-1], "--terms", "decoder"], capsys), "other settings")
    changed = load_sae(run / "layers.2")
    with torch.no_grad():
        changed.W_dec_FD[0] += 0.01
    save_sae(changed, run / "layers.2")
    assert_user_error(run_cli(args, capsys), "other settings or SAEs")


def test_match_is_data_free_without_data(tiny_models, tmp_path, capsys) -> None:
    run = write_run(tmp_path / "run", tiny_models["llama"], 32)
    code, stdout, err = run_cli(
        ["flow", "match", "--saes", str(run), "--out", str(tmp_path / "m"), "--json"], capsys
    )
    assert code == 0, err
    pair = json.loads(stdout.strip().splitlines()[-1])["pairs"][0]
    assert pair["fold"] == "none" and "matching_score" not in pair and pair["folded_mse_mean"] < 1e-12


def test_graph_writes_json_and_report(tiny_models, tmp_path, capsys) -> None:
    run = write_run(tmp_path / "run", tiny_models["llama"], 32)
    out = tmp_path / "graph"
    args = ["flow", "graph", "--saes", str(run), "--feature", "layers.1:5", "--out", str(out)]
    code, stdout, err = run_cli([*args, "--data", "stdlib:docs", "--tokens", "200", "--json"], capsys)
    assert code == 0, err
    graph = json.loads((out / "graph.json").read_text())["graphs"][0]
    perm = torch.load(tmp_path / "perm.pt", weights_only=True)
    back = int((perm == 5).nonzero())  # layers.1:5 is layers.0's feature back, exactly (cosine 1)
    edges = {(e["source"], e["target"]): e["similarity"] for e in graph["edges"]}
    assert abs(edges[(f"layers.0:{back}", "layers.1:5")] - 1) < 1e-5
    html = (out / "report.html").read_text()
    assert "layers.1:5" in html and "Persistence over depth" in html
    flow = json.loads((out / "flow.json").read_text())
    assert [row["site"] for row in flow["classes"]] == ["layers.1", "layers.2"]
    assert flow["classes"][0]["translated"] + flow["classes"][0]["processed"] == 1.0  # layers.1 = layers.0


def test_bad_input_is_one_line(tiny_models, tmp_path, capsys) -> None:
    model = tiny_models["llama"]
    run = write_run(tmp_path / "run", model, 32)
    graph = ["flow", "graph", "--saes", str(run), "--out", str(tmp_path / "g")]
    assert_user_error(run_cli([*graph, "--feature", "layers.1:48"], capsys), "out of range", "48 features")
    assert_user_error(run_cli([*graph, "--feature", "layers.5:1"], capsys), "no SAE for site layers.5")
    match = ["flow", "match", "--out", str(tmp_path / "m")]
    assert_user_error(run_cli([*match, "--saes", str(run), "--fold", "threshold"], capsys), "no thresholds")
    other = write_run(tmp_path / "other", model, 32, latents=64, sites=("layers.0", "layers.1"))
    mixed = ["--saes", str(run / "layers.2"), "--saes", str(other / "layers.1")]
    assert_user_error(run_cli([*match, *mixed], capsys), "different dictionary sizes")
    elsewhere = TopKSAE(TopKConfig(d_in=32, latents=48, k=4, site="layers.3", model="another-model"))
    elsewhere.initialise_(torch.Generator().manual_seed(0))
    save_sae(elsewhere, tmp_path / "elsewhere")
    assert_user_error(
        run_cli([*match, "--saes", str(run / "layers.2"), "--saes", str(tmp_path / "elsewhere")], capsys),
        "must read one model",
        "another-model",
    )
    jump = JumpReLUSAE(JumpReLUConfig(d_in=32, latents=48, site="layers.0", model=str(model)))
    jump.initialise_(torch.Generator().manual_seed(0))
    save_sae(jump, tmp_path / "jump")
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "jump" / "sae.safetensors")
    del tensors["threshold"]
    save_file(tensors, tmp_path / "jump" / "sae.safetensors")
    assert_user_error(run_cli([*match, "--saes", str(tmp_path / "jump")], capsys), "threshold")


def test_steer_prints_both_continuations(tiny_models, tmp_path, capsys) -> None:
    run = write_run(tmp_path / "run", tiny_models["llama"], 32)
    args = ["flow", "steer", "--saes", str(run), "--feature", "layers.1:5", "--prompt", "The json module"]
    args += ["--strength", "60", "--max-new-tokens", "6", "--json"]
    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    single = json.loads(stdout.strip().splitlines()[-1])
    assert single["terms"] == [{"site": "layers.1", "strength": 60.0}]
    assert single["steered"] != single["unsteered"]
    # over layers 0-2 the flow graph's residual chain is layers.0:back → layers.1:5 (layers.2 is unrelated)
    code, stdout, err = run_cli([*args, "--layers", "0-2", "--schedule", "linear", "--total"], capsys)
    assert code == 0, err
    spread = json.loads(stdout.strip().splitlines()[-1])
    assert [t["site"] for t in spread["terms"]] == ["layers.0", "layers.1"]
    assert sum(t["strength"] for t in spread["terms"]) == pytest.approx(60.0)
    assert spread["unsteered"] == single["unsteered"]
    assert spread["terms"][0]["strength"] > spread["terms"][1]["strength"]  # linear: from s down towards 1
    assert_user_error(run_cli([*args, "--schedule", "cubic"], capsys), "constant")
    assert_user_error(run_cli([*args, "--layers", "3-1"], capsys), "ends before it starts")
    encoder_run = write_run(tmp_path / "enc", tiny_models["bert"], 32, sites=("layers.0", "layers.1"))
    assert_user_error(
        run_cli(
            ["flow", "steer", "--saes", str(encoder_run), "--feature", "layers.1:5", "--prompt", "x"], capsys
        ),
        "no LM head",
    )

"""The demo (the README's first command) end to end, at a size that runs in seconds."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from interlayer.data import iter_documents, token_batches
from interlayer.demo import DemoConfig, run_demo
from interlayer.models import load_model
from interlayer.sae import load_sae
from interlayer.sites import capture, resolve_sites, splice


class _Page(HTMLParser):
    """Collects every tag with its attributes, and the cells of the first metrics table."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.table: list[list[str]] = []
        self._in_metrics = self._in_cell = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag == "table" and ("class", "metrics") in attrs and not self.table:
            self._in_metrics = True
        elif self._in_metrics and tag == "tr":
            self.table.append([])
        elif self._in_metrics and tag in ("td", "th"):
            self._in_cell = True
            self.table[-1].append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._in_metrics = False
        if tag in ("td", "th"):
            self._in_cell = False

    def handle_data(self, data: str) -> None:
        if self._in_metrics and self._in_cell:
            self.table[-1][-1] += data


def assert_self_contained(html: str) -> _Page:
    """No script of any kind, nothing fetched or linked outside the file."""
    page = _Page()
    page.feed(html)
    lowered = html.lower()
    assert "<script" not in lowered and "javascript:" not in lowered
    assert "@import" not in lowered and not re.search(r"url\(\s*['\"]?(https?:)?//", lowered)
    for tag, attrs in page.tags:
        assert tag not in ("script", "link", "iframe", "object", "embed", "base", "meta") or (
            tag == "meta" and "http-equiv" not in attrs
        ), tag
        assert not any(name.startswith("on") for name in attrs), (tag, attrs)  # no inline event handlers
        for name in ("href", "src", "srcset", "action", "data", "poster", "xlink:href"):
            value = (attrs.get(name) or "").strip().lower()
            assert not value or value.startswith(("#", "data:image/")), (tag, name, value)
    return page


def recompute(cfg: DemoConfig, site: str) -> dict[str, float]:
    """EV and the pooled-output cosine of the demo's saved SAE at ``site``, from their definitions: the same
    validation batches, activations from a plain capture, the SAE on the kept tokens, masked mean pooling."""
    lm = load_model(cfg.model)
    sae = load_sae(cfg.out / "saes" / site)
    (where,) = resolve_sites(lm.model, site)
    xs, x_hats, cosines, seen = [], [], [], 0
    with torch.no_grad():
        for batch in token_batches(lm.tokenizer, iter_documents(cfg.data, "validation"), cfg.context_len, 16):
            inputs = {"input_ids": batch.input_ids_BT, "attention_mask": batch.attention_mask_BT}
            with capture(lm.model, [where]) as acts:
                clean_BTD = lm.model(**inputs).last_hidden_state
            with splice(lm.model, {where: sae}, keep=batch.keep_BT):
                spliced_BTD = lm.model(**inputs).last_hidden_state
            x_ND = acts[site][batch.keep_BT].double()
            xs.append(x_ND)
            x_hats.append(sae(x_ND.float()).double())
            mask_BT1 = batch.attention_mask_BT[..., None].double()
            u_clean = (clean_BTD.double() * mask_BT1).sum(1) / mask_BT1.sum(1)
            u_sae = (spliced_BTD.double() * mask_BT1).sum(1) / mask_BT1.sum(1)
            cosines.append(F.cosine_similarity(u_clean, u_sae, dim=-1))
            seen += int(batch.keep_BT.sum())
            if seen >= cfg.eval_tokens:
                break
    x, x_hat = torch.cat(xs), torch.cat(x_hats)
    return {
        "tokens": len(x),
        "explained_variance": 1 - float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()),
        "pooled_cosine_sae": float(torch.cat(cosines).mean()),
    }


def test_demo_trains_evaluates_and_reports(tmp_path: Path) -> None:
    cfg = DemoConfig(
        out=tmp_path,
        tokens=8192,
        latents=256,
        k=8,
        batch_size=512,
        eval_tokens=600,
        sites="layers.4,layers.5",
    )
    summary = run_demo(cfg)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert set(summary["sae"]) == {"layers.4", "layers.5"}
    for metrics in summary["sae"].values():  # 16 steps: a rough SAE, but better than the mean (EV 0)
        assert 0.05 < metrics["explained_variance"] < 1 and metrics["l0"] <= 8 and metrics["tokens"] >= 600
    expected = recompute(cfg, "layers.5")
    reported = summary["sae"]["layers.5"]
    assert reported["tokens"] == expected["tokens"]
    assert reported["explained_variance"] == pytest.approx(expected["explained_variance"], abs=1e-5)
    assert reported["pooled_cosine_sae"] == pytest.approx(expected["pooled_cosine_sae"], abs=1e-5)
    assert expected["pooled_cosine_sae"] < 1 - 1e-6  # the splice changed the output

    budgets = summary["budgets"]  # one HierarchicalTopK SAE on the last site, at k/4, k/2, k
    assert budgets["site"] == "layers.5" and budgets["ks"] == [2, 4, 8]
    assert budgets["hierarchical_ev"] == sorted(budgets["hierarchical_ev"])  # quality rises with the budget
    hierarchical = load_sae(tmp_path / "hierarchical" / "layers.5")
    assert hierarchical.cfg.architecture == "hierarchical" and hierarchical.cfg.k == 8
    lm = load_model(cfg.model)
    from interlayer.activations import ChunkPlan, model_chunks

    plan = ChunkPlan(cfg.context_len, 32, 4)
    site = resolve_sites(lm.model, "layers.5")
    x = next(model_chunks(lm, site, cfg.data, plan, split="validation")).acts["layers.5"]
    with torch.no_grad():
        pre = (x - hierarchical.b_dec_D) @ hierarchical.W_enc_FD.T + hierarchical.b_enc_F
        top = pre.relu().topk(4, dim=-1)
        x_hat = (top.values[..., None] * hierarchical.W_dec_FD[top.indices]).sum(1) + hierarchical.b_dec_D
    ev = 1 - float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert budgets["hierarchical_ev"][1] == pytest.approx(ev, abs=1e-4)

    html = (tmp_path / "report.html").read_text()
    assert "One SAE for every sparsity budget" in html
    page = assert_self_contained(html)
    graph_cards = sum(len(g["nodes"]) for g in summary["flow"]["graphs"])
    assert html.count('class="card"') == 2 * cfg.cards_per_site + graph_cards
    header, *rows = page.table
    cells = {row[0]: dict(zip(header, row, strict=True)) for row in rows}
    assert set(cells) == {"layers.4", "layers.5"}
    for site, metrics in summary["sae"].items():  # the report shows the measured numbers (4 digits)
        shown = float(cells[site]["explained_variance"])
        assert shown == pytest.approx(metrics["explained_variance"], rel=1e-3)
    assert float(cells["layers.5"]["explained_variance"]) == pytest.approx(
        expected["explained_variance"], rel=1e-3
    )
    check_flow_stage(cfg, summary, html)


def check_flow_stage(cfg: DemoConfig, summary: dict, html: str) -> None:
    """SAE Match between layers 4 and 5 of each kind, the classes of layers.5, flow graphs rooted there."""
    from interlayer.flow.match import FeatureMatch

    flow = summary["flow"]
    pairs = [(p["site_a"], p["site_b"]) for p in flow["match"]["pairs"]]
    assert pairs == [
        ("layers.4", "layers.5"),
        ("layers.4.attn", "layers.5.attn"),
        ("layers.4.mlp", "layers.5.mlp"),
    ]
    for a, b in pairs:
        match = FeatureMatch.load(cfg.out / "flow" / "match" / "pairs" / f"{a}--{b}")
        assert torch.equal(match.permutation.sort().values, torch.arange(cfg.latents))
    residual = flow["match"]["pairs"][0]
    assert residual["matching_score"] > residual["random_score"]
    assert set(residual["layer_skipping"]) == {"permuted", "drop_layer", "sae_at_t"}
    (classes,) = flow["classes"]
    assert classes["site"] == "layers.5"
    assert sum(classes[c] for c in ("translated", "processed", "born", "unexplained")) == pytest.approx(1.0)
    roots = [g["root"].split(":")[0] for g in flow["graphs"]]
    assert roots in (
        ["layers.5"] * cfg.flow_graphs,
        ["layers.5"] * (cfg.flow_graphs - 1),
    )  # the last: a born one
    for title in (
        "Feature flow graphs",
        "Where residual features come from",
        "Persistence over depth",
        "SAE Match between layers",
    ):
        assert title in html


@pytest.mark.parametrize(
    "bad",
    [
        "<script>alert(1)</script>",
        '<script src="x.js"></script>',
        '<link rel="stylesheet" href="https://cdn.example.com/a.css">',
        '<img src="https://example.com/p.png">',
        '<a href="http://example.com">x</a>',
        '<div onclick="f()">x</div>',
        "<style>@import 'x.css';</style>",
        '<div style="background: url(//example.com/x.png)">x</div>',
    ],
)
def test_self_contained_check_rejects_scripts_and_external_resources(bad: str) -> None:
    assert_self_contained('<html><body><a href="#s1">in-page</a></body></html>')
    with pytest.raises(AssertionError):
        assert_self_contained(f"<html><body>{bad}</body></html>")


def test_steering_stage_trains_evaluates_and_explains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The opt-in steering stage on a tiny arith-lm built through the real zoo path: the accuracy it reports
    for the saved vectors equals a count over completions made by a loop of full forward passes with the
    vectors added by plain forward hooks on the blocks."""
    from dataclasses import replace

    from test_zoo import TINY_ARITH

    from interlayer import zoo
    from interlayer.arithmetic import check_answer, generate_problems
    from interlayer.steering.vectors import SteeringVectors

    monkeypatch.setenv("INTERLAYER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(zoo.REGISTRY, "arith-lm", replace(TINY_ARITH, name="arith-lm", layers=2))
    cfg = DemoConfig(
        out=tmp_path / "demo", tokens=8192, latents=256, k=8, batch_size=512, eval_tokens=600,
        stages=("steering",), steering_steps=2, steering_problems=12,
    )  # fmt: skip
    summary = run_demo(cfg)
    lm = load_model("zoo:arith-lm")
    vectors = SteeringVectors.load(tmp_path / "demo" / "steering" / "vectors", lm.model)
    tok = lm.tokenizer
    handles = [
        lm.model.model.layers[i].register_forward_hook(
            lambda _m, _i, out, v=s: (out[0] + v, *out[1:]) if isinstance(out, tuple) else out + v
        )
        for i, s in enumerate(vectors.S.detach())
    ]
    correct = 0
    try:
        for problem in generate_problems(12, 0, "test"):
            ids = torch.tensor([[tok.bos_token_id, *tok(problem.prompt, add_special_tokens=False).input_ids]])
            new: list[int] = []
            with torch.no_grad():
                for _ in range(48):
                    nxt = int(lm.model(input_ids=ids).logits[0, -1].argmax())
                    if nxt == tok.eos_token_id:
                        break
                    new.append(nxt)
                    ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
            correct += check_answer(tok.decode(new), problem.answer)
    finally:
        for handle in handles:
            handle.remove()
    rows = summary["steering"]["accuracy"]
    assert [r["model"] for r in rows] == ["base", "all-layer vectors"]
    assert rows[1]["greedy accuracy"] == correct / 12
    html = (tmp_path / "demo" / "report.html").read_text()
    for title in ("Steering vectors trained with RL", "Logit lens", "Path patching"):
        assert title in html
    assert "<script" not in html


def test_diffusion_stage_shows_samplers_and_the_remaskers_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The opt-in diffusion stage on a tiny code-mdlm and code-lm built through the real zoo path: its G-Star
    samples, drawn again with the same seed, give the reported generative perplexity, and the report
    highlights exactly the tokens whose remasker logit is positive."""
    from dataclasses import replace

    from test_zoo import TINY

    from interlayer import zoo
    from interlayer.diffusion import SamplerConfig, build_templates, load_denoiser, load_remasker, sample
    from interlayer.diffusion.metrics import generative_perplexity
    from interlayer.diffusion.templates import decode_samples

    monkeypatch.setenv("INTERLAYER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(zoo.REGISTRY, "code-lm", replace(TINY, name="code-lm", corpus="stdlib:code"))
    tiny_mdlm = replace(TINY, name="code-mdlm", corpus="stdlib:code", kind="mdlm", context_len=32, steps=30)
    monkeypatch.setitem(zoo.REGISTRY, "code-mdlm", tiny_mdlm)
    from interlayer.diffusion.remasker import Remasker

    trained_forward = Remasker.forward

    def every_third_token(
        self: Remasker, x0_BL: torch.Tensor, attention_mask_BL: torch.Tensor | None = None
    ) -> torch.Tensor:
        """A stand-in for a trained remasker (5 steps leave every logit near 0): errors where id % 3 == 0."""
        return trained_forward(self, x0_BL, attention_mask_BL) * 0 + torch.where(x0_BL % 3 == 0, 1.0, -1.0)

    monkeypatch.setattr(Remasker, "forward", every_third_token)
    cfg = DemoConfig(
        out=tmp_path / "demo", tokens=8192, latents=256, k=8, batch_size=512, eval_tokens=600,
        stages=("diffusion",), remasker_steps=5, diffusion_samples=6,
    )  # fmt: skip
    summary = run_demo(cfg)
    denoiser, tokenizer = load_denoiser("zoo:code-mdlm")
    remasker = load_remasker(tmp_path / "demo" / "diffusion" / "remasker-5", denoiser)
    template, attention = build_templates(tokenizer, denoiser.mask_id, 6, 32)
    result = sample(denoiser, SamplerConfig(sampler="gstar", steps=16), template, attention, 0, 2, remasker)
    texts, _ = decode_samples(tokenizer, result.tokens_NL, result.attention_NL)
    rows = {row["sampler"]: row for row in summary["diffusion"]["samplers"]}
    assert list(rows) == ["mdlm", "remdm-cap", "star", "gstar"]
    scored = generative_perplexity(texts, load_model("zoo:code-lm"))["gen_ppl"]
    assert rows["gstar"]["gen_ppl"] == pytest.approx(scored, rel=1e-5)
    flagged = 0
    with torch.no_grad():
        for name in rows:
            res = sample(
                denoiser, SamplerConfig(sampler=name, steps=16), template, attention, 0, 64,
                remasker if name == "gstar" else None,
            )  # fmt: skip
            logits = remasker(res.tokens_NL[:3], res.attention_NL[:3])
            special = torch.isin(res.tokens_NL[:3], torch.tensor(tokenizer.all_special_ids))
            flagged += int(((logits > 0) & ~special & res.attention_NL[:3].bool()).sum())
    html = (tmp_path / "demo" / "report.html").read_text()
    assert "Masked diffusion: samplers side by side" in html
    assert html.count("background:#fbd5d5") == flagged > 0
    assert "<script" not in html


def test_lime_stage_trains_both_models_and_reports_their_analyses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The opt-in LIMe stage on a tiny code-lm tokenizer built through the real zoo path: the losses it reports
    are the validation losses of the saved models, recomputed here, and the report has its plots."""
    from dataclasses import replace

    from test_zoo import TINY
    from transformers import AutoModelForCausalLM

    from interlayer import zoo
    from interlayer.data import packed_contexts
    from interlayer.zoo import next_token_loss

    monkeypatch.setenv("INTERLAYER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(zoo.REGISTRY, "code-lm", replace(TINY, name="code-lm", corpus="stdlib:code"))
    cfg = DemoConfig(
        out=tmp_path / "demo", tokens=8192, latents=256, k=8, batch_size=512, eval_tokens=600,
        stages=("lime",), lime_steps=5,
    )  # fmt: skip
    summary = run_demo(cfg)
    run = tmp_path / "demo" / "lime" / "train-5"
    tokenizer = load_model("zoo:code-lm").tokenizer
    val = packed_contexts(tokenizer, "stdlib:code", "validation", 64, 64)
    for name in ("lime", "llama"):
        model = AutoModelForCausalLM.from_pretrained(run / name / "model").eval()
        with torch.no_grad():
            total = sum(float(next_token_loss(model, val[i : i + 32], "sum")) for i in range(0, len(val), 32))
        assert summary["lime"]["val_loss"][name] == pytest.approx(total / (len(val) * 63), rel=1e-6)
    assert len(summary["lime"]["value_entropy"]["LIMe"]) == 4 and summary["lime"]["expected_layer"][0] == 0
    html = (tmp_path / "demo" / "report.html").read_text()
    for title in (
        "LIMe vs Llama: final validation loss",
        "LIMe: value entropy per layer",
        "LIMe: which layers",
    ):
        assert title in html
    assert "<script" not in html


def test_varan_stage_reports_the_accuracies_of_its_saved_runs(tiny_speech: Path, tmp_path: Path) -> None:
    """The opt-in VARAN stage on the tiny speech encoder: the accuracies it reports are those of the saved runs
    evaluated again, and the report has its table and posterior plot."""
    from interlayer.speech.workflows import evaluate_run

    cfg = DemoConfig(
        out=tmp_path / "demo", tokens=8192, latents=256, k=8, batch_size=512, eval_tokens=600,
        stages=("varan",), varan_steps=3, speech_model=str(tiny_speech),
    )  # fmt: skip
    summary = run_demo(cfg)
    for name in ("varan", "last"):
        evaluated = evaluate_run(tmp_path / "demo" / "varan" / f"{name}-3", "synth:styles", size=200)
        assert summary["varan"]["accuracy"][name] == evaluated["accuracy"]
    assert len(summary["varan"]["mean_posterior"]) == 3
    html = (tmp_path / "demo" / "report.html").read_text()
    assert "VARAN vs the last layer: speaking style" in html and "VARAN: posterior over layers" in html


def test_unknown_demo_stage_is_refused(tmp_path: Path) -> None:
    from interlayer.errors import UserError

    with pytest.raises(
        UserError,
        match="unknown demo stage steer; stages: sae, budgets, flow, steering, diffusion, lime, varan",
    ):
        DemoConfig.preset(True, tmp_path, ("sae", "steer"))
    with pytest.raises(UserError, match="the demo stages flow need the sae stage"):
        DemoConfig.preset(True, tmp_path, ("flow",))

"""Every snippet in README.md and docs/*.md works as written.

Each fenced ```python block runs unmodified, in a temporary working folder, with the prerequisites a reader
has at that point (a trained SAE under ``runs/``, a model and ``inputs`` for a fragment) prepared by the
setup registered for it in :data:`SETUPS`, and its results are checked against an independent computation.
Each ```bash block's command lines must parse: every ``interlayer`` (or ``torchrun … -m interlayer``) line
names an existing sub-command and only options it has, read from the typer app itself, and a complete line
parses with click exactly as the shell would hand it over; ``make`` lines name targets of the Makefile.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import torch
import typer
from test_zoo import TINY, TINY_ARITH

from interlayer import zoo
from interlayer.cli import app
from interlayer.models import load_model
from interlayer.sites import resolve_sites, splice

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@dataclass(frozen=True)
class Snippet:
    path: Path
    line: int
    """Line of the opening fence (1-based)."""
    text: str

    @property
    def key(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def snippets(language: str) -> list[Snippet]:
    found = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(rf"^```{language}[ \t]*\n(.*?)^```[ \t]*$", text, re.M | re.S):
            found.append(Snippet(path, text.count("\n", 0, match.start()) + 1, match.group(1)))
    return found


# ---------------------------------------------------------------- python


Check = Callable[[dict[str, Any]], None]
Setup = Callable[[pytest.MonkeyPatch, Path, dict[str, Path]], tuple[dict[str, Any], Check]]


def _readme_use(patch: pytest.MonkeyPatch, tmp: Path, _tiny: dict[str, Path]) -> tuple[dict[str, Any], Check]:
    """The README's Python example: it needs an SAE at runs/minilm/layers.3, trained by the README's own
    command (small sizes) in the working folder."""
    code = run_interlayer(
        patch,
        ["sae", "train", "--model", "minilm", "--sites", "layers.3", "--data", "stdlib:docs", "--tokens", "2048",
         "--latents", "128", "--k", "8", "--batch-size", "256", "--context-len", "64", "--model-batch-size", "8",
         "--chunk-batches", "2", "--out", "runs/minilm"]
    )  # fmt: skip
    assert code == 0 and (tmp / "runs/minilm/layers.3/cfg.json").is_file()

    def check(ns: dict[str, Any]) -> None:
        lm, inputs, sae = ns["lm"], ns["inputs"], ns["sae"]
        assert [s.name for s in ns["sites"]] == [f"layers.{i}" for i in range(6)]
        with torch.no_grad():
            hidden = lm.model(**inputs, output_hidden_states=True).hidden_states
        for i in range(6):
            assert torch.equal(ns["acts"][f"layers.{i}"], hidden[i + 1])
        keep_BT = ~torch.isin(inputs["input_ids"], torch.tensor(lm.tokenizer.all_special_ids))
        assert 0 < int(keep_BT.sum()) < keep_BT.numel()  # [CLS] and [SEP] are left out
        seen: list[torch.Tensor] = []

        def spy(x_ND: torch.Tensor) -> torch.Tensor:
            seen.append(x_ND)
            return sae(x_ND)

        with torch.no_grad(), splice(lm.model, {ns["sites"][3]: spy}, keep=keep_BT):
            again = lm.model(**inputs).last_hidden_state
        assert seen[0].shape == (int(keep_BT.sum()), 384)
        assert torch.equal(ns["out"].last_hidden_state, again)
        assert not torch.equal(again, lm.model(**inputs).last_hidden_state)  # the SAE changed the output
        x_BTD = ns["acts"]["layers.3"]
        torch.testing.assert_close(ns["x_hat"], sae(x_BTD.reshape(-1, 384)).reshape(x_BTD.shape))
        pre = (x_BTD - sae.b_dec_D) @ sae.W_enc_FD.T + sae.b_enc_F
        top = pre.relu().topk(8, dim=-1)
        want = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
        torch.testing.assert_close(ns["codes"], want)

    return {}, check


def run_interlayer(patch: pytest.MonkeyPatch, args: list[str]) -> int:
    """``interlayer ARGS`` in-process through the real entry point; its exit code."""
    from interlayer.cli import main

    patch.setattr(sys, "argv", ["interlayer", *args])
    try:
        main()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def _sites_fragment(
    patch: pytest.MonkeyPatch, tmp: Path, tiny: dict[str, Path]
) -> tuple[dict[str, Any], Check]:
    """docs/models-sites-activations.md shows the three calls on a model, its sites, a site and a function the
    reader has from the lines above it: a tiny Llama here, with ``fn`` adding 1."""
    from interlayer.sites import capture, run_to_sites

    model = load_model(str(tiny["llama"])).model
    ids = torch.randint(1000, 20000, (2, 10), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    sites = resolve_sites(model, "layers.*")
    namespace = {
        "model": model,
        "inputs": inputs,
        "sites": sites,
        "site": sites[1],
        "fn": lambda t: t + 1.0,
        "capture": capture,
        "splice": splice,
        "run_to_sites": run_to_sites,
    }

    def check(ns: dict[str, Any]) -> None:
        hidden = model(**inputs, output_hidden_states=True).hidden_states
        assert sorted(ns["acts"]) == ["layers.0", "layers.1", "layers.2"]
        for i in range(2):  # (Llama's last hidden state is after the final norm)
            assert torch.equal(ns["acts"][f"layers.{i}"], hidden[i + 1])

    return namespace, check


def _zoo_use(patch: pytest.MonkeyPatch, tmp: Path, _tiny: dict[str, Path]) -> tuple[dict[str, Any], Check]:
    """docs/zoo.md's example builds zoo:code-lm and zoo:arith-lm on first use: the real build path runs here
    with the test suite's tiny specs registered under those names, into a temporary cache."""
    patch.setenv("INTERLAYER_CACHE", str(tmp / "cache"))
    patch.setitem(zoo.REGISTRY, "code-lm", replace(TINY, name="code-lm", corpus="stdlib:code"))
    patch.setitem(zoo.REGISTRY, "arith-lm", replace(TINY_ARITH, name="arith-lm"))

    def check(ns: dict[str, Any]) -> None:
        import transformers

        assert type(ns["lm"].model).__name__ == "LlamaForCausalLM" and ns["lm"].is_causal_lm
        assert ns["folder"] == tmp / "cache" / "zoo" / "arith-lm"
        plain = transformers.AutoModelForCausalLM.from_pretrained(ns["folder"])  # as the comment says
        ours = load_model("zoo:arith-lm").model
        for name, weight in ours.state_dict().items():
            assert torch.equal(plain.state_dict()[name], weight), name

    return {}, check


def _saes_use(_patch: pytest.MonkeyPatch, _tmp: Path, _tiny: dict[str, Path]) -> tuple[dict[str, Any], Check]:
    """docs/saes.md builds a HierarchicalTopK SAE and evaluates it at k = 16: the result must be the 16-latent
    prefix, computed here from the weights."""

    def check(ns: dict[str, Any]) -> None:
        sae, x = ns["sae"], ns["x"]
        pre = (x - sae.b_dec_D) @ sae.W_enc_FD.T + sae.b_enc_F
        top = pre.relu().topk(16, dim=-1)
        want = (top.values[..., None] * sae.W_dec_FD[top.indices]).sum(-2) + sae.b_dec_D
        torch.testing.assert_close(ns["x_hat"], want, rtol=1e-5, atol=1e-5)
        assert int((ns["z"] != 0).sum()) == int((top.values > 0).sum())

    return {}, check


def _formats_use(
    _patch: pytest.MonkeyPatch, tmp: Path, _tiny: dict[str, Path]
) -> tuple[dict[str, Any], Check]:
    """docs/sae-formats.md loads a SAELens folder and a Gemma Scope file (the peers' own fixtures, copied where
    the snippet names them): the codes and reconstruction must be SAELens's standard formula on those files."""
    import shutil

    from safetensors.torch import load_file

    peers = ROOT / "tests" / "fixtures" / "peers"
    shutil.copytree(peers / "saelens_standard", tmp / "saelens-sae")
    shutil.copytree(peers / "gemmascope", tmp / "gemma-scope")

    def check(ns: dict[str, Any]) -> None:
        w = load_file(str(tmp / "saelens-sae" / "sae_weights.safetensors"))
        z = ((ns["x"] - w["b_dec"]) @ w["W_enc"] + w["b_enc"]).relu()
        torch.testing.assert_close(ns["z"], z, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ns["x_hat"], z @ w["W_dec"] + w["b_dec"], rtol=1e-5, atol=1e-5)
        assert ns["sae"].cfg.site == "layers.2" and ns["scope"].cfg.architecture == "jumprelu"

    return {}, check


def _flow_use(patch: pytest.MonkeyPatch, tmp: Path, _tiny: dict[str, Path]) -> tuple[dict[str, Any], Check]:
    """docs/flow.md matches two layers, draws a flow graph and steers generation with SAEs of zoo:prose-lm at
    every site: a tiny prose-lm (3 blocks) is built through the real zoo path and SAEs are trained with the
    docs' own command at small sizes. The permutation must be scipy's dense optimum on the raw parameters
    (TopK SAEs without data: no folding), and the steered tokens a greedy loop with s·v̂ added by hand."""
    patch.setenv("INTERLAYER_CACHE", str(tmp / "cache"))
    patch.setitem(zoo.REGISTRY, "prose-lm", replace(TINY, name="prose-lm", layers=3))
    code = run_interlayer(
        patch,
        ["sae", "train", "--model", "zoo:prose-lm", "--data", "stdlib:docs", "--sites", "**", "--tokens", "2048",
         "--latents", "64", "--k", "4", "--batch-size", "256", "--context-len", "64", "--model-batch-size", "8",
         "--chunk-batches", "2", "--out", "runs/prose-lm"]
    )  # fmt: skip
    assert code == 0

    def check(ns: dict[str, Any]) -> None:
        from scipy.optimize import linear_sum_assignment

        a, b = ns["saes"]["layers.1"], ns["saes"]["layers.2"]

        def params(sae: Any) -> torch.Tensor:
            bias = sae.b_enc_F - sae.W_enc_FD @ sae.b_dec_D
            return torch.cat([sae.W_enc_FD, sae.W_dec_FD, bias[:, None]], 1).detach().double()

        cost = torch.cdist(params(a), params(b)).pow(2).numpy()
        rows, cols = linear_sum_assignment(cost)
        assert ns["match"].permutation.tolist() == cols.tolist()
        lm, terms = ns["lm"], ns["terms"]
        assert [t.site for t in terms] == [n.site for n in ns["graph"].residual_chain()]
        blocks = lm.model.model.layers
        handles = []
        for term in terms:
            layer = int(term.site.split(".")[1])
            add = term.strength * term.direction_D / term.direction_D.norm()
            handles.append(
                blocks[layer].register_forward_hook(
                    lambda _m, _i, out, v=add: (out[0] + v, *out[1:]) if isinstance(out, tuple) else out + v
                )
            )
        try:
            ids = ns["ids"]
            with torch.no_grad():
                for _ in range(10):
                    nxt = lm.model(input_ids=ids).logits[0, -1].argmax()
                    ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
        finally:
            for handle in handles:
                handle.remove()
        assert torch.equal(ns["steered"], ids)

    return {}, check


def _steering_use(
    patch: pytest.MonkeyPatch, tmp: Path, _tiny: dict[str, Path]
) -> tuple[dict[str, Any], Check]:
    """docs/steering.md trains vectors on zoo:arith-lm, evaluates them and generates with them: a tiny
    arith-lm is built through the real zoo path. The greedy accuracy must equal a count over completions made
    by a loop of full forward passes with s_ℓ added by plain forward hooks on the blocks, and the steered
    generation that loop's tokens."""
    from interlayer.arithmetic import check_answer
    from interlayer.steering.tasks import TaskProblem, run_verifier

    patch.setenv("INTERLAYER_CACHE", str(tmp / "cache"))
    patch.setitem(zoo.REGISTRY, "arith-lm", replace(TINY_ARITH, name="arith-lm"))

    def greedy_by_hand(lm: Any, vectors: Any, ids: torch.Tensor, steps: int, stop: int | None) -> list[int]:
        handles = [
            lm.model.model.layers[i].register_forward_hook(
                lambda _m, _i, out, v=s: (out[0] + v, *out[1:]) if isinstance(out, tuple) else out + v
            )
            for i, s in enumerate(vectors.S.detach())
        ]
        try:
            new: list[int] = []
            with torch.no_grad():
                for _ in range(steps):
                    nxt = int(lm.model(input_ids=ids).logits[0, -1].argmax())
                    if nxt == stop:
                        break
                    new.append(nxt)
                    ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        finally:
            for handle in handles:
                handle.remove()
        return new

    def check(ns: dict[str, Any]) -> None:
        lm, vectors, task, result = ns["lm"], ns["vectors"], ns["task"], ns["result"]
        assert ns["summary"]["steps"] == 3 and ns["summary"]["trainable_parameters"] == vectors.S.numel()
        history = json.loads(Path("runs/arith-vectors/history.json").read_text())
        never_right = all(r["reward"] == -1.0 for r in history)  # every advantage 0: no update at all
        assert bool(vectors.S.abs().sum() == 0) == never_right
        tok = lm.tokenizer
        correct = 0
        for problem in task.problems["test"]:
            ids = torch.tensor([[tok.bos_token_id, *tok(problem.prompt, add_special_tokens=False).input_ids]])
            completion = tok.decode(greedy_by_hand(lm, vectors, ids, task.max_new_tokens, tok.eos_token_id))
            correct += check_answer(completion, int(problem.answer))
        assert result.correct == correct and result.problems == 20
        prompt_ids = ns["ids"]
        assert (
            ns["steered"][0, prompt_ids.shape[1] :].tolist()[
                : len(by_hand := greedy_by_hand(lm, vectors, prompt_ids, 12, None))
            ]
            == by_hand
        )
        problem = TaskProblem("q", "9", "x")
        assert run_verifier(ns["ends_with_answer"], " 4 + 5 = 9", problem) == 1.0
        assert run_verifier(ns["ends_with_answer"], " 4 + 5 = 8", problem) == -1.0

    return {}, check


def _diffusion_use(
    patch: pytest.MonkeyPatch, tmp: Path, _tiny: dict[str, Path]
) -> tuple[dict[str, Any], Check]:
    """docs/diffusion.md samples from zoo:code-mdlm and trains a remasker: a tiny MDLM is built through the
    real zoo path. The samples must equal the same call one sample per batch, keep the prompt, spend at most
    16 denoiser calls, and G-Star one remasker call per star step."""
    from interlayer.diffusion.samplers import SamplerConfig, plan, sample

    patch.setenv("INTERLAYER_CACHE", str(tmp / "cache"))
    tiny_mdlm = replace(TINY, name="code-mdlm", kind="mdlm", corpus="stdlib:code", steps=30, context_len=32)
    patch.setitem(zoo.REGISTRY, "code-mdlm", tiny_mdlm)

    def check(ns: dict[str, Any]) -> None:
        result, template, attention = ns["result"], ns["template"], ns["attention"]
        one_by_one = sample(
            ns["denoiser"], SamplerConfig(sampler="mdlm", steps=16), template, attention, 0, 1
        )
        assert torch.equal(result.tokens_NL, one_by_one.tokens_NL)
        assert all(text.startswith("def") for text in ns["texts"]) and int(result.nfe_N.max()) <= 16
        star_steps = sum(step.kind == "star" for step in plan(SamplerConfig(sampler="gstar", steps=16)))
        assert ns["gstar"].remasker_nfe_N.tolist() == [star_steps] * 8 and star_steps == 4
        assert len(json.loads(Path("runs/remasker/history.json").read_text())) == ns["summary"]["steps"] == 20

    return {}, check


def _lime_use(_patch: pytest.MonkeyPatch, _tmp: Path, _tiny: dict[str, Path]) -> tuple[dict[str, Any], Check]:
    """docs/lime.md builds, saves, reloads and converts LIMe models: the reloaded model computes the same logits,
    the converted one Llama's, and the router shares are the |W| sums per source layer."""

    def check(ns: dict[str, Any]) -> None:
        model, ids = ns["model"], ns["ids"]
        assert type(ns["loaded"]).__name__ == "LimeForCausalLM"
        assert torch.equal(ns["loaded"](ids).logits, ns["logits"]) and ns["tokens"].shape == (2, 12)
        assert torch.allclose(ns["as_lime"](ids).logits, ns["llama"](ids).logits, atol=1e-6, rtol=0)
        weight = model.model.layers[3].self_attn.router.weight.detach().abs()
        per_layer = weight.view(2, 4, 2).sum(dim=(0, 2))
        assert torch.allclose(ns["shares"][3], per_layer / per_layer.sum())
        assert torch.equal(ns["shares"][0], torch.tensor([1.0, 0, 0, 0]))

    return {}, check


def _varan_use(patch: pytest.MonkeyPatch, tmp: Path, _tiny: dict[str, Path]) -> tuple[dict[str, Any], Check]:
    """docs/varan.md puts VARAN heads on zoo:speech-w2v2 (here the tiny random speech encoder of the fixtures):
    q sums to 1 per clip, the scores are the q-weighted log-probabilities, and only adapters, heads and
    posterior train."""
    from conftest import save_tiny_speech

    folder = save_tiny_speech(tmp / "speech")
    patch.setattr(zoo, "ensure", lambda name, *a, **k: folder if name == "zoo:speech-w2v2" else None)

    def check(ns: dict[str, Any]) -> None:
        q, output, scores = ns["q"], ns["output"], ns["scores"]
        assert q.shape == (8, 3) and torch.allclose(q.sum(-1), torch.ones(8))
        by_hand = sum(q[:, i, None] * output.logits[:, i].log_softmax(-1) for i in range(3))
        assert torch.allclose(scores, by_hand, atol=1e-6) and scores.shape == (8, 4)
        trainable = [n for n, p in ns["model"].named_parameters() if p.requires_grad]
        assert trainable and all(".lora_" in n or n.startswith(("heads.", "posterior.")) for n in trainable)

    return {}, check


SETUPS: dict[str, Setup] = {
    "docs/flow.md": _flow_use,
    "docs/sae-formats.md": _formats_use,
    "docs/saes.md": _saes_use,
    "README.md": _readme_use,
    "docs/models-sites-activations.md": _sites_fragment,
    "docs/zoo.md": _zoo_use,
    "docs/steering.md": _steering_use,
    "docs/diffusion.md": _diffusion_use,
    "docs/lime.md": _lime_use,
    "docs/varan.md": _varan_use,
}
"""Setup per file (each of these files has one Python snippet; :func:`test_every_snippet_has_a_setup`)."""

PYTHON = snippets("python")


def test_every_snippet_has_a_setup() -> None:
    files = [str(s.path.relative_to(ROOT)) for s in PYTHON]
    assert sorted(files) == sorted(SETUPS), "add a setup for a new snippet, or drop the one for a removed one"


@pytest.mark.parametrize("snippet", PYTHON, ids=[s.key for s in PYTHON])
def test_python_snippet_runs_as_written(
    snippet: Snippet,
    tiny_models: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    namespace, check = SETUPS[str(snippet.path.relative_to(ROOT))](monkeypatch, tmp_path, tiny_models)
    namespace["__name__"] = "__snippet__"
    exec(compile(snippet.text, snippet.key, "exec"), namespace)  # noqa: S102 - the documented text itself
    check(namespace)


# ---------------------------------------------------------------- bash


def command_lines(snippet: Snippet) -> list[list[str]]:
    """The commands of a bash block, continuation lines joined, comments dropped, split as the shell does."""
    joined = snippet.text.replace("\\\n", " ")
    return [words for line in joined.splitlines() if (words := shlex.split(line, comments=True))]


def interlayer_args(words: list[str]) -> list[str] | None:
    """The arguments handed to interlayer, or None for a line that does not run it."""
    if words[0] == "interlayer":
        return words[1:]
    if words[0] == "torchrun":
        assert "-m" in words and words[words.index("-m") + 1] == "interlayer", words
        return words[words.index("-m") + 2 :]
    return None


def resolve_command(args: list[str]) -> tuple[Any, list[str], str]:
    """The (click) command the words name, walking the sub-command groups; its arguments and its path."""
    command: Any = typer.main.get_command(app)
    path = ["interlayer"]
    while hasattr(command, "commands"):  # a group
        assert args and args[0] in command.commands, f"{' '.join(path)} has no sub-command {args[:1]}"
        path.append(args[0])
        command, args = command.commands[args[0]], args[1:]
    return command, args, " ".join(path)


def check_command(args: list[str]) -> None:
    partial = "..." in args  # a line that shows only some options
    # Optional parts in brackets ([--quick] [--out DIR]) are checked as if given.
    args = [a.strip("[]") for a in args if a != "..."]
    command, rest, path = resolve_command(args)
    known = {name for param in command.params for name in (*param.opts, *param.secondary_opts)}
    for word in rest:
        if word.startswith("-"):
            assert word.split("=")[0] in known, f"{path} has no option {word}; it has {sorted(known)}"
    if not partial:  # the whole line parses: values given, required options present, no stray arguments
        try:
            command.make_context(path, list(rest), resilient_parsing=False)
        except Exception as exc:  # click's UsageError (typer vendors click: its own classes)
            raise AssertionError(f"{path}: {exc}") from exc
    for flag, value in zip(rest, rest[1:], strict=False):
        if flag == "--model" and value.startswith("zoo:"):
            assert value[4:] in zoo.REGISTRY, value
    if path == "interlayer zoo build":
        assert rest[0] in zoo.REGISTRY, rest


BASH = snippets("bash")


def test_docs_have_bash_blocks() -> None:
    assert {s.path.name for s in BASH} >= {"README.md", "zoo.md", "saes.md"}


@pytest.mark.parametrize("snippet", BASH, ids=[s.key for s in BASH])
def test_bash_commands_parse(snippet: Snippet) -> None:
    makefile = (ROOT / "Makefile").read_text()
    lines = command_lines(snippet)
    assert lines
    for words in lines:
        args = interlayer_args(words)
        if args is not None:
            check_command(args)
        elif words[0] == "make":
            for target in words[1:]:
                assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"no make target {target}"
        else:
            raise AssertionError(f"{snippet.key}: a command this test does not know how to check: {words}")


@pytest.mark.parametrize(
    "line",
    [
        "interlayer sites --modle minilm",
        "interlayer sites --device cpu",  # --model is required
        "interlayer zoo build",  # so is the model's name
        "interlayer sites --model minilm --device",  # an option without its value
        "interlayer sae tran --out r",
        "interlayer zoo build no-such-model",
        "interlayer sae train --model zoo:nope ...",
        "interlayer sites --model minilm extra",
    ],
)
def test_bash_check_catches_mistakes(line: str) -> None:
    with pytest.raises(AssertionError):
        check_command(interlayer_args(shlex.split(line)) or [])


def test_bash_check_reads_the_options_from_the_app() -> None:
    command, _, path = resolve_command(["sae", "train"])
    assert path == "interlayer sae train"
    assert {"--latents", "--k", "--out", "--sites"} <= {opt for p in command.params for opt in p.opts}

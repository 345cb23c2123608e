"""The zoo's real build path with a tiny spec: build, reload, determinism, corruption, `zoo:` names, CLI."""

from __future__ import annotations

import json
import math
import shutil
import threading
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from filelock import FileLock
from test_cli import run_cli  # the shared in-process CLI runner

from interlayer import zoo
from interlayer.arithmetic import evaluate_accuracy, generate_problems, greedy_completions
from interlayer.errors import UserError
from interlayer.models import load_model

TINY = zoo.ZooSpec(
    name="tiny",
    corpus="stdlib:docs",
    description="a tiny test model",
    steps=20,
    batch_size=4,
    vocab_size=300,
    d_model=32,
    layers=1,
    heads=2,
    intermediate=64,
    context_len=64,
    warmup_steps=2,
    max_documents=12,
    val_contexts=8,
)
TINY_ARITH = replace(
    TINY,
    name="tiny-arith",
    corpus="arith",
    context_len=128,
    arith_train_problems=300,
    arith_val_problems=20,
    probe_every=10,
    probe_problems=10,
    test_problems=20,
)
TEXT = "def add(a, b):\n    return a + b  # 12345\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor], torch.Tensor]:
    """The tiny spec built once into a fresh zoo folder, with the weights of the model object the build trained
    (copied when the build evaluates it, just before saving) and the validation contexts it evaluated."""
    seen: dict[str, object] = {}
    validation_loss = zoo.validation_loss

    def recording(model: torch.nn.Module, val_NT: torch.Tensor, *args: object, **kwargs: object) -> float:
        seen["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        seen["val_NT"] = val_NT.clone()
        return validation_loss(model, val_NT, *args, **kwargs)  # type: ignore[arg-type]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(zoo, "validation_loss", recording)
        folder = zoo.build(TINY, tmp_path_factory.mktemp("zoo"), progress=False)
    return folder, seen["state"], seen["val_NT"]  # type: ignore[return-value]


@pytest.fixture(scope="module")
def built(trained: tuple[Path, dict[str, torch.Tensor], torch.Tensor]) -> Path:
    return trained[0]


def logits(folder: Path | str) -> torch.Tensor:
    lm = load_model(str(folder))
    with torch.no_grad():
        return lm.model(**lm.tokenizer(TEXT, return_tensors="pt")).logits


def test_build_writes_a_hub_layout_and_a_complete_manifest(built: Path) -> None:
    manifest = json.loads((built / "manifest.json").read_text())
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(
        manifest["files"]
    )
    for name, digest in manifest["files"].items():
        assert zoo.sha256_file(built / name) == digest
    assert manifest["spec"] == asdict(TINY) and manifest["seed"] == 0 and manifest["steps"] == 20
    assert manifest["parameters"] == zoo.parameter_count(TINY)
    assert manifest["val_ppl"] == pytest.approx(math.exp(manifest["val_loss"]))
    assert manifest["val_contexts"] == 8 and manifest["val_tokens"] == 8 * 63
    assert manifest["corpus_fingerprint"] == zoo.corpus_fingerprint_of(TINY)
    assert manifest["unigram_ppl"] > manifest["bigram_ppl"] > 1
    assert manifest["build_seconds"] > 0 and manifest["python"]
    assert zoo.check_entry(built, TINY) is None
    assert not list(built.parent.glob(".build-*"))  # the temporary folder is gone


def test_reload_gives_identical_logits_and_a_llama_with_bpe(built: Path) -> None:
    lm = load_model(str(built))
    assert type(lm.model).__name__ == "LlamaForCausalLM" and lm.is_causal_lm
    assert lm.model.config.vocab_size == len(lm.tokenizer) == 300
    ids = lm.tokenizer(TEXT)["input_ids"]
    assert ids[0] == lm.tokenizer.bos_token_id  # BOS is prepended, Llama style
    assert lm.tokenizer.decode(ids, skip_special_tokens=True) == TEXT  # byte-level: lossless
    digits = lm.tokenizer("12345", add_special_tokens=False)["input_ids"]
    assert len(digits) == 5  # one token per digit


def test_reload_is_the_model_the_build_trained_and_reproduces_its_figures(
    trained: tuple[Path, dict[str, torch.Tensor], torch.Tensor],
) -> None:
    folder, state, val_NT = trained
    lm = load_model(str(folder))
    reloaded = lm.model.state_dict()
    assert set(state) <= set(reloaded) and len(state) > 5
    for name, weight in state.items():
        assert torch.equal(reloaded[name], weight), name  # bit for bit the trained weights
    # The reloaded tokenizer packs the same validation contexts the build evaluated ...
    assert torch.equal(zoo._corpus(TINY, lm.tokenizer).val_NT, val_NT)
    # ... and on them the reloaded model's cross-entropy, computed here directly, is the recorded val_loss.
    with torch.no_grad():
        logits_NTV = lm.model(input_ids=val_NT).logits.double()
    nll = torch.nn.functional.cross_entropy(logits_NTV[:, :-1].flatten(0, 1), val_NT[:, 1:].flatten())
    manifest = json.loads((folder / "manifest.json").read_text())
    assert float(nll) == pytest.approx(manifest["val_loss"], rel=1e-5)
    assert math.log(TINY.vocab_size) > manifest["val_loss"] > 1.0  # 20 steps learn something, not everything


def test_same_seed_builds_identical_files(built: Path, tmp_path: Path) -> None:
    abandoned = tmp_path / ".build-tiny-999999999-x"  # a crashed build: its process is gone
    abandoned.mkdir()
    (abandoned / "model.safetensors").write_bytes(b"partial")
    again = zoo.build(TINY, tmp_path, progress=False)
    assert not abandoned.exists()
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert zoo.sha256_file(again / name) == zoo.sha256_file(built / name), name
    other_seed = zoo.build(replace(TINY, seed=1), tmp_path / "other", progress=False)
    assert zoo.sha256_file(other_seed / "model.safetensors") != zoo.sha256_file(built / "model.safetensors")


def _corrupt_weights(folder: Path) -> None:
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-16:] = bytes(b ^ 0xFF for b in data[-16:])
    (folder / "model.safetensors").write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (_corrupt_weights, "model.safetensors is corrupt"),
        (lambda folder: (folder / "manifest.json").unlink(), "no manifest.json"),
        (lambda folder: (folder / "tokenizer.json").unlink(), "tokenizer.json is missing"),
        (lambda folder: (folder / "manifest.json").write_text("{"), "unreadable"),
    ],
)
def test_damaged_entry_is_detected_and_rebuilt(built: Path, tmp_path: Path, damage, reason: str) -> None:
    root = tmp_path / "zoo"
    shutil.copytree(built, root / "tiny")
    damage(root / "tiny")
    assert reason in (zoo.check_entry(root / "tiny", TINY) or "")
    zoo.REGISTRY["tiny"] = TINY
    try:
        folder = zoo.ensure("tiny", root, progress=False)
    finally:
        del zoo.REGISTRY["tiny"]
    assert zoo.check_entry(folder, TINY) is None
    assert zoo.sha256_file(folder / "model.safetensors") == zoo.sha256_file(built / "model.safetensors")


def test_stale_spec_is_rebuilt(built: Path) -> None:
    assert "different spec" in (zoo.check_entry(built, replace(TINY, steps=21)) or "")
    # The description and the time estimate do not change what is built.
    assert zoo.check_entry(built, replace(TINY, description="other", reference_minutes=3.0)) is None


def test_entries_built_before_the_speech_fields_stay_valid(built: Path, tmp_path: Path) -> None:
    shutil.copytree(built, tmp_path / "tiny")
    manifest = json.loads((tmp_path / "tiny" / "manifest.json").read_text())
    later = ("digits_clips", "styles_clips", "heldout_clips", "conv_dim", "pos_conv", "codevectors")
    later += ("mask_prob", "mask_length", "negatives", "kind")
    manifest["spec"] = {k: v for k, v in manifest["spec"].items() if k not in later}  # as written before
    (tmp_path / "tiny" / "manifest.json").write_text(json.dumps(manifest))
    assert zoo.check_entry(tmp_path / "tiny", TINY) is None
    assert "different spec" in (zoo.check_entry(tmp_path / "tiny", replace(TINY, kind="mdlm")) or "")


@pytest.fixture
def tiny_registry(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Register the tiny spec and point the cache at a temporary folder; return the zoo folder."""
    monkeypatch.setitem(zoo.REGISTRY, "tiny", TINY)
    monkeypatch.setenv("INTERLAYER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "zoo"


def test_zoo_name_builds_on_first_use_then_loads_from_cache(
    tiny_registry: Path, built: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert zoo.zoo_dir() == tiny_registry
    first = logits("zoo:tiny")
    assert "building it into" in capsys.readouterr().err  # the user is told, with an estimate
    assert zoo.check_entry(tiny_registry / "tiny", TINY) is None
    assert torch.equal(first, logits(built))  # same spec, same machine: the same model

    def no_rebuild(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("an intact entry was rebuilt")

    monkeypatch.setattr(zoo, "build", no_rebuild)
    assert torch.equal(logits("zoo:tiny"), first)


def test_cache_folder_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("INTERLAYER_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert zoo.zoo_dir() == tmp_path / "interlayer" / "zoo"


def test_unknown_zoo_model_fails_before_building(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(zoo, "build", lambda *a, **k: pytest.fail("tried to build"))
    with pytest.raises(UserError, match="unknown zoo model 'nope'.*code-lm"):
        load_model("zoo:nope")


def test_validation_is_split_by_file() -> None:
    train = {d.name for d in zoo._documents("stdlib:code", "train", 40)}
    validation = {d.name for d in zoo._documents("stdlib:code", "validation", 10)}
    assert len(train) == 40 and len(validation) == 10 and not train & validation


def test_ngram_baselines_match_the_formulas() -> None:
    train_NT = torch.tensor([[0, 1, 2, 1, 2, 1], [0, 2, 2, 1, 1, 2]])
    val_NT = torch.tensor([[0, 1, 2, 2, 0]])
    vocab = 4
    pairs = [(int(r[t - 1]), int(r[t])) for r in train_NT for t in range(1, len(r))]
    targets = [b for _, b in pairs]
    count = {(v, w): pairs.count((v, w)) for v in range(vocab) for w in range(vocab)}
    n1 = sum(c == 1 for c in count.values())
    n2 = sum(c == 2 for c in count.values())
    d = n1 / (n1 + 2 * n2)
    cont = [sum(count[v, w] > 0 for v in range(vocab)) for w in range(vocab)]
    p_cont = [(c + 1) / (sum(cont) + vocab) for c in cont]

    def bigram(v: int, w: int) -> float:
        c_v = sum(count[v, u] for u in range(vocab))
        if c_v == 0:
            return p_cont[w]
        followers = sum(count[v, u] > 0 for u in range(vocab))
        return max(count[v, w] - d, 0) / c_v + d * followers / c_v * p_cont[w]

    val_pairs = [(int(val_NT[0, t - 1]), int(val_NT[0, t])) for t in range(1, 5)]
    uni = [(targets.count(w) + 1) / (len(targets) + vocab) for _, w in val_pairs]
    expected_uni = math.exp(-sum(map(math.log, uni)) / 4)
    expected_bi = math.exp(-sum(math.log(bigram(v, w)) for v, w in val_pairs) / 4)
    got = zoo.ngram_baselines(train_NT, val_NT, vocab)
    assert got["unigram_ppl"] == pytest.approx(expected_uni, rel=1e-12)
    assert got["bigram_ppl"] == pytest.approx(expected_bi, rel=1e-12)
    # Each bigram row is a distribution.
    rows = [sum(bigram(v, w) for w in range(vocab)) for v in range(vocab)]
    assert rows == pytest.approx([1.0] * vocab)


def test_arith_build_probes_and_scores_held_out_problems(tmp_path: Path) -> None:
    folder = zoo.build(TINY_ARITH, tmp_path, progress=False)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert [p["step"] for p in manifest["probes"]] == [10, 20]
    test = manifest["arith_test"]
    assert test["total"] == 20 and 0 <= test["ci_low"] <= test["correct"] / 20 <= test["ci_high"] <= 1
    lm = load_model(str(folder))
    problems = generate_problems(6, seed=0, split="test")
    batched = greedy_completions(lm.model, lm.tokenizer, [p.prompt for p in problems], max_new_tokens=12)
    alone = [greedy_completions(lm.model, lm.tokenizer, [p.prompt], max_new_tokens=12)[0] for p in problems]
    assert batched == alone  # grouping by prompt length never changes a greedy continuation
    assert evaluate_accuracy(lm.model, lm.tokenizer, problems, max_new_tokens=12).total == 6


def test_cli_list_and_build(tiny_registry: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["zoo", "list", "--json"], capsys)
    rows = {row["name"]: row for row in json.loads(out.splitlines()[-1])["models"]}
    assert code == 0 and {"code-lm", "prose-lm", "arith-lm", "tiny"} <= rows.keys()
    assert rows["tiny"]["built"] is False and rows["tiny"]["parameters"] == zoo.parameter_count(TINY)
    code, out, _ = run_cli(["zoo", "build", "tiny", "--json"], capsys)
    summary = json.loads(out.splitlines()[-1])
    assert code == 0 and summary["path"] == str(tiny_registry / "tiny") and summary["steps"] == 20
    code, out, _ = run_cli(["zoo", "list", "--json"], capsys)
    row = {r["name"]: r for r in json.loads(out.splitlines()[-1])["models"]}["tiny"]
    assert row["built"] is True and row["val_ppl"] == pytest.approx(summary["val_ppl"])
    code, _, _ = run_cli(["zoo", "build", "nope"], capsys)
    assert code == 2


def _fake_built(root: Path, built: Path, name: str, figures: dict[str, object]) -> None:
    """Install the tiny model's files as zoo entry ``name`` with a manifest that passes check_entry for the
    registered spec, carrying the given figures: what `zoo list` sees once the real model is built."""
    spec = zoo.REGISTRY[name]
    shutil.copytree(built, root / name)
    manifest = json.loads((built / "manifest.json").read_text())
    manifest |= {"name": name, "spec": asdict(spec), "corpus_fingerprint": zoo.corpus_fingerprint_of(spec)}
    manifest |= figures
    (root / name / "manifest.json").write_text(json.dumps(manifest))
    assert zoo.check_entry(root / name, spec) is None


def test_cli_list_at_80_columns_never_cuts_a_name(
    tiny_registry: Path, built: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    figures = {"val_ppl": 58.81, "unigram_ppl": 412.5, "bigram_ppl": 111.2, "build_seconds": 612.34}
    for name in ("code-lm", "prose-lm", "arith-lm"):
        extra = {"arith_test": {"correct": 181, "total": 500}} if name == "arith-lm" else {}
        _fake_built(tiny_registry, built, name, figures | extra)
    monkeypatch.setenv("COLUMNS", "80")  # what a pipe or a narrow terminal gives
    code, out, err = run_cli(["zoo", "list"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 80 and "…" not in out
    rows = {cells[0]: cells for line in lines if len(cells := [c.strip() for c in line.split("│")[1:-1]]) > 1}
    assert {"code-lm", "prose-lm", "arith-lm", "tiny"} <= rows.keys()  # every name whole, in its own cell
    assert rows["code-lm"][1:4] == ["stdlib:code", str(zoo.parameter_count(zoo.REGISTRY["code-lm"])), "True"]
    assert rows["tiny"][3] == "False" and rows["arith-lm"][1] == "arith"
    shown = len(rows["code-lm"])
    every = ["name", "corpus", "parameters", "built", *figures, "arith_accuracy"]
    assert 4 <= shown < len(every)  # 9 columns do not fit in 80: the trailing ones are left out, and said so
    assert "58.81" in rows["code-lm"] or shown < 5
    caption = " ".join(out.split("not shown")[1].split())
    assert caption.startswith("(too narrow; see --json): " + ", ".join(every[shown:])), caption
    assert "code-lm" not in err  # the table is the product: stdout
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = run_cli(["zoo", "list"], capsys)
    row = next(line for line in out.splitlines() if "arith-lm" in line)
    assert [c.strip() for c in row.split("│")[1:-1]][4:] == ["58.81", "412.5", "111.2", "612.3", "0.362"]
    assert "not shown" not in out


def test_a_second_process_waits_for_the_build_then_uses_it(
    built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "zoo"
    root.mkdir()
    monkeypatch.setitem(zoo.REGISTRY, "tiny", TINY)
    built_here: list[Path] = []

    def build_into(folder: Path, *_: object) -> None:  # a build that is quick: the tiny model's files
        built_here.append(folder)
        shutil.copytree(built, folder, dirs_exist_ok=True)

    monkeypatch.setattr(zoo, "_build_into", build_into)
    waiting = threading.Event()

    class Console:  # stands in for the terminal; notes when ensure says it is waiting
        def print(self, text: str) -> None:
            if "another process is building it" in text:
                waiting.set()

    monkeypatch.setattr(zoo, "stderr_console", Console())
    other = FileLock(root / ".tiny.lock")  # another process is building zoo:tiny
    other.acquire()
    result: list[Path] = []
    thread = threading.Thread(target=lambda: result.append(zoo.ensure("tiny", root)))
    thread.start()
    try:
        assert waiting.wait(timeout=60)
        assert not (root / "tiny").exists()
        shutil.copytree(built, root / "tiny")  # ... it finishes its build
    finally:
        other.release()
        thread.join(timeout=60)
    assert result == [root / "tiny"] and built_here == []  # used, not rebuilt
    zoo.build("tiny", root, progress=False, force=False)
    assert built_here == []
    zoo.build("tiny", root, progress=False, force=True)
    assert len(built_here) == 1 and zoo.check_entry(root / "tiny", TINY) is None

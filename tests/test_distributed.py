"""torchrun with gloo on 2 processes. Sharing by sites gives exactly the single-process SAEs, sharing by data
the same up to float summation order; a checkpoint written by 2 ranks resumes in 1 process to the same
result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_worker import SITES, TRAIN, chunks, sae_cfgs
from safetensors.torch import load_file
from test_cli import run_cli

from interlayer.activations import _reassemble
from interlayer.distributed import SINGLE, ProcessGroup, check_mode, site_blocks
from interlayer.errors import UserError
from interlayer.sae.trainer import CHECKPOINT, CHECKPOINT_STATE, METRICS_FILE, train_saes

WORKER = Path(__file__).with_name("distributed_worker.py")


def torchrun(*args: str) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc-per-node 2 ARGS`` with one thread per process (as in the tests)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parent)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def saes_of(run: Path, sites: tuple[str, ...] | list[str]) -> dict[str, dict[str, torch.Tensor]]:
    return {site: load_file(str(run / site / "sae.safetensors")) for site in sites}


def assert_same_saes(
    got: dict[str, dict[str, torch.Tensor]], want: dict[str, dict[str, torch.Tensor]], atol: float = 0.0
) -> None:
    """Equal weights (bit for bit when ``atol`` is 0)."""
    assert got.keys() == want.keys()
    for site in want:
        assert got[site].keys() == want[site].keys()
        for name, tensor in want[site].items():
            torch.testing.assert_close(got[site][name], tensor, rtol=0, atol=atol, msg=f"{site} {name}")


def test_site_blocks_are_contiguous_and_balanced() -> None:
    names = [f"layers.{i}" for i in range(5)]
    assert site_blocks(names, 1) == [names]
    assert site_blocks(names, 2) == [names[:3], names[3:]]
    assert site_blocks(names, 3) == [names[:2], names[2:4], names[4:]]
    assert site_blocks(names, 5) == [[n] for n in names]
    with pytest.raises(UserError, match="5 site.*6 processes"):
        site_blocks(names, 6)


def test_single_process_group_collectives_are_identities() -> None:
    assert ProcessGroup(0, 1) == SINGLE and SINGLE.is_main
    assert SINGLE.broadcast({"x": 1}) == {"x": 1} and SINGLE.gather(3) == [3]


_ALONE: dict[str, Path] = {}


def alone(archs: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The worker's run of ``archs`` in this one process (trained once per test session)."""
    if archs not in _ALONE:
        out = tmp_path_factory.mktemp("alone")
        train_saes(out, chunks, sae_cfgs(archs.split(",")), TRAIN, {})
        _ALONE[archs] = out
    return _ALONE[archs]


# Every architecture is trained under both ways of sharing that its loss allows: BatchTopK and Matryoshka
# select over the whole batch, so they are shared by sites only.
@pytest.mark.parametrize(
    ("mode", "archs", "atol"),
    [
        ("sites", "topk,topk,topk", 0.0),
        ("data", "topk,topk,topk", 1e-4),
        ("sites", "batchtopk,matryoshka,hierarchical", 0.0),
        ("data", "hierarchical,kron,jumprelu", 1e-4),
    ],
)
def test_two_ranks_match_one_process_and_resume_in_one(
    mode: str, archs: str, atol: float, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    cfgs = sae_cfgs(archs.split(","))
    want = json.loads((alone(archs, tmp_path_factory) / METRICS_FILE).read_text())
    # dead latents and AuxK in play, so the shared dead-latent counters matter
    assert any(want["sites"][site]["aux_loss"] > 0.01 for site in cfgs), want
    shared = tmp_path / "shared"
    result = torchrun(str(WORKER), str(shared), mode, archs)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_saes(saes_of(shared, SITES), saes_of(alone(archs, tmp_path_factory), SITES), atol)
    got = json.loads((shared / METRICS_FILE).read_text())
    assert list(got["sites"]) == list(SITES) and got["steps"] == TRAIN.steps
    for site in SITES:  # the logged statistics are those of whole batches
        for key, value in want["sites"][site].items():
            assert got["sites"][site][key] == pytest.approx(value, rel=atol, abs=atol), (site, key)
    assert not (shared / CHECKPOINT).exists()

    # Killed when chunk 2 is due: the checkpoint after chunk 1 holds every site ...
    killed = tmp_path / "killed"
    assert torchrun(str(WORKER), str(killed), mode, archs, "2").returncode != 0
    committed = json.loads((killed / CHECKPOINT / CHECKPOINT_STATE).read_text())
    assert committed["chunk"] == 2 and list(committed["sites"]) == list(SITES)
    files = sorted(entry["file"] for entry in committed["sites"].values())
    assert sorted(p.name for p in (killed / CHECKPOINT).iterdir()) == sorted([*files, CHECKPOINT_STATE])
    # ... and one process resumes it to the uninterrupted result.
    train_saes(killed, chunks, cfgs, TRAIN, {})
    assert_same_saes(saes_of(killed, SITES), saes_of(alone(archs, tmp_path_factory), SITES), atol)


class ScriptedRanks(ProcessGroup):
    """Rank 0 of 2, where rank 1's contributions to ``all_gather_rows`` are scripted."""

    def __init__(self, theirs: list[torch.Tensor]) -> None:
        super().__init__(rank=0, world=2)
        object.__setattr__(self, "theirs", theirs)

    def all_gather_rows(self, rows_ND: torch.Tensor) -> list[torch.Tensor]:
        return [rows_ND, self.theirs.pop(0)]  # type: ignore[attr-defined]


@pytest.mark.parametrize("batches", [5, 1])
def test_dealt_batches_are_reassembled_in_batch_order(batches: int) -> None:
    rows = [torch.full((2 + i, 3), float(i)) for i in range(batches)]  # batch i: 2 + i rows of value i
    mine, theirs = rows[0::2], rows[1::2]  # rank 0 ran batches 0, 2, 4; rank 1 batches 1, 3 (or none)
    scripted = ScriptedRanks([torch.cat(theirs) if theirs else torch.zeros(0, 3)])
    got = _reassemble(mine, [len(t) for t in rows], 3, torch.device("cpu"), scripted)
    assert torch.equal(got, torch.cat(rows))


@pytest.mark.parametrize(("mode", "atol"), [("sites", 0.0), ("data", 1e-4)])
def test_cli_under_torchrun_matches_one_process(
    mode: str, atol: float, tiny_models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 3 model batches per chunk: with --distribute data rank 0 runs two of them and rank 1 one.
    args = [
        "sae", "train", "--model", str(tiny_models["llama"]), "--sites", "layers.*", "--data", "stdlib:docs",
        "--latents", "64", "--k", "4", "--tokens", "1024", "--batch-size", "128", "--context-len", "32",
        "--model-batch-size", "8", "--chunk-batches", "3", "--checkpoint-seconds", "0", "--json",
    ]  # fmt: skip
    code, _, err = run_cli([*args, "--out", str(tmp_path / "alone")], capsys)
    assert code == 0, err
    result = torchrun("-m", "interlayer", *args, "--out", str(tmp_path / "shared"), "--distribute", mode)
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1  # rank 0 alone reports
    sites = ["layers.0", "layers.1", "layers.2"]
    assert sorted(json.loads(summaries[0])["sites"]) == sites
    assert_same_saes(saes_of(tmp_path / "shared", sites), saes_of(tmp_path / "alone", sites), atol)


def test_boost_under_torchrun_matches_one_process(
    tiny_models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``sae boost`` shares each batch between the processes (``--distribute data``, its default): the same
    residual as one process, up to float summation order; the frozen base is bit-identical."""
    from interlayer.sae import build_sae, make_config, save_sae

    base = build_sae(
        make_config("topk", d_in=32, latents=64, k=4, site="layers.1", model=str(tiny_models["llama"]))
    )
    base.initialise_(torch.Generator().manual_seed(0))
    save_sae(base, tmp_path / "base")
    args = [
        "sae", "boost", "--base", str(tmp_path / "base"), "--data", "stdlib:code", "--latents", "16", "--k", "2",
        "--tokens", "1024", "--batch-size", "128", "--context-len", "32", "--model-batch-size", "8",
        "--chunk-batches", "3", "--checkpoint-seconds", "0", "--json",
    ]  # fmt: skip
    code, _, err = run_cli([*args, "--out", str(tmp_path / "alone")], capsys)
    assert code == 0, err
    result = torchrun("-m", "interlayer", *args, "--out", str(tmp_path / "shared"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert len([line for line in result.stdout.splitlines() if line.startswith("{")]) == 1  # rank 0 reports
    shared, alone = saes_of(tmp_path / "shared", ["layers.1"]), saes_of(tmp_path / "alone", ["layers.1"])
    assert_same_saes(shared, alone, atol=1e-4)
    for name, tensor in base.file_tensors().items():
        assert torch.equal(shared["layers.1"][f"base.{name}"], tensor), name


def test_bad_distribution_settings_are_user_errors() -> None:
    with pytest.raises(UserError, match="unknown --distribute 'layers'"):
        check_mode("layers", 128, 2)
    with pytest.raises(UserError, match="--batch-size 127 is not a multiple of 2"):
        check_mode("data", 127, 2)
    check_mode("data", 127, 1)


def test_a_user_error_under_torchrun_is_said_once(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    args = ["sae", "train", "--model", str(tiny_models["llama"]), "--latents", "64", "--k", "4"]
    result = torchrun(
        "-m", "interlayer", *args, "--batch-size", "127", "--distribute", "data", "--out", str(tmp_path)
    )
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        "error: --distribute data splits each batch among 2 processes: --batch-size 127 is not a multiple of 2"
    ]

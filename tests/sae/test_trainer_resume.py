"""Resume edge cases of the trainer: a damaged checkpoint and a data shortfall are user errors, not tracebacks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from interlayer.activations import Chunk
from interlayer.errors import UserError
from interlayer.sae import TopKConfig, TrainConfig, kernels
from interlayer.sae.trainer import CHECKPOINT, CHECKPOINT_STATE, METRICS_FILE, RUN_FILE, train_saes


def chunks_of(data_ND: torch.Tensor, rows: int, stop_after: int | None = None):
    def chunks(start: int):
        for index in range(start, data_ND.shape[0] // rows):
            if stop_after is not None and index > stop_after:
                raise KeyboardInterrupt
            yield Chunk(index, {"s": data_ND[index * rows : (index + 1) * rows]})

    return chunks


DATA = torch.randn(4096, 16, generator=torch.Generator().manual_seed(0))
CFGS = {"s": TopKConfig(d_in=16, latents=32, k=4)}
TRAIN = TrainConfig(tokens=3072, batch_size=256, checkpoint_seconds=0)


def test_damaged_checkpoint_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        train_saes(tmp_path, chunks_of(DATA, 512, stop_after=1), CFGS, TRAIN, {})
    committed = json.loads((tmp_path / CHECKPOINT / CHECKPOINT_STATE).read_text())
    assert committed["chunk"] == 2 and committed["step"] == 4
    assert sorted(p.name for p in (tmp_path / CHECKPOINT).iterdir()) == ["s.000002.safetensors", "state.json"]
    site_file = tmp_path / CHECKPOINT / committed["sites"]["s"]["file"]
    save_file({"x": torch.zeros(1)}, str(site_file))  # valid safetensors, wrong content
    with pytest.raises(UserError, match="checkpoint .* is damaged"):
        train_saes(tmp_path, chunks_of(DATA, 512), CFGS, TRAIN, {})
    site_file.unlink()
    with pytest.raises(UserError, match="checkpoint not found: .*s.000002.safetensors"):
        train_saes(tmp_path, chunks_of(DATA, 512), CFGS, TRAIN, {})
    (tmp_path / CHECKPOINT / CHECKPOINT_STATE).write_text("{")
    with pytest.raises(UserError, match="checkpoint state .* is not valid JSON"):
        train_saes(tmp_path, chunks_of(DATA, 512), CFGS, TRAIN, {})


def test_checkpoint_frequency_may_change_on_resume(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        train_saes(tmp_path, chunks_of(DATA, 512, stop_after=1), CFGS, TRAIN, {})
    metrics = train_saes(tmp_path, chunks_of(DATA, 512), CFGS, TrainConfig(tokens=3072, batch_size=256), {})
    assert metrics["steps"] == 12


def test_data_shortfall_lets_the_same_folder_take_a_smaller_run(tmp_path: Path) -> None:
    big = TrainConfig(tokens=8192, batch_size=256, checkpoint_seconds=1e9)
    with pytest.raises(UserError, match="ran out after 4,096 training tokens"):
        train_saes(tmp_path, chunks_of(DATA, 512), CFGS, big, {})
    assert not (tmp_path / RUN_FILE).exists()
    assert train_saes(tmp_path, chunks_of(DATA, 512), CFGS, TRAIN, {})["tokens"] == 3072


def test_the_pre_activation_workspace_is_freed_after_training(tmp_path: Path) -> None:
    held: list[int] = []
    train_saes(
        tmp_path,
        chunks_of(DATA, 512),
        CFGS,
        TRAIN,
        {},
        on_step=lambda _step, _s: held.append(sum(t.numel() for t in kernels._WORKSPACE.values())),
    )
    assert min(held) >= TRAIN.batch_size * CFGS["s"].latents  # held while training
    assert kernels._WORKSPACE == {}  # released at the end


def test_a_run_of_interlayer_0_1_returns_its_metrics_or_refuses_to_resume(tmp_path: Path) -> None:
    """0.1 recorded format-1 SAE configs and no data seed; a finished run still returns its metrics, an
    unfinished one cannot resume to the same result (the data order changed) and says so."""
    source = {
        "data": "corpus",
        "plan": {"context_len": 128, "batch_size": 32, "batches_per_chunk": 8, "mix_chunks": 4},
    }
    source["data_seed"] = 0  # what a model source records today; 0.1 recorded neither this nor mix_chunks
    done = train_saes(tmp_path / "new", chunks_of(DATA, 512), CFGS, TRAIN, source)
    settings = json.loads((tmp_path / "new" / RUN_FILE).read_text())
    del settings["data_seed"], settings["plan"]["mix_chunks"]
    for cfg in settings["saes"].values():
        cfg["version"] = 1
    finished, unfinished = tmp_path / "finished", tmp_path / "unfinished"
    for folder in (finished, unfinished):
        folder.mkdir()
        (folder / RUN_FILE).write_text(json.dumps(settings))
    (finished / METRICS_FILE).write_text(json.dumps(done))
    assert train_saes(finished, chunks_of(DATA, 512), CFGS, TRAIN, source) == done
    (unfinished / CHECKPOINT).mkdir()
    (unfinished / CHECKPOINT / CHECKPOINT_STATE).write_text(json.dumps({"chunk": 2, "step": 4, "sites": {}}))
    with pytest.raises(UserError, match="unfinished run started by interlayer 0.1"):
        train_saes(unfinished, chunks_of(DATA, 512), CFGS, TRAIN, source)
    # today's command with another mixing window is another command, not the 0.1 one
    other = {**source, "plan": {**source["plan"], "mix_chunks": 2}}
    with pytest.raises(UserError, match="holds a run with other settings"):
        train_saes(tmp_path / "new", chunks_of(DATA, 512), CFGS, TRAIN, other)
    settings["train"]["seed"] = 7  # another command entirely is still "other settings"
    (unfinished / RUN_FILE).write_text(json.dumps(settings))
    with pytest.raises(UserError, match="holds a run with other settings"):
        train_saes(unfinished, chunks_of(DATA, 512), CFGS, TRAIN, source)


def test_data_parallel_refuses_batch_coupled_architectures(tmp_path: Path) -> None:
    from interlayer.distributed import ProcessGroup
    from interlayer.sae import make_config

    cfgs = {
        "s": make_config("matryoshka", d_in=16, latents=32, k=4),
        "t": make_config("batchtopk", d_in=16, latents=32, k=4),
    }
    with pytest.raises(UserError, match="--distribute data cannot train batchtopk, matryoshka SAEs"):
        train_saes(
            tmp_path, chunks_of(DATA, 512), cfgs, TRAIN, {}, group=ProcessGroup(0, 2), distribute="data"
        )
    assert not (tmp_path / RUN_FILE).exists()

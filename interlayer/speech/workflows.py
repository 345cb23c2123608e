"""What ``interlayer varan`` runs: load the encoder and the splits, train a run, evaluate a trained run."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from interlayer import atomic
from interlayer.errors import UserError
from interlayer.models import load_model, resolve_model_source
from interlayer.speech.corpus import SpeechSet
from interlayer.speech.datasets import SPLITS, load_speech
from interlayer.speech.model import HeadConfig, VaranModel, set_trainable
from interlayer.speech.synthesis import SAMPLE_RATE
from interlayer.speech.train import VaranTrainConfig, encode, evaluate, train


def load_encoder(model_name: str, device: str) -> tuple[Any, Any]:
    """The speech encoder ``model_name`` (trainable, on ``device``) and its feature extractor; a text model or
    one at another sampling rate is refused in one line."""
    loaded = load_model(model_name, device=device)
    features = loaded.feature_extractor
    rate = int(getattr(features, "sampling_rate", SAMPLE_RATE))
    if rate != SAMPLE_RATE:
        raise UserError(f"model {model_name!r} takes audio at {rate} Hz; interlayer's speech runs at 16 kHz")
    return loaded.model, features


def load_splits(
    data: str,
    sizes: dict[str, int],
    seed: int = 0,
    resample: bool = False,
    label_column: str = "label",
    text_column: str = "text",
    split_names: dict[str, str] | None = None,
) -> dict[str, SpeechSet]:
    """The train, validation and test splits of ``data`` (``sizes[split]`` clips each; 0 = all of a real set)."""
    splits = {}
    for split in SPLITS:
        speech = load_speech(
            data,
            split,
            sizes.get(split, 0),
            seed,
            resample,
            label_column,
            text_column,
            (split_names or {}).get(split),
        )
        if not len(speech):
            raise UserError(f"{data}: the {split} split has no clips")
        splits[split] = speech
    return splits


def train_run(
    out: Path,
    model_name: str,
    data: str,
    cfg: VaranTrainConfig,
    sizes: dict[str, int],
    device: str = "cpu",
    resample: bool = False,
    label_column: str = "label",
    text_column: str = "text",
    split_names: dict[str, str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """``varan train``: fine-tune ``model_name`` on ``data`` into ``out``."""
    model_name = canonical_name(model_name)
    encoder, features = load_encoder(model_name, device)
    splits = load_splits(data, sizes, 0, resample, label_column, text_column, split_names)
    settings = {
        "model": model_name,
        "model_sha256": weights_fingerprint(model_name),
        "data": data,
        "sizes": sizes,
        "resample": resample,
        "columns": [label_column, text_column],
        "split_names": split_names,
        "version": 1,
    }
    return train(out, cfg, model_name, encoder, features, splits, settings, progress)


def canonical_name(model_name: str) -> str:
    """A local folder as an absolute path (a run may be evaluated from elsewhere); other names unchanged."""
    if model_name.startswith("zoo:") or model_name == "minilm" or not Path(model_name).expanduser().exists():
        return model_name
    return str(Path(model_name).expanduser().resolve())


def weights_fingerprint(model_name: str) -> str | None:
    """sha256 over the safetensors files of a local model folder (a zoo entry included), None for a hub id: the
    base a run's trained tensors belong to, checked when the run is loaded again."""
    source, local_only = resolve_model_source(model_name)
    folder = Path(source)
    if not local_only or not folder.is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def load_trained(run: Path, device: str = "cpu") -> tuple[VaranModel, Any, list[str], dict[str, Any]]:
    """The fine-tuned model of a ``varan train`` run folder (or its ``model/`` folder), its feature extractor,
    output names and ``varan.json``."""
    folder = Path(run) / "model" if (Path(run) / "model" / "varan.json").is_file() else Path(run)
    if not (folder / "varan.json").is_file():
        raise UserError(f"{run}: not a varan train run (no model/varan.json)")
    meta = atomic.read_json_object(folder / "varan.json", "varan model")
    stored = meta.get("base_model_sha256")
    if stored is not None and weights_fingerprint(str(meta["base_model"])) != stored:
        raise UserError(
            f"{run}: the base model {meta['base_model']} is not the one this run was trained on (its weights "
            "changed); its heads and adapters would not fit"
        )
    encoder, features = load_encoder(str(meta["base_model"]), device)
    model = VaranModel(encoder, HeadConfig(**meta["head"]), features.return_attention_mask)
    set_trainable(model, str(meta["mode"]), int(meta["lora_rank"]))
    trained = atomic.read_tensors(folder / "trained.safetensors", "trained weights", device)
    expected = {name for name, p in model.named_parameters() if p.requires_grad}
    if set(trained) != expected:
        raise UserError(f"{folder}: trained.safetensors does not match the model its varan.json describes")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in trained:
                if param.shape != trained[name].shape:
                    raise UserError(
                        f"{folder}/trained.safetensors: {name} has shape {tuple(trained[name].shape)}, "
                        f"the model's is {tuple(param.shape)}"
                    )
                param.copy_(trained[name])
    return model.eval().requires_grad_(False), features, list(meta["outputs"]), meta


def evaluate_run(
    run: Path,
    data: str,
    split: str = "test",
    size: int = 0,
    device: str = "cpu",
    resample: bool = False,
    label_column: str = "label",
    text_column: str = "text",
    split_name: str | None = None,
    batch_size: int = 32,
) -> dict[str, Any]:
    """``varan evaluate``: the metrics of a trained run on ``split`` of ``data``."""
    model, features, names, meta = load_trained(run, device)
    speech = load_speech(data, split, size, 0, resample, label_column, text_column, split_name)
    encoded = encode(model.cfg.task, speech, names, split, model.encoder)
    metrics = evaluate(model, features, encoded, names, batch_size, next(model.parameters()).device)
    return {"run": str(run), "data": data, "split": split, "base_model": meta["base_model"]} | metrics

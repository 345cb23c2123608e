"""Train one SAE per site from a shared stream of activation chunks, resumably.

Per step, for a batch x of B rows (scaled by c when normalising, so that E‖c·x‖² = d):
    L = S / Σ‖x − x̄‖²  +  α · min(n_dead / k_aux, 1) · Σ‖e − ê‖² / Σ‖x − x̄‖²  +  P / B,
with S the architecture's reconstruction term (TopK: Σ‖x − x̂‖²; see each architecture's module), e = x − x̂
(detached), ê the AuxK reconstruction from the top k_aux (= d/2) pre-activations (KronSAE: post-latents)
among latents that have not fired for ``dead_tokens`` tokens (architectures without AuxK return none), x̄
the batch mean, α = 1/32, and P the architecture's penalty summed over rows (JumpReLU's λ·L0; 0 for the
others). The loop, the optimiser, checkpoints, dead-latent counters and distributed reductions live here;
nothing in this module depends on the architecture (:class:`~interlayer.sae.base.TrainingOutput` carries
the terms).

Adam with peak lr = 4e-3 · (F / 2^14)^(-1/4) unless given, constant, then linearly to 0 over the last 20% of
the steps. This is measured, not the OpenAI rule 2e-4 / sqrt(F / 2^14), which trains far too slowly on
normalised inputs (E‖x‖² = d) in runs of hundreds of steps, and it trades a little FVU for a healthy
dictionary: on MiniLM layer-3 activations, F = 16,384, 40 steps of 4,096 tokens, lr 8e-3 reached held-out
FVU 0.224 but left 6,147 latents dead, lr 5e-3 0.258 with 282 dead; F = 4,096, 160 steps of 1,024: 2e-4 →
0.43, 3e-3 → 0.190 (93 dead), 5e-3 → 0.177 (792 dead), 1.1e-2 → 0.189 (2,807 dead). See BENCHMARKS.md.
The decoder gradient is projected orthogonal to each unit row before the step, and rows are renormalised
after it. b_dec starts at the mean of the first chunk (a random sample of the first mixing window of
model chunks, see :mod:`interlayer.activations`); the architecture initialises its other parameters.

Checkpoints are taken at chunk boundaries into ``checkpoint/``: one safetensors file per site (parameters,
Adam moments, dead-latent counters), each written atomically under a name carrying the chunk index, then
``state.json`` (run state, and per site its file, input scale and running statistics) is written atomically:
that write is the commit, so a crash at any moment leaves the previous checkpoint whole. Because chunk i
(mixed across its window) and its shuffle depend only on (data, plan, seed, i), a resumed run takes exactly
the steps the uninterrupted one would have. Under ``torchrun`` (:mod:`interlayer.distributed`) each rank writes the files of the sites it
owns and reads back only those, and a checkpoint resumes under any number of processes.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from interlayer.activations import Chunk, check_outlier_norm, inlier_mask, shuffled_rows
from interlayer.atomic import read_json, read_tensors, write_json, write_tensors
from interlayer.distributed import SINGLE, ProcessGroup, check_mode, local_sites
from interlayer.errors import UserError
from interlayer.models import pick_device
from interlayer.sae.architectures import build_sae, sae_class
from interlayer.sae.base import SparseAutoencoder
from interlayer.sae.config import SAEConfig
from interlayer.sae.io import folded_copy, save_sae
from interlayer.sae.kernels import release_workspace

CHECKPOINT = "checkpoint"
"""The checkpoint folder of a run: ``state.json`` (the commit) and one safetensors file per site."""
CHECKPOINT_STATE = "state.json"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.json"


def init_seed(seed: int, site: str) -> int:
    """The generator seed of the SAE at ``site``: the first 63 bits of ``sha256(f"init:{seed}:{site}")``. Each
    site starts from its own random dictionary, so that SAEs of different layers share no features by
    construction (a latent that never trains would otherwise be the same vector at every layer, and SAE Match
    or feature flow would find it "persisting")."""
    return int.from_bytes(hashlib.sha256(f"init:{seed}:{site}".encode()).digest()[:8], "big") >> 1


@dataclass(frozen=True)
class TrainConfig:
    """How SAEs are trained (shared by every site of a run)."""

    tokens: int = 2_000_000
    """Training tokens per SAE (kept tokens only: special tokens never reach the SAE)."""
    batch_size: int = 4096
    """Tokens per optimiser step."""
    lr: float | None = None
    """Peak Adam learning rate; None means 4e-3 · (F / 2^14)^(-1/4) (see the module docstring), F the latents
    being trained (``SAEConfig.trained_latents``: a boosted SAE's newest residual)."""
    lr_decay_fraction: float = 0.2
    """The learning rate decays linearly to 0 over this final fraction of the steps."""
    seed: int = 0
    """Seeds the initialisation (each site its own, :func:`init_seed`) and every chunk's shuffle."""
    aux_alpha: float = 1 / 32
    """Weight of the AuxK loss."""
    k_aux: int | None = None
    """Dead latents used by AuxK per token; None means d_in // 2."""
    dead_tokens: int = 1_000_000
    """A latent is dead after this many tokens without firing."""
    normalise: bool = True
    """Scale inputs so E‖c·x‖² = d_in (c estimated on the first chunk, folded into saved weights)."""
    checkpoint_seconds: float = 120.0
    """Minimum wall time between checkpoints (0: after every chunk)."""
    outlier_norm: float = 0.0
    """Skip tokens whose norm at a site exceeds this × the median token norm of their chunk at that site
    (attention sinks); 0 keeps every token. Must be 0 or above 1."""

    def __post_init__(self) -> None:
        if self.tokens < self.batch_size:
            raise UserError(f"tokens ({self.tokens}) must be at least batch_size ({self.batch_size})")
        if self.batch_size < 2:
            raise UserError(
                f"batch_size must be at least 2 (the loss is normalised by the batch variance), got {self.batch_size}"
            )
        if not 0 <= self.lr_decay_fraction <= 1:
            raise UserError(f"lr_decay_fraction must be in [0, 1], got {self.lr_decay_fraction}")
        if self.lr is not None and not self.lr > 0:
            raise UserError(f"lr must be positive, got {self.lr}")
        check_outlier_norm(self.outlier_norm)

    def lr_for(self, latents: int) -> float:
        return self.lr if self.lr is not None else 4e-3 * (latents / 2**14) ** -0.25

    def lr_factor(self, step: int) -> float:
        """Multiplier of the peak lr at ``step`` (0-based): 1, then linear to 0 over the last fraction."""
        decay_steps = self.lr_decay_fraction * self.steps
        return 1.0 if decay_steps <= 0 else min(1.0, (self.steps - step) / decay_steps)

    @property
    def steps(self) -> int:
        return self.tokens // self.batch_size


class SiteTrainer:
    """One SAE, its optimiser and its dead-latent counters."""

    def __init__(
        self, sae_cfg: SAEConfig, train_cfg: TrainConfig, input_scale: float, device: torch.device
    ) -> None:
        self.cfg = train_cfg
        normalisation = "mean_squared_norm" if train_cfg.normalise else "none"
        self.sae: SparseAutoencoder = build_sae(
            replace(sae_cfg, normalisation=normalisation, input_scale=input_scale)
        ).to(device)
        self.optimizer = torch.optim.Adam(
            self.sae.parameters(), lr=train_cfg.lr_for(sae_cfg.trained_latents), fused=True
        )
        self.since_fired_F = torch.zeros(sae_cfg.latents, dtype=torch.long, device=device)
        self.k_aux = train_cfg.k_aux if train_cfg.k_aux is not None else sae_cfg.d_in // 2

    @classmethod
    def start(
        cls, sae_cfg: SAEConfig, train_cfg: TrainConfig, first_chunk_ND: torch.Tensor, device: torch.device
    ) -> SiteTrainer:
        """A fresh trainer whose input scale and b_dec come from the first chunk of data."""
        scale = 1.0
        if train_cfg.normalise:
            scale = math.sqrt(sae_cfg.d_in / float(first_chunk_ND.pow(2).sum(1).mean().clamp_min(1e-12)))
        trainer = cls(sae_cfg, train_cfg, scale, device)
        trainer.sae.initialise_(
            torch.Generator().manual_seed(init_seed(train_cfg.seed, sae_cfg.site)),
            (first_chunk_ND * scale).mean(0),
        )
        return trainer

    def step(self, x_BD: torch.Tensor, lr: float, shards: ProcessGroup = SINGLE) -> dict[str, float] | None:
        """One optimiser step at learning rate ``lr``; returns the batch's FVU, AuxK loss, L0 and dead fraction,
        or None (and no step) when fewer than 2 rows are left after the outlier filter (no variance to
        normalise by).

        With ``shards`` a group of W ranks, ``x_BD`` is this rank's slice of the batch (possibly empty): the
        row count, the batch mean and Σ‖x − x̄‖² are all-reduced, each rank's loss is its share of the
        whole-batch loss, gradients, firings and active counts are summed over the ranks, so every rank
        takes the same step as one process on the batch.
        """
        rows = int(shards.all_reduce_(torch.tensor([x_BD.shape[0]], device=x_BD.device)).item())
        if rows < 2:
            return None
        x_BD = x_BD * self.sae.cfg.input_scale
        dead_F = self.since_fired_F >= self.cfg.dead_tokens
        out = self.sae.training_forward(x_BD, dead_F, self.k_aux)
        mean_D = shards.all_reduce_(x_BD.sum(0)) / rows
        total_var = shards.all_reduce_((x_BD - mean_D).pow(2).sum())
        loss = out.recon_loss / total_var
        fvu = (out.x_hat_BD.detach() - x_BD).pow(2).sum() / total_var
        aux = torch.zeros((), device=x_BD.device)
        if out.aux_hat_BD is not None:
            residual_BD = (x_BD - out.x_hat_BD).detach()
            aux = (out.aux_hat_BD - residual_BD).pow(2).sum() / total_var
            loss = loss + self.cfg.aux_alpha * min(int(dead_F.sum()) / self.k_aux, 1.0) * aux
        if out.penalty is not None:
            loss = loss + out.penalty / rows
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for param in self.sae.parameters():
            if param.grad is not None:
                shards.all_reduce_(param.grad)
        self.sae.project_decoder_grad_()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.sae.normalise_decoder_()
        fired_F = shards.all_reduce_(out.fired_F.to(torch.uint8), op="max").bool()
        self.since_fired_F += rows
        self.since_fired_F[fired_F] = 0
        fvu_sum, aux_sum, active = shards.all_reduce_(
            torch.stack([fvu.detach(), aux.detach(), torch.tensor(out.active, device=x_BD.device)])
        ).tolist()
        return {
            "fvu": fvu_sum,
            "aux_loss": aux_sum,
            "l0": active / rows,
            "inactive_fraction": float(dead_F.float().mean()),
        }

    def state_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        tensors = {f"{prefix}sae.{name}": t for name, t in self.sae.state_dict().items()}
        tensors[f"{prefix}since_fired"] = self.since_fired_F
        for name, param in self.sae.named_parameters():
            for key, value in self.optimizer.state.get(param, {}).items():
                tensors[f"{prefix}adam.{name}.{key}"] = torch.as_tensor(value)
        return tensors

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], prefix: str) -> None:
        self.sae.load_state_dict(
            {n[len(prefix) + 4 :]: t for n, t in tensors.items() if n.startswith(prefix + "sae.")}
        )
        self.since_fired_F.copy_(tensors[f"{prefix}since_fired"])
        params = dict(self.sae.named_parameters())
        for name, value in tensors.items():
            if name.startswith(prefix + "adam."):  # adam.<parameter name>.<state key>
                param_name, key = name[len(prefix) + 5 :].rsplit(".", 1)
                param = params[param_name]
                self.optimizer.state[param][key] = value.to(param.device, copy=True)


@dataclass
class SiteSummary:
    """Running training statistics of one site (exponential moving averages, weight 0.9)."""

    fvu: float = 1.0
    l0: float = 0.0
    inactive_fraction: float = 0.0
    """Latents that have not fired in the last ``dead_tokens`` training tokens (the set AuxK draws on); not
    the evaluation's ``dead_latents``, which never fired on the whole evaluation set."""
    aux_loss: float = 0.0
    steps: int = 0
    """Optimiser steps taken (a batch emptied by the outlier filter takes none)."""

    def update(self, stats: dict[str, float]) -> None:
        for key, value in stats.items():
            setattr(self, key, value if self.steps == 0 else 0.9 * getattr(self, key) + 0.1 * value)
        self.steps += 1


def train_saes(
    out: str | Path,
    chunks: Callable[[int], Iterator[Chunk]],
    sae_cfgs: dict[str, SAEConfig],
    train_cfg: TrainConfig,
    run_settings: dict[str, object],
    device: str = "cpu",
    on_step: Callable[[int, dict[str, SiteSummary]], None] | None = None,
    group: ProcessGroup = SINGLE,
    distribute: str = "sites",
) -> dict[str, object]:
    """Train one SAE per entry of ``sae_cfgs`` (keyed by site) on ``chunks(start)``, writing into ``out``.

    ``out/<site>/`` gets each SAE folder and ``out/metrics.json`` the run summary. Rerunning on the same
    folder with the same settings resumes from the checkpoint; a finished run returns its summary at once.

    Under ``torchrun`` (``group.world`` > 1, see :mod:`interlayer.distributed`) ``out`` must be a folder
    every rank sees; rank 0 writes the shared files (run settings, the checkpoint's commit, metrics). ``distribute="sites"``: this rank trains its block of sites (``chunks`` must hold at least
    those) and ``on_step`` sees those; ``"data"``: every rank trains every site on its slice of each batch
    (``chunks`` must give every rank the same chunks). A checkpoint resumes under any number of processes.
    """
    out = Path(out)
    dev = pick_device(device)
    check_mode(distribute, train_cfg.batch_size, group.world)
    by_site = distribute == "sites"
    coupled = sorted({c.architecture for c in sae_cfgs.values() if sae_class(c.architecture).batch_coupled})
    if not by_site and coupled:
        raise UserError(
            f"--distribute data cannot train {', '.join(coupled)} SAEs (they select over the whole batch, "
            "which no process sees); use --distribute sites"
        )
    local_cfgs = {s: sae_cfgs[s] for s in local_sites(list(sae_cfgs), group, distribute)}
    shards = SINGLE if by_site else group
    per_rank = train_cfg.batch_size // shards.world
    rows = slice(shards.rank * per_rank, (shards.rank + 1) * per_rank)  # this rank's rows of every batch
    # How often checkpoints are written does not change the result, so it may differ on resume; outlier_norm
    # is recorded only when set, so that runs started before it existed still resume.
    recorded = asdict(replace(train_cfg, checkpoint_seconds=0))
    if not train_cfg.outlier_norm:
        del recorded["outlier_norm"]
    saes = {s: c.to_json() for s, c in sae_cfgs.items()}
    settings = json.loads(json.dumps({**run_settings, "train": recorded, "saes": saes}))
    if group.is_main and not (out / RUN_FILE).exists():
        write_json(out / RUN_FILE, settings)
    group.barrier()
    stored = read_json(out / RUN_FILE, "run settings")
    if stored != settings and not _same_command_before_mixing(stored, settings):
        raise UserError(
            f"{out} holds a run with other settings; rerun the same command or choose a new --out"
        )
    if (out / METRICS_FILE).exists():
        if group.is_main:
            shutil.rmtree(out / CHECKPOINT, ignore_errors=True)
        return read_json(out / METRICS_FILE, "run metrics")
    if stored != settings:
        raise UserError(
            f"{out} holds an unfinished run started by interlayer 0.1, which read the data in another order; "
            "it cannot resume to the same result: finish it with interlayer 0.1, or choose a new --out"
        )

    state = {"chunk": 0, "step": 0}
    trainers: dict[str, SiteTrainer] = {}
    summaries = {site: SiteSummary() for site in local_cfgs}
    if checkpoint_exists(out):
        state, trainers, summaries = _resume(out, local_cfgs, train_cfg, dev)
    group.barrier()  # every rank has read the checkpoint before rank 0 may replace it

    try:
        started = time.monotonic()
        last_checkpoint = time.monotonic()
        streamed = 0  # rows of the chunks this session read
        for chunk in chunks(state["chunk"]):
            streamed += chunk.tokens
            missing = set(local_cfgs) - chunk.acts.keys()
            if missing:
                raise UserError(f"the activation stream lacks site(s) {', '.join(sorted(missing))}")
            inliers = {  # only when filtering: otherwise every row is kept and no mask is built
                site: inlier_mask(chunk.acts[site], train_cfg.outlier_norm)
                for site in (local_cfgs if train_cfg.outlier_norm else ())
            }
            if not trainers:
                first = {s: chunk.acts[s][inliers[s]] if s in inliers else chunk.acts[s] for s in local_cfgs}
                trainers = {
                    site: SiteTrainer.start(cfg, train_cfg, first[site].to(dev), dev)
                    for site, cfg in local_cfgs.items()
                }
            chunk_device = next(iter(chunk.acts.values())).device
            for batch_B in shuffled_rows(chunk, train_cfg.batch_size, train_cfg.seed):
                mine_R = batch_B[rows].to(chunk_device)
                for site, trainer in trainers.items():
                    mask_N = inliers.get(site)
                    keep_R = mine_R if mask_N is None else mine_R[mask_N[mine_R]]
                    lr = train_cfg.lr_for(trainer.sae.cfg.trained_latents) * train_cfg.lr_factor(
                        state["step"]
                    )
                    stats = trainer.step(chunk.acts[site][keep_R].to(dev), lr, shards)
                    if stats is not None:
                        summaries[site].update(stats)
                state["step"] += 1
                if on_step is not None:
                    on_step(state["step"], summaries)
                if state["step"] >= train_cfg.steps:
                    break
            state["chunk"] = chunk.index + 1
            if state["step"] >= train_cfg.steps:
                break
            if group.broadcast(time.monotonic() - last_checkpoint >= train_cfg.checkpoint_seconds):
                # by data, every rank holds the same state and rank 0 writes it
                _write_checkpoint(out, trainers, state, summaries, group, owner=by_site or group.is_main)
                last_checkpoint = time.monotonic()
        if state["step"] < train_cfg.steps:
            if group.is_main and not checkpoint_exists(out):
                (out / RUN_FILE).unlink()  # nothing to resume: let the same folder take a smaller run
            used = state["step"] * train_cfg.batch_size
            if used == 0:
                raise UserError(
                    f"the data gave {streamed:,} training tokens, fewer than one batch of {train_cfg.batch_size:,} "
                    "(--batch-size); lower --batch-size and --tokens, or give more data"
                )
            raise UserError(
                f"the data ran out after {used:,} training tokens of the {train_cfg.tokens:,} asked for (one pass; "
                f"each chunk's ragged end of fewer than --batch-size tokens is left out); pass --tokens {used} "
                "or fewer, or give more data"
            )
        for site, trainer in trainers.items():
            if by_site or group.is_main:
                save_sae(folded_copy(trainer.sae), out / site)
        all_summaries: dict[str, SiteSummary] = {}
        for part in group.gather(summaries):
            all_summaries |= part
        metrics: dict[str, object] = {}
        if group.is_main:
            metrics = {
                "steps": state["step"],
                "tokens": state["step"] * train_cfg.batch_size,
                "seconds_this_session": round(time.monotonic() - started, 3),
                "sites": {site: asdict(all_summaries[site]) for site in sae_cfgs},
            }
            write_json(out / METRICS_FILE, metrics)
            shutil.rmtree(out / CHECKPOINT, ignore_errors=True)
        return group.broadcast(metrics)
    finally:
        release_workspace()  # up to batch × latents floats, not needed once training stops


def _same_command_before_mixing(stored: dict[str, object], settings: dict[str, object]) -> bool:
    """Whether ``stored`` run settings are ``settings`` as interlayer 0.1 recorded them: without the data seed
    and mixing window (0.1 read documents in path order) and with format-1 SAE configs."""

    def older(recorded: dict[str, object]) -> dict[str, object]:
        copy = json.loads(json.dumps(recorded))
        copy.pop("data_seed", None)
        copy.pop("mix_chunks", None)
        if isinstance(copy.get("plan"), dict):
            copy["plan"].pop("mix_chunks", None)
        for cfg in copy.get("saes", {}).values():
            cfg.pop("version", None)
        return copy

    return "data_seed" in settings and "data_seed" not in stored and older(stored) == older(settings)


def checkpoint_exists(out: Path) -> bool:
    """Whether ``out`` holds a committed checkpoint."""
    return (out / CHECKPOINT / CHECKPOINT_STATE).is_file()


def _resume(
    out: Path, sae_cfgs: dict[str, SAEConfig], train_cfg: TrainConfig, dev: torch.device
) -> tuple[dict[str, int], dict[str, SiteTrainer], dict[str, SiteSummary]]:
    """Rebuild the run state and the trainers and summaries of ``sae_cfgs`` from the committed checkpoint
    (reading only those sites' files); a damaged checkpoint is a UserError."""
    folder = out / CHECKPOINT
    committed = read_json(folder / CHECKPOINT_STATE, "checkpoint state")
    try:
        state = {"chunk": int(committed["chunk"]), "step": int(committed["step"])}
        trainers, summaries = {}, {}
        for site, cfg in sae_cfgs.items():
            entry = committed["sites"][site]
            trainers[site] = SiteTrainer(cfg, train_cfg, float(entry["input_scale"]), dev)
            trainers[site].load_state_tensors(read_tensors(folder / entry["file"], "checkpoint"), "")
            summaries[site] = SiteSummary(**entry["summary"])
        return state, trainers, summaries
    except (KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise UserError(
            f"the checkpoint {folder} is damaged ({type(exc).__name__}: {exc}); delete it to restart the run"
        ) from None


def _write_checkpoint(
    out: Path,
    trainers: dict[str, SiteTrainer],
    state: dict[str, int],
    summaries: dict[str, SiteSummary],
    group: ProcessGroup,
    owner: bool,
) -> None:
    """Commit a checkpoint of every site; every rank calls it.

    Ranks that ``owner`` their trainers write one file per site, named by the chunk
    (``<site>.<chunk>.safetensors``: weights, Adam moments, dead counters); rank 0 then writes
    ``state.json`` naming those files (the atomic commit) and deletes the files it no longer names. A crash
    before the commit leaves the previous checkpoint whole; no rank ever holds another's tensors.
    """
    folder = out / CHECKPOINT
    entries: dict[str, dict[str, object]] = {}
    if owner:
        folder.mkdir(parents=True, exist_ok=True)
        for site, trainer in trainers.items():
            name = f"{site}.{state['chunk']:06d}.safetensors"
            write_tensors(folder / name, {n: t.cpu() for n, t in trainer.state_tensors("").items()})
            entries[site] = {
                "file": name,
                "input_scale": trainer.sae.cfg.input_scale,
                "summary": asdict(summaries[site]),
            }
    parts = group.gather(entries)
    if not group.is_main:
        return
    for part in parts:
        entries |= part
    write_json(folder / CHECKPOINT_STATE, {**state, "sites": entries})
    named = {str(entry["file"]) for entry in entries.values()} | {CHECKPOINT_STATE}
    for path in folder.iterdir():
        if path.name not in named:  # older checkpoints' files, and temporaries of a crashed write
            path.unlink(missing_ok=True)

"""Train peer libraries' TopK SAEs on the same in-memory activations and report speed and quality.

Each peer is driven through its own training code path:

* **sparsify** (EleutherAI, ``eai-sparsify``): ``sparsify.Trainer`` needs a Hugging Face model (it hooks
  its modules), so :func:`train_sparsify` replays ``Trainer.fit``'s per-step calls for ``loss_fn="fvu"``,
  ``grad_acc_steps=micro_acc_steps=1`` with the library's own objects: ``SparseCoder`` (fused TopK
  encoder), b_dec set to the first batch's mean at step 0, ``set_decoder_norm_to_unit_norm`` before every
  forward, ``forward(dead_mask=..., total_variance=...)``, loss ``fvu + auxk_alpha*auxk_loss +
  multi_topk_fvu/8``, ``remove_gradient_parallel_to_decoder_directions``, optimizer and scheduler steps,
  and the dead-latent token counters; the optimizer is built as ``Trainer.__init__`` builds it.
* **SAELens** (``sae-lens`` v6): ``TopKTrainingSAE`` trained by its own ``SAETrainer.fit`` (the loop
  ``LanguageModelSAETrainingRunner`` uses), fed batches from an iterator (its ``DataProvider`` protocol).

Both get ``train_ND`` in order, in batches of ``batch_size`` (partial last batch dropped), one optimizer step
per batch, and are scored on ``heldout_ND`` by the shared :func:`evaluate`. Thread count is left to the caller.
"""

from __future__ import annotations

import math
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import torch


def cpu_model() -> str:
    """The processor's model name as /proc/cpuinfo gives it (``platform.processor()`` is often empty)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclass
class PeerResult:
    """Throughput and held-out quality of one peer's training run."""

    name: str  # "sparsify" / "sae_lens"
    version: str
    tokens: int  # training tokens consumed
    seconds: float  # wall time of the training loop only
    tokens_per_s: float
    fvu: float  # pooled held-out FVU: sum ||x - xhat||^2 / sum ||x - mean(x)||^2
    l0: float  # mean number of non-zero latents per held-out token


def _batches(train_ND: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """In-order, full batches (views) of ``train_ND``; the partial last batch is dropped."""
    n = train_ND.shape[0] // batch_size
    if n == 0:
        raise ValueError(f"need at least one batch of {batch_size} rows, got {train_ND.shape[0]}")
    return list(train_ND[: n * batch_size].split(batch_size))


@torch.no_grad()
def evaluate(
    fn: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    heldout_ND: torch.Tensor,
    batch_size: int = 4096,
) -> tuple[float, float]:
    """Pooled FVU and mean L0 of ``fn`` on ``heldout_ND``.

    ``fn`` maps a batch ``[B, d]`` to ``(x_hat [B, d], acts)``, where ``acts`` is either the latent
    activations (any shape ``[B, ...]``; non-zeros are counted per row) or a ``[B]`` count of active latents.
    FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, the mean taken over the whole held-out set.
    """
    x_all = heldout_ND.float()
    mean = x_all.mean(0)
    sse = tot = nnz = 0.0
    for x in x_all.split(batch_size):
        x_hat, acts = fn(x)
        sse += (x - x_hat.float()).pow(2).sum().item()
        tot += (x - mean).pow(2).sum().item()
        nnz += (acts.float() if acts.ndim == 1 else (acts != 0).flatten(1).sum(1).float()).sum().item()
    return sse / tot, nnz / x_all.shape[0]


def _result(name: str, ver: str, tokens: int, seconds: float, fvu_l0: tuple[float, float]) -> PeerResult:
    return PeerResult(name, ver, tokens, seconds, tokens / seconds, *fvu_l0)


def train_sparsify(
    train_ND: torch.Tensor,
    heldout_ND: torch.Tensor,
    latents: int,
    k: int,
    batch_size: int,
    lr: float | None,
    seed: int,
    *,
    optimizer: str = "signum",
    auxk_alpha: float = 0.0,
    dead_feature_threshold: int = 10_000_000,
    lr_warmup_steps: int = 1000,
    device: str = "cpu",
) -> PeerResult:
    """Train ``sparsify.SparseCoder`` with ``sparsify.Trainer``'s per-step logic (see module docstring).

    Keyword defaults are sparsify 1.3's ``TrainConfig`` defaults: optimizer ``"signum"`` (schedule-free
    SignSGD, momentum 0.95; lr rule ``5e-3 / sqrt(latents / 2**14)``), ``auxk_alpha=0`` (AuxK off),
    dead threshold 10M tokens. ``optimizer="adam"`` gives its Adam branch (lr rule
    ``2e-4 / sqrt(latents / 2**14)``, linear warm-up over ``lr_warmup_steps`` then linear decay to 0 at
    the last batch; torch Adam, as bitsandbytes is absent on CPU). ``lr=None`` uses the rule. On CUDA the
    clock stops after a device synchronise.
    """
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.sign_sgd import SignSGD
    from transformers import get_linear_schedule_with_warmup

    batches = _batches(train_ND.float(), batch_size)
    torch.manual_seed(seed)
    sae = SparseCoder(
        train_ND.shape[1], SparseCoderConfig(num_latents=latents, k=k), device, dtype=torch.float32
    )
    schedulers: list = []
    if optimizer == "signum":
        pg = dict(params=sae.parameters(), lr=lr or 5e-3 / (sae.num_latents / 2**14) ** 0.5)
        opt = ScheduleFreeWrapper(SignSGD([pg]), momentum=0.95)
        opt.train()
    elif optimizer == "adam":
        pg = dict(params=sae.parameters(), lr=lr or 2e-4 / (sae.num_latents / 2**14) ** 0.5)
        opt = torch.optim.Adam([pg])
        schedulers = [get_linear_schedule_with_warmup(opt, lr_warmup_steps, len(batches))]
    else:
        raise ValueError(f"unsupported sparsify optimizer {optimizer!r}")
    tokens_since_fired = torch.zeros(sae.num_latents, dtype=torch.long, device=device)
    did_fire = torch.zeros(sae.num_latents, dtype=torch.bool, device=device)
    avg_fvu = 0.0

    t0 = time.perf_counter()
    for step, x in enumerate(batches):
        if step == 0:  # Trainer: centre pre-activations at init via the data mean
            sae.b_dec.data = x.mean(0).to(sae.dtype)
        sae.set_decoder_norm_to_unit_norm()
        dead_mask = tokens_since_fired > dead_feature_threshold if auxk_alpha > 0 else None
        total_variance = (x - x.mean(0)).pow(2).sum()
        out = sae(x=x, y=x, dead_mask=dead_mask, total_variance=total_variance)
        did_fire[out.latent_indices.flatten()] = True
        avg_fvu += float(out.fvu.detach())  # Trainer logs it every step (a host sync)
        loss = out.fvu + auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        for s in schedulers:
            s.step()
        with torch.no_grad():
            tokens_since_fired += x.shape[0]
            tokens_since_fired[did_fire] = 0
            did_fire.zero_()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0

    if isinstance(opt, ScheduleFreeWrapper):
        opt.eval()  # Trainer saves (and so ships) the averaged "x" weights

    def fn(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        enc = sae.encode(x)
        return sae.decode(enc.top_acts, enc.top_indices), enc.top_acts

    return _result(
        "sparsify", version("eai-sparsify"), len(batches) * batch_size, seconds, evaluate(fn, heldout_ND)
    )


def train_sae_lens(
    train_ND: torch.Tensor,
    heldout_ND: torch.Tensor,
    latents: int,
    k: int,
    batch_size: int,
    lr: float | None,
    seed: int,
    **trainer_overrides,
) -> PeerResult:
    """Train SAELens' ``TopKTrainingSAE`` with its own ``SAETrainer.fit`` loop.

    SAELens defaults throughout: Adam (betas 0.9/0.999), constant lr (``lr=None`` -> 3e-4), no warm-up,
    grad-norm clipping at 1.0, AuxK coefficient 1.0 with a dead window of 1000 steps, decoder rows
    initialised to norm 0.1 with W_enc = W_dec^T, b_dec = 0, ``rescale_acts_by_decoder_norm=True``, no
    decoder renormalisation, loss = per-token squared error summed over d, mean over the batch.
    ``normalize_activations="none"``. ``trainer_overrides`` go to ``SAETrainerConfig``.
    """
    import sae_lens
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    batches = _batches(train_ND.float(), batch_size)
    torch.manual_seed(seed)
    cfg = TopKTrainingSAEConfig(d_in=train_ND.shape[1], d_sae=latents, k=k, normalize_activations="none")
    sae = TopKTrainingSAE(cfg)
    tcfg = SAETrainerConfig(
        total_training_samples=len(batches) * batch_size,
        train_batch_size_samples=batch_size,
        **({"lr": lr} if lr is not None else {}),
        **trainer_overrides,
    )
    if tcfg.lr_end is None:  # LanguageModelSAERunnerConfig.__post_init__ default
        tcfg.lr_end = tcfg.lr / 10
    data: Iterator[torch.Tensor] = iter(batches)
    trainer = SAETrainer(cfg=tcfg, sae=sae, data_provider=data)

    t0 = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - t0
    assert trainer.n_training_steps == len(batches)

    sae.eval()

    def fn(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        acts = sae.encode(x)
        return sae.decode(acts), acts

    return _result(
        "sae_lens", sae_lens.__version__, len(batches) * batch_size, seconds, evaluate(fn, heldout_ND)
    )


def dense_matmul_tokens_per_s(d: int, latents: int, batch_size: int, repeats: int = 5) -> float:
    """Machine bound for the encoder product: ``batch_size / best_seconds`` of a ``[B, d] @ [d, F]`` fp32 matmul."""
    a, w = torch.randn(batch_size, d), torch.randn(d, latents)
    out = torch.empty(batch_size, latents)
    for _ in range(2):
        torch.mm(a, w, out=out)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, w, out=out)
        best = min(best, time.perf_counter() - t0)
    return batch_size / best

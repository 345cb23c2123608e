"""Training-step time of LIMe against the Llama baseline of the same shape, measured alternately.

Both models are built from one seed (LIMe loads Llama's weights and draws its routers); each round runs one full
training step (forward, backward, AdamW) of each on the same random token batch, so that drifts of a shared
machine hit both alike; the ratio of the median step times is LIMe's overhead. Runs on any device (``--dtype
bfloat16`` uses autocast on CUDA).

    python benchmarks/lime_step_time.py [--layers 16] [--d-model 128] [--heads 4] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace

import torch


def step_times(
    cfg: object, vocab: int, steps: int, device: str = "cpu", dtype: str = "float32"
) -> dict[str, float]:
    """Median seconds per training step of LIMe and Llama (``cfg``: a LimeTrainConfig) and LIMe's overhead."""
    from interlayer.lime.train import new_model
    from interlayer.zoo import next_token_loss

    class Vocabulary:  # new_model needs only the vocabulary size and special ids of a tokenizer
        bos_token_id, eos_token_id = 0, 1

        def __len__(self) -> int:
            return vocab

    models = {name: new_model(name, cfg, Vocabulary()).to(device) for name in ("lime", "llama")}  # type: ignore[arg-type]
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-3) for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    generator = torch.Generator().manual_seed(0)
    shape = (cfg.batch_size, cfg.context_len)  # type: ignore[attr-defined]
    autocast = dtype == "bfloat16" and device.startswith("cuda")
    for step in range(steps + 5):
        batch = torch.randint(0, vocab, shape, generator=generator).to(device)
        for name, model in models.items():
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                loss = next_token_loss(model, batch)
            optimizers[name].zero_grad()
            loss.backward()
            optimizers[name].step()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if step >= 5:
                times[name].append(time.perf_counter() - start)
    lime, llama = statistics.median(times["lime"]), statistics.median(times["llama"])
    return {"lime_seconds": lime, "llama_seconds": llama, "overhead": lime / llama - 1}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--context-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args()

    from interlayer.lime.train import LimeTrainConfig

    cfg = replace(
        LimeTrainConfig(),
        layers=args.layers,
        d_model=args.d_model,
        heads=args.heads,
        kv_heads=args.heads,
        intermediate=int(args.d_model * 8 / 3) // 16 * 16,
        context_len=args.context_len,
        batch_size=args.batch_size,
    )
    result = step_times(cfg, args.vocab, args.steps, args.device, args.dtype)
    machine = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"cpu, {torch.get_num_threads()} threads"
    )
    print(json.dumps({**vars(args), "machine": machine, **result}))


if __name__ == "__main__":
    main()

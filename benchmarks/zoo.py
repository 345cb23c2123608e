"""The zoo's figures: each reference model against unigram and bigram baselines, and arith-lm's accuracy.

Builds every registered zoo model that is not cached yet (``interlayer zoo build NAME``), then reads the
manifests: validation loss and perplexity of the model, the add-one unigram and interpolated Kneser–Ney
bigram perplexities on the same validation targets with the same tokenizer, the ratio bigram / model, the
build time, and for arith-lm the greedy accuracy on 500 held-out test problems with its Wilson 95% interval.

    python benchmarks/zoo.py            # writes benchmarks/results/zoo.json and prints the markdown table
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

from interlayer import zoo


def main() -> None:
    rows = []
    for name in zoo.REGISTRY:
        manifest = zoo.read_manifest(zoo.ensure(name))
        rows.append(
            {
                "model": f"zoo:{name}",
                "corpus": manifest["corpus"],
                "parameters": manifest["parameters"],
                "steps": manifest["steps"],
                "train_tokens": manifest["train_tokens"],
                "val_tokens": manifest["val_tokens"],
                "val_loss": manifest["val_loss"],
                "val_ppl": manifest["val_ppl"],
                "unigram_ppl": manifest["unigram_ppl"],
                "bigram_ppl": manifest["bigram_ppl"],
                "bigram_over_model": manifest["bigram_ppl"] / manifest["val_ppl"],
                "build_seconds": manifest["build_seconds"],
                "arith_test": manifest.get("arith_test"),
            }
        )
    out = Path(__file__).parent / "results" / "zoo.json"
    out.parent.mkdir(exist_ok=True)
    machine = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    out.write_text(json.dumps({"machine": machine, "models": rows}, indent=2) + "\n")
    print("| model | corpus | params | steps | train tokens | val loss | val ppl | unigram ppl | bigram ppl "
          "| bigram / model | build |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['corpus']} | {r['parameters'] / 1e6:.2f} M | {r['steps']} | "
            f"{r['train_tokens'] / 1e6:.2f} M | {r['val_loss']:.3f} | {r['val_ppl']:.2f} | "
            f"{r['unigram_ppl']:.1f} | {r['bigram_ppl']:.2f} | {r['bigram_over_model']:.2f}× | "
            f"{r['build_seconds'] / 60:.1f} min |"
        )
    for r in rows:
        if r["arith_test"]:
            t = r["arith_test"]
            print(
                f"\n{r['model']}: {t['correct']}/{t['total']} = {t['correct'] / t['total']:.1%} held-out problems "
                f"solved (greedy), Wilson 95% CI [{t['ci_low']:.1%}, {t['ci_high']:.1%}]"
            )


if __name__ == "__main__":
    main()

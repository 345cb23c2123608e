#!/usr/bin/env bash
# The GPU check, one call on a CUDA machine, under 8 minutes: the test suite with the SAE tests on the GPU,
# then the GPU benchmarks (step time and memory of each architecture; TopK, BatchTopK and HierarchicalTopK
# training against sparsify on the same activations; LIMe's step-time overhead over Llama at 16 layers; four
# samplers' wall times on zoo:code-mdlm). Prints everything; record the tables in BENCHMARKS.md.
#
#   bash benchmarks/gpu_prepare.sh                   # here, once: fills .gpu/ (wheels + fp16 MiniLM)
#   run(command="bash benchmarks/gpu_check.sh", carry=[".gpu"], timeout_s=540)    # on the GPU machine
#   PY=.venv/bin/python bash benchmarks/gpu_check.sh --device cpu --quick        # here: the script end to end
#
# Needs nothing but the working tree and .gpu/ on a machine whose python3 holds torch with CUDA,
# transformers, safetensors, typer, rich, scipy, pytest and triton (see gpu_prepare.sh for what .gpu/ adds).
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda
QUICK=""
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --quick) QUICK="--quick"; shift ;;
    *) echo "gpu_check: unknown argument $1" >&2; exit 2 ;;
  esac
done
PY=${PY:-python3}
if [ -d .gpu/whl ] && ! $PY -c "import sparsify" 2>/dev/null; then  # install what this python lacks
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/interlayer-site \
    .gpu/whl/*.whl || exit 1
  export PYTHONPATH="/tmp/interlayer-site"
fi
export PYTHONPATH=".:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1
export CUBLAS_WORKSPACE_CONFIG=:4096:8  # deterministic cuBLAS for the tests' deterministic mode
[ -d .gpu/minilm ] && export INTERLAYER_MINILM="$PWD/.gpu/minilm"
status=0
echo "== machine"
nvidia-smi -L 2>/dev/null || true
$PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__)"
echo "== tests (SAE tests on $DEVICE)"
tests=(tests)
[ -n "$QUICK" ] && tests=(tests/sae/test_architectures.py tests/sae/test_kernels.py tests/sae/test_trainer_loss.py)
INTERLAYER_TEST_DEVICE="$DEVICE" timeout "${TEST_SECONDS:-240}" $PY -m pytest -q -p no:cacheprovider "${tests[@]}" \
  -o addopts="" -W ignore::UserWarning 2>&1 | tail -25 || status=1
echo "== step time and memory per architecture"
timeout 90 $PY benchmarks/sae_step_cost.py --device "$DEVICE" --rounds 1 $QUICK || status=1
echo "== training against sparsify"
timeout 150 $PY benchmarks/gpu_bench.py --device "$DEVICE" $QUICK 2>&1 | grep -v -e "^Loading weights" -e "Triton not installed" || status=1
echo "== LIMe vs Llama training step on $DEVICE (16 layers)"
lime=(--layers 16 --d-model 512 --heads 8 --context-len 512 --batch-size 16 --dtype bfloat16)
[ -n "$QUICK" ] && lime=(--layers 4 --d-model 64 --heads 2 --context-len 32 --batch-size 4 --steps 3)
timeout 60 $PY benchmarks/lime_step_time.py --device "$DEVICE" "${lime[@]}" || status=1
if [ -d .gpu/zoo/code-mdlm ]; then
  echo "== diffusion samplers on $DEVICE (a few cells of benchmarks/diffusion_samplers.py)"
  cells=(--steps 16,32 --samples 256 --remasker-steps 100)
  [ -n "$QUICK" ] && cells=(--steps 4 --samples 8 --remasker-steps 2)
  timeout 120 $PY benchmarks/diffusion_samplers.py --device "$DEVICE" --denoiser .gpu/zoo/code-mdlm \
    --scorer .gpu/zoo/code-lm --samplers mdlm,remdm-cap,star,gstar --no-ablation "${cells[@]}" \
    --root /tmp/interlayer-diffruns --results /tmp/interlayer-diffresults 2>&1 | grep -e "^|" -e "gen PPL" || status=1
fi
exit $status

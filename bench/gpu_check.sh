#!/usr/bin/env bash
# The checks that need a GPU, in one run (under 10 minutes on one H100); prints the rows for
# bench/RESULTS.md. Install first with `bash .ci/install --gpu` (CUDA torch + flash-attn).
#
#   bash bench/gpu_check.sh [--quick]
#
# 1. tests/test_cuda.py: SDPA core attention on CUDA == megatron's unfused attention; packed ==
#    padded on CUDA (sdpa, and flash-attn's varlen non-causal kernel when installed); an hf-engine
#    step on device=cuda in bf16 == the CPU fp32 step; deepspeed (ZeRO-3) and megatron-core training
#    on device=cuda == the hf engine on CUDA (the quickstart's MNTP step on each engine).
# 2. The CPU parity suites that gate the GPU paths (megatron == HF, packed == padded) on this box.
# 3. MFU of a bf16 bidirectional MNTP step on Llama-3.2-1B shapes (random weights), padded and packed,
#    sdpa and flash_attention_2 (bench/mntp_mfu.py), against this GPU's measured bf16 GEMM peak.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
steps=10
[ "${1:-}" = "--quick" ] && steps=3
echo "== $(date -u +%Y-%m-%d) $(hostname)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" - <<'PY'
import importlib.util, torch
assert torch.cuda.is_available(), "torch has no CUDA here: install with `bash .ci/install --gpu`"
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}) on {torch.cuda.get_device_name()}; "
      f"flash-attn {'installed' if importlib.util.find_spec('flash_attn') else 'NOT installed'}")
PY
echo "== 1. CUDA tests"
"$PY" -m pytest tests/test_cuda.py -q -rs -p no:cacheprovider -o addopts=""
echo "== 2. parity suites (CPU, gloo)"
"$PY" -m pytest tests/test_packing.py tests/test_megatron_attention.py -q -p no:cacheprovider -o addopts=""
echo "== 3. MFU, bf16 MNTP step, Llama-3.2-1B shapes"
attns=(sdpa)
"$PY" -c "import flash_attn" 2>/dev/null && attns+=(flash_attention_2)
echo "| device | model | dtype | attn | batch x len | packed | step s | model TFLOP/s | GEMM peak TFLOP/s | MFU |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for attn in "${attns[@]}"; do
  for pack in "" "--pack"; do
    "$PY" bench/mntp_mfu.py --device cuda --dtype bfloat16 --size 1b --attn "$attn" --batch-size 8 \
      --seq-len 1024 --steps "$steps" $pack | tail -n 1
  done
done

#!/usr/bin/env bash
# Lent-GPU steps for the fused decode step (issue 5), each with its own time cap, JSON and log
# under $OUT (all output also in $OUT/all.log), so a step that times out costs only itself:
#   checks   bf16 checks of every kernel variant (attention splits twice, head argmax), no timings
#   tests    the gpu tests of the fused path (CUDA engine == CPU engine, every attention kernel)
#   e2e124   end to end, llama124m batch 1: fused vs compiled model step vs HF compiled decode
#   e2e1b    end to end, llama1b batch 1: fused vs compiled model step (achieved TB/s)
#   kernels  kernel tables (bf16 checks, GEMVs vs cuBLAS, attention variants vs SDPA), llama124m
#            rows 1 and 8, llama1b rows 1, all inside CUDA graphs
#   rows     GPU time per step of the captured graph, compiled vs fused, llama124m at 1, 4, 8 rows
#            (what fused_decode.MAX_ROWS is set by)
# After the preamble's pip/PYTHONPATH line, with carry [".whl"]:
#   STEPS="tests e2e124 e2e1b" bash benchmarks/inference_fused_decode_gpu.sh
set -u
OUT=${OUT:-/tmp/lmforge_gpu_out}
mkdir -p "$OUT"
STEPS=${STEPS:-"tests e2e124 e2e1b"}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu --format=csv \
  >"$OUT/gpu.txt" 2>&1
E2E="--batch 1 --prompt 32 --new 128 --repeats 2"
SKIP="naive hf hf_static engine engine_int8 engine_unpacked engine_compiled_k1 engine_compiled_unpacked"
SKIP="$SKIP engine_fused_dot engine_fused_head"
run() {  # name cap command...
  local name=$1 cap=$2
  shift 2
  echo "== $name (cap ${cap}s): $*" | tee -a "$OUT/all.log"
  local t0=$SECONDS
  timeout "$cap" "$@" 2>&1 | tee "$OUT/$name.log" | tail -n 40 >>"$OUT/all.log"
  echo "== $name: rc ${PIPESTATUS[0]} after $((SECONDS - t0)) s" | tee -a "$OUT/all.log"
}
for s in $STEPS; do
  case $s in
    tests) run tests "${CAP_TESTS:-90}" python3 -m pytest -q -m gpu tests/inference/test_gpu.py -k fused ;;
    e2e124) run e2e124 "${CAP_E2E124:-150}" python3 benchmarks/inference_decode.py --shape llama124m $E2E \
      --skip $SKIP --out "$OUT/e2e124.json" ;;
    e2e1b) run e2e1b "${CAP_E2E1B:-110}" python3 benchmarks/inference_decode.py --shape llama1b $E2E \
      --skip $SKIP hf_compile ${SKIP1B:-} --out "$OUT/e2e1b.json" ;;
    kernels) run kernels "${CAP_KERNELS:-120}" python3 benchmarks/inference_fused_decode.py --shape llama124m \
      --rows 1 8 --no-step --out "$OUT/kernels.json" ;;
    checks) run checks "${CAP_CHECKS:-45}" env LMFORGE_KERNEL_TUNE=0 python3 benchmarks/inference_fused_decode.py \
      --shape llama124m llama1b --rows 1 3 --check-only --no-step --out "$OUT/checks.json" ;;
    rows) run rows "${CAP_ROWS:-120}" python3 benchmarks/inference_fused_decode.py --shape llama124m --no-kernels \
      --step-rows 1 4 8 --step-variants compiled fused --out "$OUT/rows.json" ;;
    *) echo "unknown step $s" ;;
  esac
done
grep -h -E "^ +1 (hf|engine)|tok/s|passed|failed|Error" "$OUT"/e2e*.log "$OUT/tests.log" 2>/dev/null | tail -n 30

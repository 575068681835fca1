#!/usr/bin/env bash
# One lent-GPU call for the serving-side inference benchmarks, in order of value:
#   serving  HTTP serving, continuous vs static batching (inference_serving_http.py)
#   inloop   the same workload with the clients simulated in the engine loop (inference_serving.py):
#            no HTTP thread, so a gap between the two is the server's, not the engine's (own
#            compilation: ~90 s of its cap on an H100)
#   prefix   prefix-cache prefill (inference_prefix.py)
#   spec     speculative decoding, plain vs n-gram, eager and CUDA-graph target (inference_speculative.py)
#   quant    int8 / int4 decode speed vs bf16 (inference_quant.py --decode), only if STEPS names it
# Each step has its own time cap and writes its JSON under $OUT; all output goes to $OUT/all.log too,
# so a step that times out costs only itself.
#   OUT=/tmp/o SMALL=1 bash benchmarks/inference_serving_gpu.sh          # CPU rehearsal, tiny sizes
#   bash benchmarks/inference_serving_gpu.sh                             # lent GPU ($OUT set there)
# The GPU image (python 3.12) lacks fastapi/uvicorn: their wheels travel in .whl_serve (carry it
# with .whl; add /.whl_serve/ to .git/info/exclude). Fetch them once, here:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl_serve fastapi==0.165.0 starlette==1.10.0 pydantic==2.13.4 \
#     pydantic_core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 uvicorn==0.54.0 \
#     typing_extensions==4.16.0 opentelemetry-api==1.45.2
# Lent-GPU call (carry [".whl", ".whl_serve"]), after the preamble's pip/PYTHONPATH line:
#   STEPS="serving inloop" bash benchmarks/inference_serving_gpu.sh
set -u
OUT=${OUT:-/tmp/lmforge_gpu_out}
mkdir -p "$OUT"
STEPS=${STEPS:-"serving prefix spec"}
if ls .whl_serve/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_serve .whl_serve/*.whl
  export PYTHONPATH=${PYTHONPATH:-$PWD}:/tmp/site_serve
fi
export PYTHONUNBUFFERED=1
log() { echo "$@" | tee -a "$OUT/all.log"; }
step() {  # step NAME CAP_SECONDS COMMAND...
  local name=$1 cap=$2; shift 2
  log "== $name ($(date -u +%H:%M:%S), cap ${cap}s): $*"
  timeout "$cap" "$@" 2>&1 | tee -a "$OUT/all.log"
  log "== $name rc ${PIPESTATUS[0]} ($(date -u +%H:%M:%S))"
}
log "$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo no GPU)"
python3 -c "import torch, fastapi, uvicorn, httpx; print('torch', torch.__version__, 'fastapi', fastapi.__version__,
'uvicorn', uvicorn.__version__, 'httpx', httpx.__version__)" 2>&1 | tee -a "$OUT/all.log"
C=--compile
if [ "${SMALL:-0}" = 1 ]; then
  SERVE="--shape tiny --requests 24 --rate 16 --max-batch 8 --max-prompt 48 --max-new 24 --threads 2"
  PREFIX="--shape small --prefix 64 --suffix 8"; SPEC="--shape tiny --new 16 --prompts 2"
  QUANT="--shape tiny --new 16"; C=
else
  SERVE="--shape llama124m --requests 256 --rate 50 --max-batch 64 --max-prompt 256 --max-new 128"
  PREFIX="--shape llama124m --prefix 1024 --suffix 32"; SPEC="--shape llama124m"
  QUANT="--shape llama124m --new 128"
fi
for s in $STEPS; do
  case $s in
    serving) step serving "${CAP_SERVING:-210}" python3 benchmarks/inference_serving_http.py $SERVE $C \
               --out "$OUT/serving.json" ;;
    inloop) step inloop "${CAP_INLOOP:-150}" python3 benchmarks/inference_serving.py $SERVE $C --rounds 1 \
              --out "$OUT/inloop.json" ;;
    prefix) step prefix "${CAP_PREFIX:-45}" python3 benchmarks/inference_prefix.py $PREFIX --out "$OUT/prefix.json" ;;
    spec) step spec "${CAP_SPEC:-170}" python3 benchmarks/inference_speculative.py $SPEC --batch 1 4 $C \
            --variants plain ngram plain_graph ngram_graph --out "$OUT/spec.json" ;;
    quant) step quant "${CAP_QUANT:-150}" python3 benchmarks/inference_quant.py --decode $QUANT --batch 1 64 $C \
             --out "$OUT/quant.json" ;;
  esac
done

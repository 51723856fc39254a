#!/usr/bin/env bash
# The checks that need an accelerator, in one go (CI has none): the GPU-only tests, a short run of the tiny
# config end to end (train + sample) with `auto` dtype and attention, and the train-step benchmark against
# PyTorch on the same chip with attention auto (cuDNN on GPUs) and xla. Output is tee'd to $LOG_DIR
# (default runs/accelerator-check). Knobs: STEPS (tiny run), SHAPE (benchmark flags).
#
#     PYTHON=.venv/bin/python bash tools/accelerator_check.sh
set -u
PY=${PYTHON:-python3}
LOG=${LOG_DIR:-runs/accelerator-check}
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1 LMJAX_CACHE_DIR=${LMJAX_CACHE_DIR:-/tmp/lmjax-accel-cache}
section() { echo; echo "=== $1 ($(date +%T))"; }

section versions
$PY -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__); print(jax.devices())" 2>&1 | tee "$LOG/versions.txt"

section "accelerator tests"
timeout 240 $PY -m pytest -p no:warnings -q tests/test_attention.py -k "cudnn or blockwise_equals or tiny_model" 2>&1 | tee "$LOG/tests.txt" | tail -15

section "tiny config end to end"
timeout 300 $PY -m lmjax.cli train --config configs/tiny.py --workdir /tmp/accel-tiny --config.train.steps=${STEPS:-400} 2>&1 | tee "$LOG/train.txt" | grep -E "auto|attention|step=|val_bpb|Error|error" | tail -25
timeout 60 $PY -m lmjax.cli sample --workdir /tmp/accel-tiny --prompt "Return the" 2>&1 | tail -5

SHAPE=${SHAPE:---family gpt2 --d-model 768 --layers 12 --seq-len 1024 --batch 16 --vocab 50304}
section "train step vs PyTorch, attention=auto"
timeout 300 $PY tools/bench/train_throughput.py $SHAPE 2>&1 | tee "$LOG/bench-auto.txt" | tail -9
section "train step, attention=xla"
timeout 200 $PY tools/bench/train_throughput.py $SHAPE --attention xla --no-hf 2>&1 | tee "$LOG/bench-xla.txt" | tail -4

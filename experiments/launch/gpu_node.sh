#!/usr/bin/env bash
# The quickstart's recipe at accelerator scale on one node of 8 GPUs (80 GB each): prepare a web corpus,
# pretrain configs/llama_1b.py, chat-tune it, evaluate on held-out questions, serve the demo, and turn the
# demo's ratings into a DPO run. One process drives all 8 GPUs; the mesh is FSDP over the 8.
#
# What `lmjax plan` says for this config and mesh (any machine, no GPU needed):
#   .venv/bin/lmjax plan --config configs/llama_1b.py --devices 8 --device-memory-gb 80 \
#       --config.mesh.data=1 --config.mesh.fsdp=8 --config.train.grad_accum=4
#
#   parameters:           1,235,814,400 (1.236 B)
#   mesh:                 {'data': 1, 'fsdp': 8, 'tensor': 1}; batch shards: 8
#   batch:                256 sequences x 2048 tokens per step = 4 x micro-batch of 64 (8 sequences per batch shard)
#   model.remat:          full
#   training FLOPs/token: 8.220e+09 (without recomputation)
#   training FLOPs/step:  5.189e+15 (including remat's recomputation; 6.487e+14 per device)
#   per device:
#     parameters                0.618 GB
#     gradients                 0.618 GB
#     gradient accumulator      0.618 GB
#     optimizer state           1.236 GB
#     activations (estimate)   36.510 GB (one micro-batch, remat=full)
#     total                    39.599 GB (weights, gradients and Adam state unsharded: 19.773 GB)
#   by model.remat (activations are an estimate; see lmjax/train/plan.py:activation_bytes):
#     remat      activations     total   FLOPs/step
#     nothing     150.991 GB  154.1 GB   4.310e+15
#     dots         47.079 GB   50.2 GB   4.450e+15
#     full         36.510 GB   39.6 GB   5.189e+15
#   fits 80 GB per device: yes (39.6 GB needed)
#   largest train.batch_size that fits (grad_accum=4, remat=full): 512 sequences (16 per batch shard)
#
# Needs: `make quickstart` once (the venv), then `.venv/bin/pip install -c requirements.lock 'jax[cuda12]'`,
# Parquet shards of a text dataset in /data/web/ and chat conversations as JSONL in /data/chat/ (see configs).
# The web and stdlib corpora are prepared (cleaned, deduplicated) each on its own, then mixed 98:2 by documents
# into token shards with the web corpus's tokenizer (configs/data/web.py says why).
set -euo pipefail
LMJAX=.venv/bin/lmjax
MESH="--config.mesh.data=1 --config.mesh.fsdp=8"

$LMJAX data prepare --config configs/data/web.py --out /data/prepared/web
$LMJAX data prepare --config configs/data/stdlib.py --out /data/prepared/stdlib
# Token shards of the mixture, cut for llama_1b's seq_len: training reads them record by record.
$LMJAX data tokenize --source 'mix/cycle:/data/prepared/web@0.98|/data/prepared/stdlib@0.02' \
  --val /data/prepared/web:val --tokenizer /data/prepared/web/tokenizer --seq-len 2048 --workers 16 \
  --out /data/tokens/web-mix-2048
$LMJAX train --config configs/llama_1b.py --workdir runs/llama_1b $MESH --config.train.grad_accum=4 \
  --config.model.vocab_size=0 --config.data.train=/data/tokens/web-mix-2048 \
  --config.data.val=/data/tokens/web-mix-2048:val
$LMJAX train --config configs/sft_1b.py --config.init_from=runs/llama_1b --workdir runs/sft_1b $MESH \
  --config.model.vocab_size=0 --config.data.train='chat:/data/chat/*.jsonl'
$LMJAX eval chat --workdir runs/llama_1b
$LMJAX eval chat --workdir runs/sft_1b
$LMJAX demo --workdir runs/sft_1b --host 0.0.0.0 --port 7860 &   # users rate replies; Ctrl+C when enough
read -r -p "press Enter when enough ratings are in (runs/sft_1b/feedback.sqlite) " _
kill %1
$LMJAX feedback export --workdir runs/sft_1b --out runs/sft_1b/prefs.jsonl
$LMJAX train --config configs/dpo_1b.py --config.init_from=runs/sft_1b --workdir runs/dpo_1b $MESH \
  --config.model.vocab_size=0 --config.data.train=pairs:runs/sft_1b/prefs.jsonl

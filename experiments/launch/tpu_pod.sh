#!/usr/bin/env bash
# Pretrain configs/llama_7b.py on a Cloud TPU pod slice with 256 chips (e.g. v4-512: 256 chips, 32 GB HBM
# each, 64 hosts of 4 chips), FSDP over all 256 chips. Nothing in the code changes: every host runs the
# same `lmjax train`; JAX detects the pod (process count, index, coordinator) by itself, each host reads
# its own loaders' share of the data, and Orbax writes the checkpoint collectively.
#
# What `lmjax plan` says for this config and mesh (any machine, no TPU needed):
#   .venv/bin/lmjax plan --config configs/llama_7b.py --devices 256 --device-memory-gb 32
#
#   parameters:           6,738,415,616 (6.738 B)
#   mesh:                 {'data': 1, 'fsdp': 256, 'tensor': 1}; batch shards: 256
#   batch:                1024 sequences x 4096 tokens per step = 4 x micro-batch of 256 (1 sequences per batch shard)
#   model.remat:          full
#   training FLOPs/token: 4.609e+10 (without recomputation)
#   training FLOPs/step:  2.445e+17 (including remat's recomputation; 9.552e+14 per device)
#   per device:
#     parameters                0.105 GB
#     gradients                 0.105 GB
#     gradient accumulator      0.105 GB
#     optimizer state           0.211 GB
#     activations (estimate)   11.339 GB (one micro-batch, remat=full)
#     total                    11.865 GB (weights, gradients and Adam state unsharded: 107.815 GB)
#   by model.remat (activations are an estimate; see lmjax/train/plan.py:activation_bytes):
#     remat      activations     total   FLOPs/step
#     nothing     126.914 GB  127.4 GB   1.933e+17
#     dots         21.091 GB   21.6 GB   2.023e+17
#     full         11.339 GB   11.9 GB   2.445e+17
#   fits 32 GB per device: yes (11.9 GB needed)
#   largest train.batch_size that fits (grad_accum=4, remat=full): 2048 sequences (2 per batch shard)
#
# Needs: a GCS bucket mounted at the same path on every host (gcsfuse), holding the prepared data and
# the run directory (checkpoints must be on storage that all hosts share). Set the variables below.
set -euo pipefail
TPU=${TPU:-lmjax-v4-512}
ZONE=${ZONE:-us-central2-b}
BUCKET=${BUCKET:-my-lmjax-bucket}
MNT=/mnt/lmjax
REPO=${REPO:-https://github.com/YOUR_ORG/lmjax.git}

gcloud compute tpus tpu-vm create "$TPU" --zone "$ZONE" --accelerator-type v4-512 --version tpu-ubuntu2204-base

on_all() { gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "$1"; }

# 1. Install on every host: the repo, a venv with JAX for TPU, and the bucket mounted with gcsfuse.
on_all "git clone $REPO lmjax && cd lmjax && python3.11 -m venv .venv && \
  .venv/bin/pip install -q -c requirements.lock -e . && .venv/bin/pip install -q -c requirements.lock 'jax[tpu]' && \
  sudo mkdir -p $MNT && sudo chown \$USER $MNT && gcsfuse --implicit-dirs $BUCKET $MNT"

# 2. Prepare the corpora once (one host is enough; the shards land in the bucket): the web and stdlib corpora
#    each on its own, then their 98:2 mixture (configs/data/web.py says why) tokenized into token shards for
#    seq_len 4096, which every host reads record by record (its own loaders' indices only).
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=0 --command \
  "cd lmjax && .venv/bin/lmjax data prepare --config configs/data/web.py --out $MNT/data/web && \
  .venv/bin/lmjax data prepare --config configs/data/stdlib.py --out $MNT/data/stdlib && \
  .venv/bin/lmjax data tokenize --source 'mix/cycle:$MNT/data/web@0.98|$MNT/data/stdlib@0.02' \
    --val $MNT/data/web:val --tokenizer $MNT/data/web/tokenizer --seq-len 4096 --workers 32 \
    --out $MNT/data/tokens-4096"

# 3. Train on all hosts at once. Rerunning the same command after a preemption resumes exactly;
#    data.loaders=64 fixes the data order, so the run can also resume on a slice with fewer hosts.
on_all "cd lmjax && .venv/bin/lmjax train --config configs/llama_7b.py --workdir $MNT/runs/llama_7b \
  --config.data.train=$MNT/data/tokens-4096 --config.data.val=$MNT/data/tokens-4096:val --config.data.loaders=64 \
  --config.mesh.data=1 --config.mesh.fsdp=-1 --config.model.vocab_size=0"

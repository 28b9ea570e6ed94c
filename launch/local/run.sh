#!/usr/bin/env bash
# Single node, N processes (CPU or GPU):  launch/local/run.sh N --config configs/X.yaml [key=value ...]
# torchrun sets RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT; pretrain/distributed.py reads them.
# On a machine without CUDA the processes train on CPU with the gloo backend (DS_ACCELERATOR=cpu).
set -euo pipefail
NPROC=${1:?usage: launch/local/run.sh NPROC --config FILE [section.key=value ...]}
shift
PYTHON=${PYTHON:-python}
if ! "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m pretrain train "$@"

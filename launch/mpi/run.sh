#!/usr/bin/env bash
# Pretrain under mpirun (OpenMPI, MPICH, Intel MPI): one rank per GPU (or per CPU slot).
#
#   launch/mpi/run.sh MPIRUN_OPTION ... -- --config configs/X.yaml [section.key=value ...]
#   launch/mpi/run.sh -np 16 --hostfile hosts -- --config configs/bert-large-phase1.yaml
#   launch/mpi/run.sh -np 2 -- --config configs/debug.yaml              (one node)
#
# Everything before `--` goes to mpirun, everything after it to `python -m pretrain train`.
# Each rank derives rank / local rank / world size from the MPI variables (OMPI_COMM_WORLD_*,
# PMI_*, MPI_LOCALRANKID; pretrain/distributed.py).  The rendezvous: with mpi4py installed
# (pip install 'bertforge[mpi]'), rank 0 broadcasts its address and a free port over MPI, so no
# MASTER_ADDR is needed on any number of hosts; without mpi4py, a one-node job uses 127.0.0.1
# and a port derived from the MPI job id, and a multi-node job needs MASTER_ADDR=<host of rank 0>
# (and MASTER_PORT if 29500 is taken) exported here.  Exit status: that of the training (0
# finished, 75 checkpointed after SIGTERM/SIGUSR1: run the same command again to resume).
#
# OpenMPI does not pass the environment to remote hosts by itself: the variables below (and
# every NCCL_*, TORCH_*, GLOO_*, CUDA_*, DS_* one that is set) are forwarded with -x.  MPICH and
# Intel MPI forward the whole environment.  Useful mpirun options: OpenMPI
# `--bind-to none` (or `--map-by ppr:8:node:PE=12`) so the data loader workers are not pinned
# to one core, `--oversubscribe` for more ranks than cores (CPU tests); as root OpenMPI needs
# OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 (set here when run as root).
set -euo pipefail

# ---- environment: every value can be overridden by exporting it first --------------------------
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # see launch/slurm/pretrain.sbatch
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
# the same interpreter on every host (an absolute path: remote shells have another PATH)
PYTHON=$(command -v "${PYTHON:-python}")
if ! "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}   # no GPU here: gloo on CPU
fi
if [[ $(id -u) == 0 ]]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi

mpirun_args=()
while (( $# )) && [[ $1 != -- ]]; do mpirun_args+=("$1"); shift; done
(( $# )) || { echo "usage: $0 MPIRUN_OPTION ... -- --config FILE [section.key=value ...]" >&2; exit 2; }
shift  # the --

MPIRUN=${MPIRUN:-mpirun}
if "$MPIRUN" --version 2>/dev/null | grep -q "Open MPI"; then
  for v in OMP_NUM_THREADS PATH LD_LIBRARY_PATH PYTHONPATH VIRTUAL_ENV MASTER_ADDR MASTER_PORT \
           PYTHONUNBUFFERED PYTHONFAULTHANDLER $(compgen -e | grep -E '^(NCCL|TORCH|GLOO|CUDA|DS)_' || true); do
    [[ -n ${!v+set} ]] && mpirun_args+=(-x "$v")
  done
fi
exec "$MPIRUN" "${mpirun_args[@]}" "$PYTHON" -m pretrain train "$@"

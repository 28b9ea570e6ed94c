"""Who am I in the job?  Rank, local rank, world size and rendezvous address from any launcher.

Read once, at the entry point, from the environment of whatever started us:
  torchrun / DeepSpeed launcher  RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
  SLURM (srun)                   SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, SLURM_JOB_NODELIST, SLURM_JOB_ID
  OpenMPI (mpirun)               OMPI_COMM_WORLD_RANK, OMPI_COMM_WORLD_LOCAL_RANK, OMPI_COMM_WORLD_SIZE
  MPICH / Intel MPI (PMI)        PMI_RANK, PMI_SIZE, MPI_LOCALRANKID
  PMIx                           PMIX_RANK (+ the launcher's size variable)
Explicit MASTER_ADDR / MASTER_PORT always win.  Under SLURM the master is the first host of
the job's node list and the port is derived from the job id, so every task agrees without
talking.  Under MPI without MASTER_ADDR, rank 0's address is broadcast with mpi4py when present.
"""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from typing import Mapping, Optional

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm", "openmpi", "pmi", "pmix" or "single"

    def export(self, environ: Optional[dict] = None) -> None:
        """Write the torch.distributed variables so init_process_group(init_method='env://') works."""
        env = os.environ if environ is None else environ
        env.update(RANK=str(self.rank), LOCAL_RANK=str(self.local_rank), WORLD_SIZE=str(self.world_size),
                   MASTER_ADDR=self.master_addr, MASTER_PORT=str(self.master_port))


def _int(env: Mapping[str, str], *names: str) -> Optional[int]:
    for name in names:
        value = env.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"environment variable {name}={value!r} is not an integer") from None
    return None


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list: 'gpu[003-005,010],cpu1' -> 'gpu003'; 'a,b' -> 'a'."""
    nodelist = nodelist.strip()
    match = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if not match:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    prefix, _, ranges = match.groups()
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def slurm_port(job_id: Optional[int]) -> int:
    """A port every task of one job computes alike, spread so concurrent jobs rarely collide."""
    return DEFAULT_PORT if job_id is None else 20000 + job_id % 20000


def detect(env: Optional[Mapping[str, str]] = None) -> DistEnv:
    """Derive the distributed identity from ``env`` (default: os.environ); pure given its input."""
    env = os.environ if env is None else env
    addr, port = env.get("MASTER_ADDR"), _int(env, "MASTER_PORT")
    if _int(env, "RANK") is not None and _int(env, "WORLD_SIZE") is not None:
        launcher = "torchrun"
        rank, size = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local = _int(env, "LOCAL_RANK") or 0
    elif _int(env, "OMPI_COMM_WORLD_RANK") is not None:
        launcher = "openmpi"
        rank, size = _int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE")
        local = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK") or 0
    elif _int(env, "PMI_RANK") is not None:
        launcher = "pmi"
        rank, size = _int(env, "PMI_RANK"), _int(env, "PMI_SIZE")
        local = _int(env, "MPI_LOCALRANKID", "PALS_LOCAL_RANKID") or 0
    elif _int(env, "PMIX_RANK") is not None and _int(env, "SLURM_PROCID") is None:
        launcher = "pmix"
        rank = _int(env, "PMIX_RANK")
        size = _int(env, "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "PMI_SIZE")
        local = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", "PMIX_LOCAL_RANK") or 0
    elif _int(env, "SLURM_PROCID") is not None:
        launcher = "slurm"
        rank, size = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS", "SLURM_NPROCS")
        local = _int(env, "SLURM_LOCALID") or 0
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        addr = addr or (first_host(nodelist) if nodelist else None)
        port = port or slurm_port(_int(env, "SLURM_JOB_ID", "SLURM_JOBID"))
    else:
        return DistEnv(0, 0, 1, addr or "127.0.0.1", port or DEFAULT_PORT, "single")
    if size is None:
        raise ValueError(f"{launcher}: found a rank ({rank}) but no world size in the environment")
    if not 0 <= rank < size:
        raise ValueError(f"{launcher}: rank {rank} is outside world size {size}")
    return DistEnv(rank, local, size, addr or "", port or DEFAULT_PORT, launcher)


def resolve_master_addr(dist_env: DistEnv) -> DistEnv:
    """Fill in a missing master address: MPI broadcast of rank 0's host when mpi4py is present,
    else localhost for single-node runs.  Multi-node MPI without mpi4py needs MASTER_ADDR."""
    if dist_env.master_addr:
        return dist_env
    addr = None
    if dist_env.launcher in ("openmpi", "pmi", "pmix"):
        try:
            from mpi4py import MPI
        except ImportError:
            MPI = None
        if MPI is not None:
            host = socket.gethostbyname(socket.gethostname()) if dist_env.rank == 0 else None
            addr = MPI.COMM_WORLD.bcast(host, root=0)
    if addr is None:
        if dist_env.launcher != "single" and not single_node(os.environ, dist_env.world_size):
            raise RuntimeError(f"{dist_env.launcher}: {dist_env.world_size} ranks over several nodes and no "
                               "MASTER_ADDR: export MASTER_ADDR=<first host> or install mpi4py "
                               "(pip install 'bertforge[mpi]') so rank 0's address is broadcast")
        addr = "127.0.0.1"
    return DistEnv(dist_env.rank, dist_env.local_rank, dist_env.world_size, addr, dist_env.master_port,
                   dist_env.launcher)


def single_node(env: Mapping[str, str], world_size: int) -> bool:
    """True when every rank runs on this host (the launchers' local-size variables say so)."""
    local_size = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "LOCAL_WORLD_SIZE",
                      "SLURM_NTASKS_PER_NODE")
    return local_size is None or local_size >= world_size

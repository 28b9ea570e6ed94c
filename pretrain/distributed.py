"""Who am I in the job?  Rank, local rank, world size and rendezvous address from any launcher.

Read once, at the entry point, from the environment of whatever started us:
  torchrun / DeepSpeed launcher  RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
  SLURM (srun)                   SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, SLURM_JOB_NODELIST, SLURM_JOB_ID
  OpenMPI (mpirun)               OMPI_COMM_WORLD_RANK, OMPI_COMM_WORLD_LOCAL_RANK, OMPI_COMM_WORLD_SIZE
  MPICH / Intel MPI (PMI)        PMI_RANK, PMI_SIZE, MPI_LOCALRANKID
  MVAPICH2                       MV2_COMM_WORLD_RANK, MV2_COMM_WORLD_SIZE, MV2_COMM_WORLD_LOCAL_RANK
  PMIx                           PMIX_RANK (+ the launcher's size variable)
Explicit MASTER_ADDR / MASTER_PORT always win.  Under SLURM the master is the first host of
the job's node list and the port is derived from the job id, so every task agrees without
talking.  Under MPI without MASTER_ADDR, rank 0 chooses its address (loopback when every rank
is on its node) and a free port and broadcasts them with mpi4py when it is installed; without
mpi4py a one-node job uses 127.0.0.1 and a port derived from the MPI job id, and a multi-node
job needs MASTER_ADDR.
"""
from __future__ import annotations

import os
import re
import socket
import sys
import zlib
from dataclasses import dataclass, field, replace
from typing import Iterator, Mapping, Optional

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm", "openmpi", "mvapich", "pmi", "pmix" or "single"
    master_source: str = field(default="", compare=False)
    """Where the master address came from, for the start-up log line."""

    def describe(self) -> str:
        """One line for the log: who launched us and where the ranks meet."""
        where = f" ({self.master_source})" if self.master_source else ""
        return (f"{self.launcher}: rank {self.rank} (local {self.local_rank}) of {self.world_size}, "
                f"master {self.master_addr}:{self.master_port}{where}")

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
    return next(hostnames(nodelist))


def hostnames(nodelist: str) -> Iterator[str]:
    """The hosts of a SLURM node list, in order, as ``scontrol show hostnames`` prints them.

    Items are separated by commas (or whitespace) outside brackets.  An item is literal text and
    bracket groups of comma-separated numbers and ranges: ``n[8-10]`` is n8 n9 n10, ``n[007-010]``
    keeps the width of the lower bound, several groups expand left to right (``a[1-2]-b[3-4]``:
    a1-b3 a1-b4 a2-b3 a2-b4), and text after the last group is a suffix (``node[1-2]-ib``:
    node1-ib node2-ib; SLURM 22.05 itself refuses that form).  Hosts are generated lazily.
    The whole list is checked first: ValueError naming the list and the bad part."""
    parsed = [_parse_item(item, nodelist) for item in _top_level_items(nodelist)]
    if not parsed:
        raise ValueError(f"SLURM node list {nodelist!r} names no host")
    return (host for texts, groups in parsed for host in _combine(texts, groups))


def _parse_item(item: str, nodelist: str) -> tuple[list[str], list[list[tuple[int, int, int]]]]:
    """('a[1-2]-b[3]', ...) -> (['a', '-b', ''], [[(1, 2, 1)], [(3, 3, 1)]])."""
    parts = re.split(r"\[([^\[\]]*)\]", item)  # text, group, text, group, ..., text
    return parts[0::2], [_numbers(group, nodelist) for group in parts[1::2]]


def _top_level_items(nodelist: str) -> list[str]:
    """Split at commas and whitespace outside brackets; empty items are dropped (as SLURM does)."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(nodelist + ","):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth < 0 or depth > 1:
            raise ValueError(f"SLURM node list {nodelist!r}: unbalanced brackets at character {i + 1}")
        if depth == 0 and (ch == "," or ch.isspace()):
            items.append(nodelist[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"SLURM node list {nodelist!r}: '[' without ']'")
    return [item for item in items if item]


def _numbers(group: str, nodelist: str) -> list[tuple[int, int, int]]:
    """(low, high, width) of each number or range of a bracket group ('007-010,12')."""
    out = []
    for part in group.split(","):
        match = re.fullmatch(r"([0-9]+)(?:-([0-9]+))?", part)
        if not match or int(match.group(2) or match.group(1)) < int(match.group(1)):
            raise ValueError(f"SLURM node list {nodelist!r}: bad range {part!r} in [{group}] "
                             "(expected N or N-M with N <= M)")
        low = match.group(1)
        out.append((int(low), int(match.group(2) or low), len(low)))
    return out


def _combine(texts: list[str], groups: list[list[tuple[int, int, int]]]) -> Iterator[str]:
    if not groups:
        yield texts[0]
        return
    for low, high, width in groups[0]:
        for number in range(low, high + 1):
            head = f"{texts[0]}{number:0{width}d}"
            for rest in _combine(texts[1:], groups[1:]):
                yield head + rest


def slurm_port(job_id: Optional[int]) -> int:
    """A port every task of one job computes alike, spread so concurrent jobs rarely collide."""
    return DEFAULT_PORT if job_id is None else 20000 + job_id % 20000


# Variables that name one MPI job and are the same in all of its ranks (OpenMPI 4, PMIx/OpenMPI 5).
MPI_JOB_ID_VARIABLES = ("OMPI_MCA_ess_base_jobid", "PMIX_NAMESPACE")


def mpi_job_port(env: Mapping[str, str]) -> int:
    """A port all ranks of one mpirun derive alike from its job id (default port when none)."""
    for name in MPI_JOB_ID_VARIABLES:
        if env.get(name):
            return 20000 + zlib.crc32(env[name].encode()) % 20000
    return DEFAULT_PORT


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
    elif _int(env, "MV2_COMM_WORLD_RANK") is not None:
        launcher = "mvapich"
        rank, size = _int(env, "MV2_COMM_WORLD_RANK"), _int(env, "MV2_COMM_WORLD_SIZE")
        local = _int(env, "MV2_COMM_WORLD_LOCAL_RANK") or 0
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
        return DistEnv(0, 0, 1, addr or "127.0.0.1", port or DEFAULT_PORT, "single",
                       "MASTER_ADDR" if addr else "single process")
    if size is None:
        raise ValueError(f"{launcher}: found a rank ({rank}) but no world size in the environment")
    if not 0 <= rank < size:
        raise ValueError(f"{launcher}: rank {rank} is outside world size {size}")
    if port is None and launcher in MPI_LAUNCHERS:
        port = mpi_job_port(env)
    source = "MASTER_ADDR" if env.get("MASTER_ADDR") else ("first host of SLURM_JOB_NODELIST" if addr else "")
    return DistEnv(rank, local, size, addr or "", port or DEFAULT_PORT, launcher, source)


MPI_LAUNCHERS = ("openmpi", "mvapich", "pmi", "pmix")


def resolve_master_addr(dist_env: DistEnv, env: Optional[Mapping[str, str]] = None, *,
                        announce: bool = True) -> DistEnv:
    """Fill in a missing master address (MPI launches; the others always have one).

    With mpi4py, rank 0 picks its address (127.0.0.1 when every rank is on its node, else its
    network address, see ``host_address``) and, unless MASTER_PORT is set, a free port, and
    broadcasts both.  Without mpi4py a one-node job uses 127.0.0.1; a multi-node job raises,
    naming the fixes.  Rank 0 prints ``describe()`` to stderr when ``announce``."""
    env = os.environ if env is None else env
    if not dist_env.master_addr:
        dist_env = _mpi_broadcast_master(dist_env, env) or _local_master(dist_env, env)
    if announce and dist_env.rank == 0 and dist_env.world_size > 1:
        print(f"[distributed] {dist_env.describe()}", file=sys.stderr, flush=True)
    return dist_env


def _mpi_broadcast_master(dist_env: DistEnv, env: Mapping[str, str]) -> Optional[DistEnv]:
    if dist_env.launcher not in MPI_LAUNCHERS:
        return None
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    except Exception as err:  # mpi4py 4 raises RuntimeError when it finds no MPI library to load
        print(f"[distributed] mpi4py is installed but unusable ({err}); not broadcasting the master",
              file=sys.stderr, flush=True)
        return None
    chosen = None
    if dist_env.rank == 0:
        addr = "127.0.0.1" if single_node(env, dist_env.world_size) else host_address(env)
        port = _int(env, "MASTER_PORT") or free_port(addr)
        chosen = (addr, port)
    addr, port = MPI.COMM_WORLD.bcast(chosen, root=0)
    if not MPI.Is_finalized():
        # Training talks over torch.distributed only.  Leaving MPI before the data loader forks
        # its workers avoids fork-after-MPI_Init trouble (e.g. with InfiniBand verbs).
        MPI.Finalize()
    return replace(dist_env, master_addr=addr, master_port=port,
                   master_source="rank 0's address and port, broadcast over MPI (mpi4py)")


def _local_master(dist_env: DistEnv, env: Mapping[str, str]) -> DistEnv:
    if dist_env.launcher != "single" and not single_node(env, dist_env.world_size):
        raise RuntimeError(f"{dist_env.launcher}: {dist_env.world_size} ranks over several nodes and no "
                           "MASTER_ADDR: export MASTER_ADDR=<first host> or install mpi4py "
                           "(pip install 'bertforge[mpi]') so rank 0's address is broadcast")
    return replace(dist_env, master_addr="127.0.0.1", master_source="one node, no mpi4py: loopback")


def free_port(addr: str = "127.0.0.1") -> int:
    """A TCP port free on ``addr`` now (the rendezvous binds it moments later)."""
    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def host_address(env: Mapping[str, str]) -> str:
    """This host's IPv4 address for other nodes to reach: the first interface named in
    GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME when set (the one the collectives use), else the
    host name's address unless it is loopback (Debian maps the host name to 127.0.1.1), else the
    first non-loopback interface's address."""
    for variable in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        value = env.get(variable, "")
        if not value or value.startswith("^"):  # NCCL's "^a,b" excludes: it names no interface to use
            continue
        exact, interfaces = value.startswith("="), [name for _, name in socket.if_nameindex()]
        for wanted in value.lstrip("=").split(","):  # NCCL matches prefixes unless "=" comes first
            for name in interfaces:
                if name == wanted or (wanted and not exact and name.startswith(wanted)):
                    try:
                        return interface_address(name)
                    except OSError:
                        continue
        raise RuntimeError(f"{variable}={value}: no such interface with an IPv4 address "
                           f"(interfaces: {', '.join(interfaces)})")
    try:
        addr = socket.gethostbyname(socket.gethostname())
        if not addr.startswith("127."):
            return addr
    except OSError:
        pass
    for _, name in socket.if_nameindex():
        try:
            addr = interface_address(name)
        except OSError:
            continue  # down, or no IPv4 address
        if not addr.startswith("127."):
            return addr
    raise RuntimeError("no non-loopback IPv4 address on this host for the rendezvous: set MASTER_ADDR, "
                       "or GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME to the interface to use")


def interface_address(name: str) -> str:
    """IPv4 address of network interface ``name`` (Linux SIOCGIFADDR); OSError when it has none."""
    import fcntl
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))
    return socket.inet_ntoa(packed[20:24])


def single_node(env: Mapping[str, str], world_size: int) -> bool:
    """True when every rank runs on this host (the launchers' local-size variables say so)."""
    local_size = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "MV2_COMM_WORLD_LOCAL_SIZE",
                      "LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE")
    return local_size is None or local_size >= world_size

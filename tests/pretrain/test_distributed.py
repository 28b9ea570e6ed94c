"""Rank / world / master derivation for every launcher we support."""
import os
import re
import shutil
import subprocess
import sys
import types

import pytest

from pretrain import distributed
from pretrain.distributed import (DistEnv, detect, first_host, host_address, hostnames, mpi_job_port,
                                  resolve_master_addr, slurm_port)


def test_single_process_defaults():
    assert detect({}) == DistEnv(0, 0, 1, "127.0.0.1", 29500, "single")


def test_torchrun():
    env = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"}
    assert detect(env) == DistEnv(3, 1, 4, "10.0.0.1", 1234, "torchrun")


def test_slurm_master_from_nodelist_and_port_from_job_id():
    env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8",
           "SLURM_JOB_NODELIST": "gpu[007-010,012]", "SLURM_JOB_ID": "123456"}
    d = detect(env)
    assert (d.rank, d.local_rank, d.world_size, d.master_addr, d.launcher) == (5, 1, 8, "gpu007", "slurm")
    assert d.master_port == slurm_port(123456) == 20000 + 123456 % 20000


def test_explicit_master_overrides_slurm():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n1,n2",
           "MASTER_ADDR": "head", "MASTER_PORT": "4000"}
    assert (detect(env).master_addr, detect(env).master_port) == ("head", 4000)


@pytest.mark.parametrize("nodelist,host", [("node1", "node1"), ("a,b", "a"), ("x[3-5]", "x3"),
                                           ("gpu[003,007]", "gpu003"), ("rack1-n[10-11],rack2-n1", "rack1-n10"),
                                           ("rack1-node[1-3]-ib", "rack1-node1-ib"), ("a[2-3]-b[07-08]", "a2-b07")])
def test_first_host(nodelist, host):
    assert first_host(nodelist) == host


# Every form, with the hosts `scontrol show hostnames` (SLURM 22.05) prints for it.
SLURM_FORMS = {
    "node1": ["node1"],
    "a,b[1-2],c": ["a", "b1", "b2", "c"],                                  # comma list at top level
    "b,a": ["b", "a"],                                                      # order kept, not sorted
    "n[8-10]": ["n8", "n9", "n10"],                                         # range
    "gpu[007-010,012]": ["gpu007", "gpu008", "gpu009", "gpu010", "gpu012"],  # zero padding, comma inside
    "n[09-11]": ["n09", "n10", "n11"],
    "n[001-3]": ["n001", "n002", "n003"],                                   # width of the lower bound
    "n[1-010]": [f"n{i}" for i in range(1, 11)],
    "a[3,1]": ["a3", "a1"],
    "a[1-2]-b[3-4]": ["a1-b3", "a1-b4", "a2-b3", "a2-b4"],                  # several groups
    "x[1,3-4]y[01-02]": ["x1y01", "x1y02", "x3y01", "x3y02", "x4y01", "x4y02"],
    "a[1-2][3-4]": ["a13", "a14", "a23", "a24"],
    "[1-2]": ["1", "2"],
    "a,,b": ["a", "b"],
    " a,b ": ["a", "b"],
}
# A suffix after the last group: SLURM 22.05 refuses it ("Invalid hostlist"), we expand it.
SUFFIX_FORMS = {
    "rack1-node[1-3]-ib": ["rack1-node1-ib", "rack1-node2-ib", "rack1-node3-ib"],
    "a[1-2]b,c[3]d": ["a1b", "a2b", "c3d"],
}


@pytest.mark.parametrize("nodelist", list(SLURM_FORMS) + list(SUFFIX_FORMS))
def test_hostnames_expands_every_form(nodelist):
    expected = {**SLURM_FORMS, **SUFFIX_FORMS}[nodelist]
    assert list(hostnames(nodelist)) == expected
    assert first_host(nodelist) == expected[0]


def test_hostnames_agree_with_scontrol(tmp_path):
    if not shutil.which("scontrol"):
        pytest.skip("scontrol is not installed")
    conf = tmp_path / "slurm.conf"  # scontrol needs a configuration even to expand a host list
    conf.write_text("ClusterName=t\nSlurmctldHost=localhost\nNodeName=localhost CPUs=1\n"
                    "PartitionName=p Nodes=localhost Default=YES\n")
    env = {**os.environ, "SLURM_CONF": str(conf)}
    for nodelist, expected in SLURM_FORMS.items():
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             env=env, timeout=30).stdout.split()
        assert out == expected == list(hostnames(nodelist)), nodelist


@pytest.mark.parametrize("nodelist,problem", [
    ("", "names no host"), (",", "names no host"), ("a[2-1]", "bad range '2-1'"), ("a[]", "bad range ''"),
    ("a[x]", "bad range 'x'"), ("a[-2]", "bad range '-2'"), ("a[1--2]", "bad range '1--2'"),
    ("a[2-]", "bad range '2-'"), ("a[1-2", "'\\[' without '\\]'"), ("a[1-2]]", "unbalanced brackets"),
    ("a[[1]]", "unbalanced brackets")])
def test_bad_node_lists_name_the_list_and_the_problem(nodelist, problem):
    with pytest.raises(ValueError, match=f"SLURM node list {re.escape(repr(nodelist))}.*{problem}"):
        list(hostnames(nodelist))


def test_hostnames_are_generated_lazily():
    hosts = hostnames("n[0-999999999],m1")
    assert [next(hosts) for _ in range(3)] == ["n0", "n1", "n2"]


def test_openmpi():
    env = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4"}
    assert detect(env) == DistEnv(2, 0, 4, "", 29500, "openmpi")


def test_mpich_pmi():
    env = {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1"}
    assert detect(env) == DistEnv(1, 1, 2, "", 29500, "pmi")


def test_pmix():
    env = {"PMIX_RANK": "1", "PMIX_SIZE": "3"}
    d = detect(env)
    assert (d.rank, d.world_size, d.launcher) == (1, 3, "pmix")


def test_slurm_with_pmix_plugin_is_slurm():
    env = {"PMIX_RANK": "1", "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n1"}
    assert detect(env).launcher == "slurm"


def test_bad_values_are_named():
    with pytest.raises(ValueError, match="RANK='x' is not an integer"):
        detect({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="rank 4 is outside world size 2"):
        detect({"RANK": "4", "WORLD_SIZE": "2"})


@pytest.fixture
def no_mpi4py(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # `from mpi4py import MPI` raises ImportError


@pytest.fixture
def fake_mpi4py(monkeypatch):
    """An mpi4py whose bcast records what the root sends and returns ``fake.from_root`` when set
    (what rank 0 would have sent) -- no MPI library involved."""
    sent = []

    class Comm:
        def bcast(self, value, root=0):
            assert root == 0
            sent.append(value)
            return value if fake.from_root is None else fake.from_root

    fake = types.SimpleNamespace(from_root=None, sent=sent, finalized=False)
    module = types.ModuleType("mpi4py")
    module.MPI = types.SimpleNamespace(COMM_WORLD=Comm(), Is_finalized=lambda: fake.finalized,
                                       Finalize=lambda: setattr(fake, "finalized", True))
    monkeypatch.setitem(sys.modules, "mpi4py", module)
    return fake


def test_mvapich():
    env = {"MV2_COMM_WORLD_RANK": "3", "MV2_COMM_WORLD_SIZE": "4", "MV2_COMM_WORLD_LOCAL_RANK": "1"}
    assert detect(env) == DistEnv(3, 1, 4, "", 29500, "mvapich")


def test_mpi_port_comes_from_the_mpi_job_id_alike_in_every_rank():
    job = {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_MCA_ess_base_jobid": "1025245185"}
    ports = {detect({**job, "OMPI_COMM_WORLD_RANK": str(r)}).master_port for r in (0, 1)}
    assert ports == {mpi_job_port(job)} and 20000 <= mpi_job_port(job) < 40000
    assert mpi_job_port({"OMPI_MCA_ess_base_jobid": "1025245186"}) != mpi_job_port(job)
    assert detect({"PMI_RANK": "0", "PMI_SIZE": "2", "PMIX_NAMESPACE": "ns7"}).master_port == \
        mpi_job_port({"PMIX_NAMESPACE": "ns7"})
    assert detect({**job, "OMPI_COMM_WORLD_RANK": "0", "MASTER_PORT": "4000"}).master_port == 4000


def test_mpi_one_node_without_mpi4py_uses_loopback(no_mpi4py):
    d = resolve_master_addr(DistEnv(1, 1, 2, "", 29500, "openmpi"), {"OMPI_COMM_WORLD_LOCAL_SIZE": "2"})
    assert (d.master_addr, d.master_port) == ("127.0.0.1", 29500)
    assert "loopback" in d.master_source


def test_mpi_multi_node_without_master_or_mpi4py_is_a_clear_error(no_mpi4py):
    with pytest.raises(RuntimeError, match="no MASTER_ADDR.*install mpi4py"):
        resolve_master_addr(DistEnv(3, 1, 4, "", 29500, "openmpi"), {"OMPI_COMM_WORLD_LOCAL_SIZE": "2"})


def test_mpi4py_rank0_broadcasts_loopback_and_a_free_port_on_one_node(fake_mpi4py, capsys):
    d = resolve_master_addr(DistEnv(0, 0, 2, "", 29500, "openmpi"), {"OMPI_COMM_WORLD_LOCAL_SIZE": "2"})
    assert fake_mpi4py.sent == [("127.0.0.1", d.master_port)] and d.master_port > 0
    assert d.master_addr == "127.0.0.1" and "broadcast over MPI" in d.master_source
    assert fake_mpi4py.finalized  # MPI is left before the data loader forks
    assert "[distributed] openmpi: rank 0 (local 0) of 2, master 127.0.0.1:" in capsys.readouterr().err


def test_mpi4py_other_ranks_take_what_rank0_sent(fake_mpi4py, capsys):
    fake_mpi4py.from_root = ("10.9.8.7", 31234)
    d = resolve_master_addr(DistEnv(1, 0, 2, "", 29500, "pmi"), {"MPI_LOCALNRANKS": "1"})
    assert fake_mpi4py.sent == [None]  # only the root chooses
    assert (d.master_addr, d.master_port) == ("10.9.8.7", 31234)
    assert capsys.readouterr().err == ""  # only rank 0 announces


def test_mpi4py_rank0_on_several_nodes_sends_its_network_address(fake_mpi4py, monkeypatch):
    monkeypatch.setattr(distributed, "host_address", lambda env: "127.0.0.1")  # stands for e.g. 10.0.0.5
    resolve_master_addr(DistEnv(0, 0, 4, "", 29500, "openmpi"),
                        {"OMPI_COMM_WORLD_LOCAL_SIZE": "2", "MASTER_PORT": "4321"})
    assert fake_mpi4py.sent == [("127.0.0.1", 4321)]  # an explicit MASTER_PORT is kept


def test_unusable_mpi4py_falls_back_with_a_warning(monkeypatch, capsys):
    module = types.ModuleType("mpi4py")

    def no_library(name):
        raise RuntimeError("cannot load MPI library")

    module.__getattr__ = no_library  # `from mpi4py import MPI` fails as mpi4py 4 does without libmpi
    monkeypatch.setitem(sys.modules, "mpi4py", module)
    d = resolve_master_addr(DistEnv(0, 0, 2, "", 29500, "pmi"), {"MPI_LOCALNRANKS": "2"})
    assert d.master_addr == "127.0.0.1"
    assert "mpi4py is installed but unusable (cannot load MPI library)" in capsys.readouterr().err


def test_explicit_master_is_not_broadcast(fake_mpi4py):
    d = detect({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "9"})
    assert resolve_master_addr(d, announce=False) == d and fake_mpi4py.sent == []


def test_host_address_prefers_the_socket_interface_variables():
    assert host_address({"GLOO_SOCKET_IFNAME": "lo"}) == "127.0.0.1"
    assert host_address({"NCCL_SOCKET_IFNAME": "=lo"}) == "127.0.0.1"
    with pytest.raises(RuntimeError, match="NCCL_SOCKET_IFNAME=nosuch0: no such interface"):
        host_address({"NCCL_SOCKET_IFNAME": "nosuch0"})


def test_host_address_ignores_nccl_exclusions(monkeypatch):
    monkeypatch.setattr(distributed.socket, "gethostbyname", lambda name: "10.0.0.9")
    assert host_address({"NCCL_SOCKET_IFNAME": "^docker0,lo"}) == "10.0.0.9"


def test_host_address_skips_a_loopback_host_name(monkeypatch):
    monkeypatch.setattr(distributed.socket, "gethostname", lambda: "node1")
    monkeypatch.setattr(distributed.socket, "gethostbyname", lambda name: "127.0.1.1")  # Debian's /etc/hosts
    monkeypatch.setattr(distributed.socket, "if_nameindex", lambda: [(1, "lo"), (2, "docker9"), (3, "ib0")])
    addresses = {"lo": "127.0.0.1", "ib0": "10.1.2.3"}

    def interface_address(name):
        if name not in addresses:
            raise OSError("no IPv4 address")
        return addresses[name]

    monkeypatch.setattr(distributed, "interface_address", interface_address)
    assert host_address({}) == "10.1.2.3"
    addresses.pop("ib0")
    with pytest.raises(RuntimeError, match="set MASTER_ADDR"):
        host_address({})


def test_describe_names_the_source():
    d = detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_ID": "7"})
    assert d.describe() == "slurm: rank 0 (local 0) of 2, master n1:20007 (first host of SLURM_JOB_NODELIST)"


def test_export_sets_torch_variables():
    env = {}
    DistEnv(1, 0, 2, "h", 5, "slurm").export(env)
    assert env == {"RANK": "1", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "5"}

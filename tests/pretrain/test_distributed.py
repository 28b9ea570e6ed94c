"""Rank / world / master derivation for every launcher we support."""
import pytest

from pretrain.distributed import DistEnv, detect, first_host, resolve_master_addr, slurm_port


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
                                           ("gpu[003,007]", "gpu003"), ("rack1-n[10-11],rack2-n1", "rack1-n10")])
def test_first_host(nodelist, host):
    assert first_host(nodelist) == host


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


def test_mpi_without_master_falls_back_to_localhost_on_one_node(monkeypatch):
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "2")
    d = resolve_master_addr(DistEnv(1, 1, 2, "", 29500, "openmpi"))
    assert d.master_addr  # mpi4py broadcast (if importable) or 127.0.0.1


def test_mpi_multi_node_without_master_or_mpi4py_is_a_clear_error(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_mpi4py(name, *a, **k):
        if name.startswith("mpi4py"):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_mpi4py)
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "2")
    with pytest.raises(RuntimeError, match="no MASTER_ADDR"):
        resolve_master_addr(DistEnv(3, 1, 4, "", 29500, "openmpi"))


def test_export_sets_torch_variables():
    env = {}
    DistEnv(1, 0, 2, "h", 5, "slurm").export(env)
    assert env == {"RANK": "1", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "5"}

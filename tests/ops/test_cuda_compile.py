"""CI build check of csrc/: every .cu through nvcc for sm_80 and sm_90, every .cpp binding
syntax-checked against the installed torch headers (.ci/compile_cuda.sh).  Needs nvcc, no GPU."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / ".ci" / "compile_cuda.sh"


def _nvcc():
    return os.environ.get("NVCC") or shutil.which("nvcc")


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found: the CUDA compile check needs the CUDA toolkit")
def test_cuda_sources_compile_for_sm80_and_sm90():
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"csrc build check failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    lines = proc.stdout.splitlines()
    for src in sorted(REPO.glob("csrc/*.cu")) + sorted(REPO.glob("csrc/*.cpp")):
        assert any(line.startswith("ok") and f"csrc/{src.name} " in line for line in lines), \
            f"{src.name} was not checked:\n{proc.stdout}"


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found: the CUDA compile check needs the CUDA toolkit")
def test_compile_script_reports_a_build_break(tmp_path):
    """The script must fail (and show the error) when a source does not compile."""
    work = tmp_path / "repo"
    (work / ".ci").mkdir(parents=True)
    (work / "csrc").mkdir()
    shutil.copy(SCRIPT, work / ".ci" / "compile_cuda.sh")
    (work / "csrc" / "broken_kernel.cu").write_text(
        "__global__ void k(float* p) { p[threadIdx.x] = undefined_symbol; }\n")
    proc = subprocess.run(["bash", str(work / ".ci" / "compile_cuda.sh"), "--cu-only"], cwd=work,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL  csrc/broken_kernel.cu" in proc.stdout and "undefined_symbol" in proc.stdout

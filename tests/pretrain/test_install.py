"""A non-editable install (a wheel in a fresh virtual environment, no checkout in sight) runs the demo
and finds the shipped configs by name: configs/ is package data (bertforge_configs), and so is the demo's
corpus (data_prep/assets)."""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A virtual environment with the bertforge wheel; the dependencies from this environment's
    site-packages (a path line, so its editable-install hooks stay out)."""
    root = tmp_path_factory.mktemp("install")
    env = {**os.environ, "BERTFORGE_CUDA_EXT": "0"}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(root / "wheel"), str(REPO)], check=True, env=env, timeout=600, capture_output=True)
    [wheel] = (root / "wheel").glob("bertforge-*.whl")
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True, timeout=300)
    python = root / "venv" / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   timeout=300, capture_output=True)
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "zz_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return root / "venv" / "bin"


def run(bin_dir: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([str(bin_dir / args[0]), *args[1:]], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_the_installed_package_is_the_one_that_runs(installed, tmp_path):
    where = run(installed, tmp_path, "python", "-c", "import pretrain, data_prep; print(pretrain.__file__, data_prep.__file__)")
    assert where.returncode == 0, where.stderr
    assert str(REPO) not in where.stdout and str(installed.parent) in where.stdout


def test_shipped_configs_by_name_and_the_console_scripts(installed, tmp_path):
    shown = run(installed, tmp_path, "bertforge-pretrain", "config", "--config", "bert-base")
    assert shown.returncode == 0, shown.stderr
    assert "hidden_size: 768" in shown.stdout
    assert run(installed, tmp_path, "bertforge-pretrain", "config", "--config", "roberta-base").returncode == 0
    missing = run(installed, tmp_path, "bertforge-data-prep", "run", "--config", "data/nope")
    assert missing.returncode != 0 and "config file not found" in missing.stderr
    version = run(installed, tmp_path, "bertforge-data-prep", "--version")
    assert version.returncode == 0 and version.stdout.startswith("bertforge-data-prep (bertforge) ")


def test_the_demo_runs_from_the_installed_package(installed, tmp_path):
    demo = run(installed, tmp_path, "python", "-m", "pretrain", "demo", "--out", "demo", "training.max_steps=10",
               "logging.progress_bar=false")
    assert demo.returncode == 0, (demo.stdout + demo.stderr)[-4000:]
    assert "fine-tuned dev accuracy" in demo.stdout
    assert (tmp_path / "demo" / "hf" / "config.json").is_file()

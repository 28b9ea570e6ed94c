"""The light install: data_prep runs on a CPU-only prep node without the training stack.

setup.py's base requirements (``pip install .``) are data_prep's imports; torch, DeepSpeed and the
other training libraries come only with the ``[train]`` extra.  ``python -m data_prep`` is run with
those libraries (and pretrain) made unimportable, in the main process and in its shard workers.
"""
from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.data_prep.conftest import REPO, english_docs, write_lines

TRAINING_STACK = ("torch", "deepspeed", "tensorboard", "matplotlib", "transformers", "webdataset", "mpi4py",
                  "pretrain")
DISTRIBUTION_OF = {"yaml": "pyyaml"}   # import name -> distribution name, where they differ

# A meta-path finder ahead of every other: importing one of the blocked top-level names fails.
BLOCKER = f'''
import sys

class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {TRAINING_STACK!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: the light install lacks it)",
                                      name=name)
        return None

sys.meta_path.insert(0, _Blocked())
'''


def setup_kwargs() -> dict:
    """The keyword arguments setup.py passes to setuptools.setup (run with setup() captured)."""
    code = ("import json, runpy, setuptools\n"
            "captured = {}\n"
            "setuptools.setup = lambda **kw: captured.update(kw)\n"
            "runpy.run_path('setup.py')\n"
            "print(json.dumps({k: captured[k] for k in ('install_requires', 'extras_require')}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         env={**os.environ, "BERTFORGE_CUDA_EXT": "0"}, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def requirement_name(spec: str) -> str:
    return re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0].lower()


def third_party_imports(package: Path) -> set[str]:
    """Top-level names of every module imported anywhere in ``package`` (inside functions too),
    less the standard library and the package itself."""
    names = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(alias.name.partition(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.partition(".")[0])
    return names - set(sys.stdlib_module_names) - {package.name}


def test_base_requirements_are_data_preps_imports_and_nothing_of_the_training_stack():
    kwargs = setup_kwargs()
    base = {requirement_name(r) for r in kwargs["install_requires"]}
    needed = {DISTRIBUTION_OF.get(name, name) for name in third_party_imports(REPO / "data_prep")}
    assert needed == base
    assert not base & {"torch", "deepspeed", "tensorboard", "matplotlib"}
    train = {requirement_name(r) for r in kwargs["extras_require"]["train"]}
    assert {"torch", "deepspeed"} <= train
    # make install's `.[dev,mpi]` still installs everything
    assert train <= {requirement_name(r) for r in kwargs["extras_require"]["dev"]}


def data_prep(blocker_dir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker_dir), str(REPO)])}
    return subprocess.run([sys.executable, "-m", "data_prep", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


def test_data_prep_runs_without_torch_deepspeed_or_pretrain(tmp_path):
    blocker_dir = tmp_path / "site"
    blocker_dir.mkdir()
    # sitecustomize runs at start-up of every interpreter with it on PYTHONPATH: spawned workers too
    (blocker_dir / "sitecustomize.py").write_text(BLOCKER)
    probe = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(blocker_dir)}, timeout=120)
    assert "blocked: the light install lacks it" in probe.stderr   # the blocker works

    assert data_prep(blocker_dir, "--help").returncode == 0
    corpus = write_lines(tmp_path / "en.txt", english_docs(80_000))
    tokenizer, shards = tmp_path / "tokenizer", tmp_path / "shards"
    ran = data_prep(blocker_dir, "vocab", "--input", str(corpus), "--vocab-size", "600", "--out", str(tokenizer))
    assert ran.returncode == 0, ran.stderr
    ran = data_prep(blocker_dir, "shards", "--input", str(corpus), "--tokenizer", str(tokenizer),
                    "--out", str(shards), "--seq-len", "64", "--objective", "nsp", "--masking", "static",
                    "--max-predictions", "10", "--text-per-shard-mb", "0.03", "--val-fraction", "0.1",
                    "--workers", "2", "--no-progress")
    assert ran.returncode == 0, ran.stderr
    assert sorted(p.name for p in shards.glob("*.tar"))[:1] == ["train-000000.tar"]
    ran = data_prep(blocker_dir, "verify", str(shards))
    assert ran.returncode == 0, ran.stderr

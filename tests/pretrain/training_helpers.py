"""Shared by the training tests: shards built once per session, and multi-rank launches.

Ranks are started as plain subprocesses with the torch.distributed variables (what torchrun
would set), so the real `python -m pretrain train` entry point runs, with gloo on CPU.
"""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pretrain.distributed import free_port

REPO = Path(__file__).resolve().parents[2]
DEMO_CORPUS = REPO / "data_prep" / "assets" / "demo_corpus_en.txt.gz"

# A model small enough that a 2-rank CPU step takes well under a second.
TINY = [
    "model.vocab_size=2048", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2",
    "model.intermediate_size=64", "training.micro_batch_size=8", "training.global_batch_size=16",
    "training.precision=fp32", "logging.every_steps=1", "logging.progress_bar=false",
    "eval.every_steps=0", "checkpoint.every_steps=1000", "data.num_workers=0",
]


def build_shards(out: Path, masking: str, objective: str = "nsp", lines: int = 1500) -> Path:
    """Tokenizer + shards from the first ``lines`` paragraphs of the bundled corpus, via the CLI."""
    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "corpus.txt"
    with gzip.open(DEMO_CORPUS, "rt", encoding="utf-8") as f:
        corpus.write_text("".join(line for _, line in zip(range(lines), f)), encoding="utf-8")
    config = out / "data.yaml"
    config.write_text(f"""
out: {out}
seed: 7
workers: 1
progress: false
input: {{paths: [{corpus}], format: text}}
vocab: {{vocab_size: 2048, min_frequency: 2}}
shards: {{seq_len: 128, objective: {objective}, masking: {masking}, max_predictions: 20,
          val_fraction: 0.05, text_per_shard_mb: 0.05}}
""")
    proc = subprocess.run([sys.executable, "-m", "data_prep", "run", "--config", str(config)],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def data_overrides(data_root: Path) -> list[str]:
    return [f"data.dir={data_root / 'shards'}", f"data.tokenizer={data_root / 'tokenizer'}"]


@dataclass
class Launch:
    codes: list[int]
    logs: list[str]
    run_dir: Path

    def metrics(self, kind: str = "train") -> list[dict]:
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return []
        return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == kind]

    def losses(self) -> dict[int, float]:
        return {r["step"]: r["train/loss"] for r in self.metrics()}

    def explain(self) -> str:
        return "\n".join(f"--- rank {i} (exit {c})\n{log[-4000:]}" for i, (c, log) in enumerate(zip(self.codes, self.logs)))


def spawn_ranks(argv: list, nproc: int, log_dir: Path, env: dict | None = None) -> tuple[list, list[Path]]:
    """Start `python -m pretrain ARGV...` on ``nproc`` local ranks (gloo on CPU, one thread each), the
    torch.distributed variables set as torchrun would; return (processes, log paths under log_dir)."""
    port = free_port()
    procs, log_paths = [], []
    for rank in range(nproc):
        rank_env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu",
                    "OMP_NUM_THREADS": "1", **(env or {})}
        log_path = log_dir / f"rank{rank}.{port}.log"
        log_paths.append(log_path)
        with open(log_path, "w") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "pretrain", *map(str, argv)], cwd=REPO,
                                          env=rank_env, stdout=log, stderr=subprocess.STDOUT))
    return procs, log_paths


def wait_all(procs: list, timeout: float) -> list[int]:
    """The exit codes of ``procs``; all are killed (code -9) once one outlives ``timeout``."""
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=timeout))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            codes.append(-9)
    return codes


def spawn(run_dir: Path, overrides: list[str], nproc: int = 2, extra_args: list[str] = (),
          config: str = "configs/debug.yaml", env: dict | None = None) -> tuple[list, list[Path]]:
    """Start `python -m pretrain train` on ``nproc`` local ranks; return (processes, log paths)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    return spawn_ranks(["train", "--config", REPO / config, f"logging.run_dir={run_dir}", *overrides, *extra_args],
                       nproc, run_dir, env)


def wait_for_logged_steps(run_dir: Path, steps: int, timeout: float = 180) -> None:
    """Block until metrics.jsonl holds ``steps`` lines (the run is well into training)."""
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= steps:
            return
        time.sleep(0.2)
    raise TimeoutError(f"{metrics} did not reach {steps} lines in {timeout} s")


def launch(run_dir: Path, overrides: list[str], nproc: int = 2, extra_args: list[str] = (),
           config: str = "configs/debug.yaml", timeout: int = 300, env: dict | None = None) -> Launch:
    """Run `python -m pretrain train` on ``nproc`` local ranks; wait for all of them."""
    procs, log_paths = spawn(run_dir, overrides, nproc, extra_args, config, env)
    codes = wait_all(procs, timeout)
    return Launch(codes, [p.read_text() for p in log_paths], run_dir)


def straight_and_resumed(tmp_path: Path, overrides: list[str], stop_after: int, nproc: int = 2):
    """(straight, halted, resumed): a run to the end in ``tmp_path/straight``, and one in ``tmp_path/resumed``
    stopped by --stop-after-step ``stop_after`` (exit 75) then run again to the end.  ``halted`` shares the
    run directory with ``resumed``: its logs are its own, its metrics file is the resumed run's by now."""
    straight = launch(tmp_path / "straight", overrides, nproc)
    assert straight.codes == [0] * nproc, straight.explain()
    halted = launch(tmp_path / "resumed", overrides, nproc, extra_args=["--stop-after-step", str(stop_after)])
    assert halted.codes == [75] * nproc, halted.explain()
    resumed = launch(tmp_path / "resumed", overrides, nproc)
    assert resumed.codes == [0] * nproc, resumed.explain()
    return straight, halted, resumed

"""Copy a training run's local shard directories to node-local disk and print the override that
points the run at the copies (pretrain.sbatch runs it once per node when BERTFORGE_STAGE_SHARDS=1).

    python launch/slurm/stage_shards.py --config X.yaml [section.key=value ...]

Takes the arguments of `python -m pretrain train`.  Every local directory of data.dir or
data.sources is copied to <data.cache_dir>/staged/<16 hex digits of sha256(its absolute path)>/<its
name> (so the source keeps its name in the logs), checked with data_prep's verifier (every
shard's size and sha256 against the manifest, the tokenizer's hash) and renamed into place; a
copy whose manifest equals the source's and that verifies is kept (a requeued job copies nothing
again).  URLs and pipe: sources are left as they are: the loader already keeps their shards in
data.cache_dir.  Progress goes to stderr; on stdout, from
SLURM_PROCID 0 only, the one override (data.dir=... or data.sources=[...], names and weights kept,
so the data fingerprint a checkpoint records is the same), nothing when no directory is local.
Exit status 2 on an invalid config or a data.cache_dir left unset, 1 when a source is no shard
directory or its copy cannot be made or does not verify (a one-line error naming it).
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import socket
import sys
from pathlib import Path

from data_prep.errors import PrepError
from data_prep.report import verify_dir
from data_prep.shards.store import open_store
from pretrain.commands.config import add_config_arguments, load_or_report


def staged_path(cache_dir: str, source_dir: str, name: str) -> Path:
    digest = hashlib.sha256(os.path.abspath(source_dir).encode("utf-8")).hexdigest()[:16]
    return Path(cache_dir) / "staged" / digest / name


def problems_of(directory: Path) -> list[str]:
    """What data_prep's verifier finds wrong with a shard directory (sizes and sha256 only)."""
    try:
        return verify_dir(directory, deep=False)[0]
    except PrepError as err:  # no or an unreadable manifest
        return [str(err)]


def stage(source_dir: str, dst: Path) -> None:
    """Make ``dst`` a verified copy of ``source_dir`` (under a lock: one copier per node and directory)."""
    src, say = Path(source_dir), f"[stage_shards {socket.gethostname()}]"
    if not (src / "manifest.json").is_file():
        raise SystemExit(f"{src}: no manifest.json (expected a shard directory written by "
                         f"`python -m data_prep shards`)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(dst.parent / f".lock-{dst.name}", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (dst / "manifest.json").is_file() and \
                (dst / "manifest.json").read_bytes() == (src / "manifest.json").read_bytes():
            problems = problems_of(dst)
            if not problems:
                print(f"{say} {src} -> {dst}: already staged, verified", file=sys.stderr)
                return
            print(f"{say} {problems[0]}: copying again", file=sys.stderr)
        elif dst.exists():
            print(f"{say} {dst}: its manifest.json is not the source's (rebuilt shards?): copying again",
                  file=sys.stderr)
        for stale in dst.parent.glob(f".tmp-{dst.name}.*"):  # left by a killed copier (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = dst.with_name(f".tmp-{dst.name}.{os.getpid()}")
        try:
            shutil.copytree(src, tmp)
        except (OSError, shutil.Error) as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise SystemExit(f"{src}: copying it to {tmp} failed: {err}") from None
        problems = problems_of(tmp)
        if problems:
            shutil.rmtree(tmp, ignore_errors=True)
            raise SystemExit(f"{src}: the copy in {tmp} does not verify: {problems[0]}")
        shutil.rmtree(dst, ignore_errors=True)
        os.rename(tmp, dst)
        print(f"{say} {src} -> {dst}: copied, verified", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    args, _ = parser.parse_known_args(argv)  # the training's own flags (--stop-after-step) are not ours
    cfg = load_or_report(args, None, announce=False)
    if cfg is None:
        return 2
    if not cfg.data.cache_dir:
        print("error: BERTFORGE_STAGE_SHARDS=1 needs data.cache_dir (a node-local directory to copy the shards to)",
              file=sys.stderr)
        return 2
    sources, staged = cfg.data.source_list(), False
    for source in sources:
        if open_store(source.dir).remote:
            continue
        dst = staged_path(cfg.data.cache_dir, source.dir, source.name)
        stage(source.dir, dst)
        source.dir, staged = str(dst), True
    if staged and os.environ.get("SLURM_PROCID", "0") == "0":
        if cfg.data.dir:
            print(f"data.dir={sources[0].dir}")
        else:
            print("data.sources=" + json.dumps([{"dir": s.dir, "weight": s.weight, "name": s.name} for s in sources]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

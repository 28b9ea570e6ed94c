"""Training from a URL or a ``pipe:`` command: shards served by a real local HTTP server (or printed by
``cat``) train the same model as the same shards read from the directory; a node-local cache serves
later runs; an unreachable server or a truncated shard ends the run with one clear error line, not
a hang."""
from __future__ import annotations

import os
import time

import pytest

from tests.http_server import serve_directory
from tests.pretrain.training_helpers import TINY, build_shards, launch

pytestmark = pytest.mark.slow
NO_PROXY = {"no_proxy": "127.0.0.1", "NO_PROXY": "127.0.0.1"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_shards(tmp_path_factory.mktemp("remote"), "dynamic", lines=600)


def _run(tmp_path, name: str, location: str, extra: list[str] = ()):
    return launch(tmp_path / name, TINY + [f"data.dir={location}", "data.tokenizer=null", "training.max_steps=4",
                                           "data.num_workers=1",
                                           "schedule.warmup_steps=1", *extra], nproc=1, env=NO_PROXY)


def test_training_from_http_matches_the_local_directory_and_the_cache_serves_the_next_run(data, tmp_path):
    local = _run(tmp_path, "local", str(data / "shards"))
    assert local.codes == [0], local.explain()
    cache = tmp_path / "cache"
    with serve_directory(data / "shards") as server:
        remote = _run(tmp_path, "remote", server.url, [f"data.cache_dir={cache}"])
        assert remote.codes == [0], remote.explain()
        assert remote.losses() == local.losses()
        fetched = {path: n for path, n in server.requests.items() if path.endswith(".tar")}
        assert fetched and all(n == 1 for n in fetched.values()), fetched  # each shard read once, whole
        again = _run(tmp_path, "again", server.url, [f"data.cache_dir={cache}"])
        assert again.codes == [0], again.explain()
        assert again.losses() == local.losses()
        assert {path: n for path, n in server.requests.items() if path.endswith(".tar")} == fetched  # from the cache
    saved = tmp_path / "remote" / "checkpoints" / "step-000004" / "tokenizer"
    assert (saved / "tokenizer.json").is_file()      # the tokenizer fetched through the store reached the checkpoint


def test_an_unreachable_url_is_one_error_line_and_no_hang(data, tmp_path):
    from pretrain.distributed import free_port

    url = f"http://127.0.0.1:{free_port()}/shards"    # nothing listens there
    began = time.time()
    run = _run(tmp_path, "run", url)
    assert run.codes == [2], run.explain()
    assert time.time() - began < 120
    errors = [line for line in run.logs[0].splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in run.logs[0], run.explain()
    assert f"{url}/manifest.json" in errors[0] and "after 4 tries" in errors[0], errors[0]


def test_a_truncated_shard_is_retried_then_named_in_one_error_line(data, tmp_path):
    with serve_directory(data / "shards") as server:
        names = sorted(p.name for p in (data / "shards").glob("train-*.tar"))
        for name in names:
            server.truncate[f"/{name}"] = 1000
        run = _run(tmp_path, "run", server.url)
    assert run.codes == [2], run.explain()
    errors = [line for line in run.logs[0].splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in run.logs[0], run.explain()
    assert f"{server.url}/train-" in errors[0] and "after 4 tries" in errors[0], errors[0]
    # 4 tries of the batch that failed (a prefetched batch of the worker may have begun its own before it stopped)
    assert 4 <= max(server.requests[f"/{name}"] for name in names) <= 8, dict(server.requests)
    assert not os.path.exists(tmp_path / "run" / "checkpoints" / "latest")


def test_training_from_a_pipe_command_matches_the_local_directory(data, tmp_path):
    local = _run(tmp_path, "local", str(data / "shards"))
    piped = _run(tmp_path, "piped", f"pipe:cat {data / 'shards'}/{{name}}")
    assert local.codes == [0] and piped.codes == [0], local.explain() + piped.explain()
    assert piped.losses() == local.losses()

"""data_prep.shards.store: a shard directory read from a local directory, a pipe: command, a real local
HTTP server and fsspec's memory:// filesystem; checked reads, retries, timeouts, the cache."""
from __future__ import annotations

import hashlib
import multiprocessing
import os
import pickle
import shlex
import sys
import time

import pytest

from data_prep.errors import PrepError
from data_prep.shards.store import BLOCK, STALE_TEMP_S, open_store
from tests.http_server import serve_directory, silent_server

SHARD = "train-000000.tar"
LOCK = f".lock-{SHARD}"  # the cache's fetch lock of SHARD
FAST = dict(timeout=1.0, attempts=3, backoff=0.01)  # retries and timeouts short enough for tests


@pytest.fixture(autouse=True)
def no_proxy_for_the_test_server(monkeypatch):
    """urllib honours http_proxy; the test servers are on this machine."""
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")


@pytest.fixture
def shard_dir(tmp_path):
    """A directory with a manifest, a tokenizer file and one 'shard' of 2.5 blocks of bytes."""
    root = tmp_path / "shards"
    (root / "tokenizer").mkdir(parents=True)
    (root / "manifest.json").write_text('{"format": "test"}\n')
    (root / "tokenizer" / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    (root / SHARD).write_bytes(os.urandom(BLOCK * 2 + BLOCK // 2))
    return root


def entry(path):
    data = path.read_bytes()
    return len(data), hashlib.sha256(data).hexdigest()


def test_local_reads_whole_blocks_and_checks(shard_dir):
    store = open_store(str(shard_dir))
    assert store.read("manifest.json") == b'{"format": "test"}\n'
    assert store.read("tokenizer/vocab.txt") == b"[PAD]\n[UNK]\n"
    store.read_calls = store.bytes_read = 0
    size, sha = entry(shard_dir / SHARD)
    assert store.read_checked(SHARD, size, sha) == (shard_dir / SHARD).read_bytes()
    assert (store.read_calls, store.bytes_read) == (4, size)  # 3 blocks and the end
    with pytest.raises(PrepError, match=rf"{shard_dir / SHARD}: corrupted: sha256 .* does not match"):
        store.read_checked(SHARD, size, "0" * 64)
    with pytest.raises(PrepError, match=rf"{shard_dir / SHARD}: truncated: got {size} of its {size + 1} bytes$"):
        store.read_checked(SHARD, size + 1, sha)
    with pytest.raises(PrepError, match=rf"{shard_dir / SHARD}: larger than its {size - 1} bytes"):
        store.read_checked(SHARD, size - 1, sha)
    with pytest.raises(PrepError, match=rf"{shard_dir / 'val-000000.tar'}: no such file$"):
        store.read("val-000000.tar")
    assert open_store(f"file://{shard_dir}").read("manifest.json") == b'{"format": "test"}\n'


@pytest.mark.parametrize("name", ["/etc/passwd", "../x.tar", "a/../b", "./manifest.json", "", "a//b", ".hidden",
                                  "a\\b", "tokenizer/", 7])
def test_names_outside_the_directory_are_refused(shard_dir, name):
    store = open_store(str(shard_dir), cache_dir=str(shard_dir / "cache"))
    with pytest.raises(PrepError, match="is not a relative file name of a shard directory"):
        store.read(name)
    with pytest.raises(PrepError, match="is not a relative file name of a shard directory"):
        store.read_checked(name, 1, "0" * 64)


def test_http_reads_and_checks(shard_dir):
    size, sha = entry(shard_dir / SHARD)
    with serve_directory(shard_dir) as server:
        store = open_store(server.url + "/", **FAST)
        assert store.where(SHARD) == f"{server.url}/{SHARD}"
        assert store.read("tokenizer/vocab.txt") == b"[PAD]\n[UNK]\n"
        assert store.read_checked(SHARD, size, sha) == (shard_dir / SHARD).read_bytes()
        assert store.bytes_read == size + 12
        with pytest.raises(PrepError, match=rf"^{server.url}/val-000000.tar: HTTP 404 File not found$"):
            store.read_checked("val-000000.tar", 1, sha)
        assert server.requests["/val-000000.tar"] == 1  # not retried
        with pytest.raises(PrepError, match=rf"^{server.url}/{SHARD}: corrupted: .* \(after 2 tries\)$"):
            store.read_checked(SHARD, size, "0" * 64)
        assert server.requests[f"/{SHARD}"] == 3  # one good read, then a wrong hash read twice


def test_http_truncated_answer_is_retried_then_an_error(shard_dir):
    size, sha = entry(shard_dir / SHARD)
    with serve_directory(shard_dir) as server:
        store = open_store(server.url, **FAST)
        server.truncate[f"/{SHARD}"] = 1000  # Content-Length says the whole file, the body stops short
        with pytest.raises(PrepError, match=rf"^{server.url}/{SHARD}: truncated: the connection closed {size - 1000} "
                                            r"bytes short of its Content-Length \(after 3 tries\)$"):
            store.read_checked(SHARD, size, sha)
        assert server.requests[f"/{SHARD}"] == 3
        with pytest.raises(PrepError, match=r"manifest.json: truncated: the connection closed 9 bytes short"):
            server.truncate["/manifest.json"] = 10
            store.read("manifest.json")  # no size to check against: the Content-Length is
        server.truncate.clear()
        # A file shorter than its manifest entry (an honest, complete answer of the wrong file)
        with pytest.raises(PrepError, match=rf"{SHARD}: truncated: got {size} of its {size + 5} bytes "
                                            r"\(after 3 tries\)$"):
            store.read_checked(SHARD, size + 5, sha)
        assert store.read_checked(SHARD, size, sha) == (shard_dir / SHARD).read_bytes()


def test_http_silent_or_refusing_server_fails_within_the_timeout():
    with silent_server() as url:
        store = open_store(url, timeout=0.5, attempts=2, backoff=0.01)
        start = time.monotonic()
        with pytest.raises(PrepError, match=rf"^{url}/{SHARD}: no answer within 0.5 s \(after 2 tries\)$"):
            store.read_checked(SHARD, 10, "0" * 64)
        assert time.monotonic() - start < 5
    # nothing listens there any more
    with pytest.raises(PrepError, match=rf"^{url}/manifest.json: .*refused.* \(after 2 tries\)$"):
        store.read("manifest.json")


def test_cache_serves_verified_copies_and_replaces_bad_ones(shard_dir, tmp_path):
    size, sha = entry(shard_dir / SHARD)
    cache = tmp_path / "cache"
    with serve_directory(shard_dir) as server:
        store = open_store(server.url, cache_dir=str(cache), **FAST)
        data = store.read_checked(SHARD, size, sha)
        cached = store.cache_root() / SHARD
        assert cached.read_bytes() == data and cached.parent.parent == cache
        assert sorted(p.name for p in cached.parent.iterdir()) == [LOCK, SHARD]  # no temp left
        assert pickle.loads(pickle.dumps(store)).read_checked(SHARD, size, sha) == data
        assert server.requests[f"/{SHARD}"] == 1  # served from the cache, by a copy too
        store.read("manifest.json"), store.read("manifest.json")
        assert server.requests["/manifest.json"] == 2  # small files are not cached

        cached.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # a corrupted cached copy ...
        assert store.read_checked(SHARD, size, sha) == data  # ... is not trusted
        assert server.requests[f"/{SHARD}"] == 2 and cached.read_bytes() == data
        cached.write_bytes(data[:100])  # a short one neither
        assert store.read_checked(SHARD, size, sha) == data and server.requests[f"/{SHARD}"] == 3

        with pytest.raises(PrepError, match="corrupted"):  # a bad source never reaches the cache
            open_store(server.url, cache_dir=str(tmp_path / "other"), **FAST).read_checked(SHARD, size, "0" * 64)
        assert not list((tmp_path / "other").rglob(SHARD))
    # one location, one cache directory; another location, another one
    assert open_store(server.url + "/", cache_dir=str(cache)).cache_root() == store.cache_root()
    assert open_store(f"pipe:cat {shard_dir}/{{name}}", cache_dir=str(cache)).cache_root() != store.cache_root()


def test_local_directories_are_not_cached(shard_dir, tmp_path):
    size, sha = entry(shard_dir / SHARD)
    for location in (str(shard_dir), f"file://{shard_dir}"):
        store = open_store(location, cache_dir=str(tmp_path / "cache"))
        assert store.cache_root() is None
        assert store.read_checked(SHARD, size, sha) == (shard_dir / SHARD).read_bytes()
    assert not (tmp_path / "cache").exists()


def _read_through_cache(url, cache, size, sha, start, results) -> None:
    store = open_store(url, cache_dir=cache, timeout=10.0, attempts=1)
    start.wait()
    results.put(hashlib.sha256(store.read_checked(SHARD, size, sha)).hexdigest())


def test_concurrent_processes_fetch_a_shard_once(shard_dir, tmp_path):
    """Workers missing the cache together (a window start): one fetches, the others wait for its copy."""
    size, sha = entry(shard_dir / SHARD)
    cache = tmp_path / "cache"
    spawn = multiprocessing.get_context("spawn")
    start, results = spawn.Event(), spawn.Queue()
    with serve_directory(shard_dir) as server:
        server.delay[f"/{SHARD}"] = 1.0  # every process asks before the first answer is in
        procs = [spawn.Process(target=_read_through_cache, args=(server.url, str(cache), size, sha, start, results))
                 for _ in range(4)]
        for proc in procs:
            proc.start()
        start.set()
        assert [results.get(timeout=60) for _ in procs] == [sha] * 4
        for proc in procs:
            proc.join(timeout=60)
        assert server.requests[f"/{SHARD}"] == 1
    root = open_store(server.url, cache_dir=str(cache)).cache_root()
    assert sorted(p.name for p in root.iterdir()) == [LOCK, SHARD] and entry(root / SHARD) == (size, sha)


def test_cache_temps_are_fresh_names_and_stale_ones_are_removed(shard_dir, tmp_path, capsys):
    size, sha = entry(shard_dir / SHARD)
    with serve_directory(shard_dir) as server:
        store = open_store(server.url, cache_dir=str(tmp_path / "cache"), **FAST)
        root = store.cache_root()
        root.mkdir(parents=True)
        victim = tmp_path / "victim"
        victim.write_bytes(b"not yours")
        # links planted at the names a writer of this pid would have picked (fsutil's temp_path_for)
        for planted in (f".tmp-{SHARD}.{os.getpid()}", f".tmp-{SHARD}"):
            (root / planted).symlink_to(victim)
        (root / LOCK).symlink_to(tmp_path / "created-through-a-link")  # the lock is not followed either
        stale, fresh = root / f".tmp-{SHARD}.dead", root / f".tmp-{SHARD}.writing"
        stale.write_bytes(b"left by a killed worker")
        fresh.write_bytes(b"being written")
        os.utime(stale, (time.time() - 2 * STALE_TEMP_S,) * 2)
        assert store.read_checked(SHARD, size, sha) == (shard_dir / SHARD).read_bytes()
        assert victim.read_bytes() == b"not yours" and entry(root / SHARD) == (size, sha)
        assert not (tmp_path / "created-through-a-link").exists() and not capsys.readouterr().err
        assert not stale.exists() and fresh.exists()
        assert sorted(p.name for p in root.iterdir() if not p.is_symlink()) == sorted([SHARD, fresh.name])


def test_a_cache_that_cannot_be_written_is_a_warning(shard_dir, tmp_path, capsys):
    size, sha = entry(shard_dir / SHARD)
    (tmp_path / "cache").write_text("a file, not a directory")
    store = open_store(f"pipe:cat {shard_dir}/{{name}}", cache_dir=str(tmp_path / "cache"))
    for _ in range(2):
        assert store.read_checked(SHARD, size, sha) == (shard_dir / SHARD).read_bytes()
    warning = capsys.readouterr().err
    assert warning.count("warning: not caching") == 1 and f"{SHARD} in {tmp_path / 'cache'}" in warning


def test_an_endless_small_file_is_cut_at_the_cap(monkeypatch):
    monkeypatch.setattr("data_prep.shards.store.SMALL_FILE_MAX", 1 << 20)
    store = open_store("pipe:yes {name}", **FAST)
    start = time.monotonic()
    with pytest.raises(PrepError, match=r"^pipe:yes manifest.json: larger than 1,048,576 bytes, the most a manifest "
                                        r"or tokenizer file may be$"):
        store.read("manifest.json")
    assert time.monotonic() - start < 5


def test_a_pipe_command_that_closes_its_output_and_runs_on_is_ended(shard_dir):
    size, sha = entry(shard_dir / SHARD)
    store = open_store(f"pipe:cat {shard_dir}/{{name}}; exec >&-; sleep 30", timeout=0.5, attempts=1)
    start = time.monotonic()
    with pytest.raises(PrepError, match=r"the command did not exit within 0.5 s of the end of its output$"):
        store.read_checked(SHARD, size, sha)
    assert time.monotonic() - start < 5


def test_pipe_command(shard_dir):
    size, sha = entry(shard_dir / SHARD)
    store = open_store(f"pipe:cat {shlex.quote(str(shard_dir))}/{{name}}", **FAST)
    assert store.where(SHARD) == f"pipe:cat {shlex.quote(str(shard_dir))}/{SHARD}"
    assert store.read("tokenizer/vocab.txt") == b"[PAD]\n[UNK]\n"
    assert store.read_checked(SHARD, size, sha) == (shard_dir / SHARD).read_bytes()
    with pytest.raises(PrepError, match=r"val-000000.tar: the command exited with status 1: cat: .*No such file"
                                        r".* \(after 3 tries\)$"):
        store.read_checked("val-000000.tar", 1, sha)
    with pytest.raises(PrepError, match=rf"{SHARD}: larger than its {size - 10} bytes"):
        store.read_checked(SHARD, size - 10, sha)  # stops reading; the command is ended, not waited for
    marker = shard_dir / "still-running"
    command = f"(sleep 2; touch {shlex.quote(str(marker))}; cat {shlex.quote(str(shard_dir))}/{{name}})"
    slow = open_store(f"pipe:{command}", timeout=0.3, attempts=1)
    start = time.monotonic()
    with pytest.raises(PrepError, match=rf"{SHARD}\): the command printed nothing for 0.3 s$"):
        slow.read_checked(SHARD, size, sha)
    assert time.monotonic() - start < 1.5
    time.sleep(2.5)
    assert not marker.exists()  # the command was stopped, with what its shell had started
    with pytest.raises(PrepError, match=r"must contain \{name\}"):
        open_store(f"pipe:cat {shard_dir}/manifest.json")


def test_fsspec_memory_filesystem(shard_dir):
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    data = (shard_dir / SHARD).read_bytes()
    fs.pipe({"/bertforge-test/shards/manifest.json": b"{}", f"/bertforge-test/shards/{SHARD}": data})
    try:
        store = open_store("memory://bertforge-test/shards", **FAST)
        assert store.where(SHARD) == f"memory://bertforge-test/shards/{SHARD}"
        assert store.read("manifest.json") == b"{}"
        store = pickle.loads(pickle.dumps(store))
        assert store.read_checked(SHARD, *entry(shard_dir / SHARD)) == data
        assert store.read_calls == 4 and store.bytes_read == len(data)
        with pytest.raises(PrepError, match=r"^memory://bertforge-test/shards/val-000000.tar: no such file$"):
            store.read("val-000000.tar")
    finally:
        fs.rm("/bertforge-test", recursive=True)


def test_fsspec_backend_errors_are_one_line(monkeypatch):
    fsspec = pytest.importorskip("fsspec")

    class NoCredentialsError(Exception):  # as botocore's: not an OSError
        pass

    calls = []

    def refuse(url, mode):
        calls.append(url)
        raise NoCredentialsError("Unable to locate credentials")

    monkeypatch.setattr(fsspec, "open", refuse)
    with pytest.raises(PrepError, match=r"^memory://x/shards/manifest.json: NoCredentialsError: Unable to locate "
                                        r"credentials$"):
        open_store("memory://x/shards", **FAST).read("manifest.json")
    assert len(calls) == 1  # not retried


def test_missing_fsspec_backend_names_the_package(monkeypatch):
    pytest.importorskip("fsspec")
    monkeypatch.setitem(sys.modules, "s3fs", None)  # as if not installed
    with pytest.raises(PrepError, match=r"^s3://bucket/shards: reading s3:// URLs needs the s3fs package "
                                        r"\(pip install s3fs\)$"):
        open_store("s3://bucket/shards")
    with pytest.raises(PrepError, match=r"^nosuch://x: nosuch:// is not a scheme fsspec knows"):
        open_store("nosuch://x")


def test_stores_pickle_without_their_counters(shard_dir):
    for location in (str(shard_dir), f"pipe:cat {shard_dir}/{{name}}", "http://127.0.0.1:9/shards",
                     "memory://x/shards"):
        store = open_store(location, cache_dir=str(shard_dir / "cache"))
        store.read_calls, store.bytes_read = 5, 500
        copy = pickle.loads(pickle.dumps(store))
        assert (type(copy), copy.location, copy.cache_root()) == (type(store), location, store.cache_root())
        assert (copy.read_calls, copy.bytes_read) == (0, 0)

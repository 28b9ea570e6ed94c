"""Where a shard directory is read from: a local directory, a ``pipe:`` command, an http(s) URL or any
other fsspec URL.  The transport only: it knows the names of the files it serves, not their format.

``open_store(location, cache_dir)`` gives a ``Store`` whose ``read(name)`` returns a small file whole
(``manifest.json``, ``tokenizer/vocab.txt``) and ``read_checked(name, size, sha256)`` a whole shard,
read in large sequential blocks with its sha256 computed on the way.  docs/remote-data.md describes
the locations, the retries and the cache.

Failures: a read that breaks off (connection refused or reset, no answer within ``timeout`` seconds,
fewer bytes than the manifest's size, a ``pipe:`` command that exits non-zero, an HTTP 5xx) is tried
again, up to ``attempts`` tries with a doubling pause between them; content of the wrong size or
sha256 is read once more at most (a second identical answer will not change); a missing file or an
HTTP 4xx is not retried.  A local directory is read once (a reread gives the same bytes).  Every
failure ends as one PrepError naming the file (``where(name)``) and what was wrong.  The time a read
can take before it fails is bounded by ``attempts * timeout`` of silence plus the pauses, unless the
source keeps sending (slowly); a small file (``read``) stops at SMALL_FILE_MAX bytes and a shard at its
size, so an endless source cannot fill memory.

The cache (remote stores only: a local directory is read in place) is safe with several processes:
one fetches a shard while the others wait on its lock file and then read the copy it left.
"""
from __future__ import annotations

import abc
import contextlib
import fcntl
import hashlib
import http.client
import io
import os
import re
import select
import shlex
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from data_prep.errors import PrepError

BLOCK = 8 << 20         # bytes asked for per read call
TIMEOUT_S = 30.0        # silence (no connection, no bytes) after which a try fails
ATTEMPTS = 4            # tries of a read that breaks off; content of the wrong size or hash gets 2 at most
BACKOFF_S = 0.5         # pause before the second try; doubles before each further one
STDERR_TAIL = 400       # characters of a failed pipe: command's stderr shown in its error
PIPE_SIZE = 1 << 20     # a pipe: command's pipe buffer (Linux's default 64 KiB caps each read at that)
HTTP_RETRIED = (408, 425, 429)  # 4xx answers worth asking again (5xx always are)
SMALL_FILE_MAX = 64 << 20  # the most ``read`` takes of a manifest or tokenizer file
# Files of the cache beside the copies: names of a shard directory never start with "." (NAME).
CACHE_TEMP_PREFIX = ".tmp-"   # a copy being written (mkstemp: unpredictable, created exclusively)
CACHE_LOCK_PREFIX = ".lock-"  # flock'ed while one process fetches that file
STALE_TEMP_S = 3600           # a temp this old was left by a killed process (a write takes seconds)

# A relative name of a shard directory: parts of letters, digits and ._+- (not starting with a dot, so
# never "." or ".."), joined by "/".
NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*(/[A-Za-z0-9_][A-Za-z0-9_.+-]*)*$")
SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class _Failure(Exception):
    """One failed try of a read; ``retry`` says whether another try may succeed, ``wrong_content``
    marks an answer of the wrong size or hash (tried twice at most)."""

    def __init__(self, message: str, retry: bool = True, wrong_content: bool = False):
        super().__init__(message)
        self.retry = retry
        self.wrong_content = wrong_content


def check_name(name) -> str:
    """``name`` when it is a relative name inside a shard directory, else a PrepError."""
    if not isinstance(name, str) or not NAME.match(name):
        raise PrepError(f"{name!r} is not a relative file name of a shard directory "
                        "(like manifest.json, train-000000.tar or tokenizer/vocab.txt)")
    return name


def open_store(location: str, cache_dir: str | None = None, *, timeout: float = TIMEOUT_S,
               attempts: int = ATTEMPTS, backoff: float = BACKOFF_S) -> "Store":
    """The Store of ``location``: a local directory or ``file://`` URL, ``pipe:<command>`` (``{name}``
    in the command becomes the shell-quoted file name), an ``http(s)://`` URL (stdlib) or any other
    fsspec URL (``s3://``, ``gs://``, ``memory://``; needs fsspec and the scheme's backend).  With
    ``cache_dir``, shards read whole and verified are kept there and served from there next time."""
    if not isinstance(location, str) or not location:
        raise PrepError(f"a data location must be a non-empty string, got {location!r}")
    options = dict(cache_dir=cache_dir, timeout=timeout, attempts=max(1, attempts), backoff=backoff)
    if location.startswith("pipe:"):
        return PipeStore(location, **options)
    scheme = SCHEME.match(location)
    if scheme is None:
        return LocalStore(location, **options)
    scheme = scheme.group(1).lower()
    if scheme == "file":
        return LocalStore(location, **options)
    if scheme in ("http", "https"):
        return HttpStore(location, **options)
    _check_fsspec_backend(location, scheme)
    return FsspecStore(location, **options)


class Store(abc.ABC):
    """Reads the files of one shard directory.  Picklable (strings and numbers only, no open handle),
    so DataLoader workers get a copy; ``read_calls`` / ``bytes_read`` count this copy's read calls
    (of the source and of the cache) and start at 0 in each copy."""

    remote = True  # not a directory of this machine: where() is no local path; a failed read is tried again

    def __init__(self, location: str, cache_dir=None, timeout=TIMEOUT_S, attempts=ATTEMPTS, backoff=BACKOFF_S):
        self.location = location
        self.cache_dir = None if cache_dir is None else str(cache_dir)
        self.timeout = float(timeout)
        self.attempts = int(attempts) if self.remote else 1
        self.backoff = float(backoff)
        self.read_calls = 0
        self.bytes_read = 0
        self._cache_warned = False
        self._swept = False  # stale temps of the cache removed (once per copy)

    def __setstate__(self, state):
        self.__dict__.update(state, read_calls=0, bytes_read=0, _cache_warned=False, _swept=False)

    def __repr__(self):
        return f"{type(self).__name__}({self.location!r})"

    # ---- what a transport provides ------------------------------------------------------------
    @abc.abstractmethod
    def where(self, name: str) -> str:
        """How errors name file ``name`` of the store (a path, a URL or the pipe: command)."""

    @abc.abstractmethod
    def _open(self, name: str):
        """A context manager giving an object whose ``read(n)`` returns up to n bytes (b"" at the
        end); failures of the transport, opening or reading, leave it as ``_Failure``."""

    # ---- reads ---------------------------------------------------------------------------------
    def read(self, name: str) -> bytes:
        """File ``name`` whole (a small file: the manifest, a tokenizer file; at most SMALL_FILE_MAX
        bytes); never cached."""
        check_name(name)
        return self._retrying(name, lambda: self._read_once(name, None, None))

    def read_checked(self, name: str, size: int, sha256: str) -> bytes:
        """Shard ``name`` whole, checked to be ``size`` bytes with ``sha256`` (computed while reading);
        from the cache when it holds a copy that checks, else from the source (then cached).  Of
        several processes missing the cache together, one fetches while the others wait for its copy."""
        check_name(name)
        cached = self._cache_path(name)
        if cached is None:
            return self._retrying(name, lambda: self._read_once(name, size, sha256))
        data = self._from_cache(cached, size, sha256)
        if data is not None:
            return data
        with self._fetch_lock(cached):
            data = self._from_cache(cached, size, sha256)  # fetched by another process while this one waited
            if data is None:
                data = self._retrying(name, lambda: self._read_once(name, size, sha256))
                self._keep(name, cached, data)
        return data

    def _read_once(self, name: str, size: int | None, sha256: str | None) -> bytes:
        with self._open(name) as f:
            data, digest = self._drain(f, (SMALL_FILE_MAX if size is None else size) + 1)
        if size is None and len(data) > SMALL_FILE_MAX:
            raise _Failure(f"larger than {SMALL_FILE_MAX:,} bytes, the most a manifest or tokenizer file may be",
                           retry=False)
        if size is not None:
            if len(data) < size:
                raise _Failure(f"truncated: got {len(data)} of its {size} bytes")
            if len(data) > size:
                raise _Failure(f"larger than its {size} bytes in the manifest", wrong_content=True)
            if digest != sha256:
                raise _Failure(f"corrupted: sha256 {digest} does not match the manifest's {sha256}",
                               wrong_content=True)
        return data

    def _drain(self, f, limit: int) -> tuple[bytes, str]:
        """(the bytes of ``f`` up to ``limit``, their sha256), read BLOCK at a time.  BytesIO returns
        its buffer without a copy, so a shard is held about once, not twice."""
        h, out, got = hashlib.sha256(), io.BytesIO(), 0
        while got < limit:
            block = f.read(min(BLOCK, limit - got))
            self.read_calls += 1
            if not block:
                break
            got += len(block)
            self.bytes_read += len(block)
            h.update(block)
            out.write(block)
        return out.getvalue(), h.hexdigest()

    def _retrying(self, name: str, read):
        """``read()`` tried up to ``attempts`` times (content of the wrong size or hash twice at most),
        pausing ``backoff`` seconds, doubled each time, between tries; then one PrepError."""
        tries = 0
        while True:
            tries += 1
            try:
                return read()
            except _Failure as err:
                last = err
            limit = min(self.attempts, 2) if last.wrong_content else self.attempts
            if not last.retry or tries >= limit:
                after = f" (after {tries} tries)" if tries > 1 else ""
                raise PrepError(f"{self.where(name)}: {last}{after}") from None
            time.sleep(self.backoff * 2 ** (tries - 1))

    # ---- the cache -----------------------------------------------------------------------------
    def cache_root(self) -> Path | None:
        """This store's directory in the cache: ``cache_dir/<digest of the location>``; None without a
        cache_dir and for a local directory (read in place, nothing to gain from a copy)."""
        if self.cache_dir is None or not self.remote:
            return None
        return Path(self.cache_dir) / hashlib.sha256(self._identity().encode("utf-8")).hexdigest()[:16]

    def _identity(self) -> str:
        """What names the source in the cache's digest (the same source, the same cache directory)."""
        return self.location.rstrip("/")

    def _cache_path(self, name: str) -> Path | None:
        root = self.cache_root()
        return None if root is None else root / name  # name is checked: no "..", not absolute

    def _from_cache(self, path: Path, size: int, sha256: str) -> bytes | None:
        """The cached copy when it has the right size and sha256; a wrong copy is removed (and
        fetched again by the caller)."""
        try:
            if path.stat().st_size != size:
                path.unlink()
                return None
            with open(path, "rb", buffering=0) as f:
                data, digest = self._drain(f, size + 1)
            if len(data) == size and digest == sha256:
                return data
            path.unlink()
        except OSError:
            pass  # not cached (or vanished): read from the source
        return None

    @contextlib.contextmanager
    def _fetch_lock(self, path: Path):
        """Holds ``.lock-<file>`` beside the cached copy (flock, exclusive) while one process fetches
        it: the others wait (as long as that fetch's bounded retries) and then find its copy.  The
        kernel releases the lock of a process that dies.  No lock (a cache that cannot be written, a
        link planted at the lock's name): the fetch goes on unlocked (``_keep`` warns if the copy
        cannot be written either)."""
        fd = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._sweep(path.parent)
            fd = os.open(path.with_name(CACHE_LOCK_PREFIX + path.name),
                         os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        try:
            yield
        finally:
            if fd is not None:
                os.close(fd)  # releases the lock

    def _sweep(self, directory: Path) -> None:
        """Remove the temps in ``directory`` older than STALE_TEMP_S (left by killed processes); once
        per copy of the store."""
        if self._swept:
            return
        self._swept = True
        cutoff = time.time() - STALE_TEMP_S
        with contextlib.suppress(OSError), os.scandir(directory) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    if entry.name.startswith(CACHE_TEMP_PREFIX) and entry.stat(follow_symlinks=False).st_mtime < cutoff:
                        os.unlink(entry.path)

    def _keep(self, name: str, path: Path, data: bytes) -> None:
        """Write ``data`` to the cache: a fresh temp (mkstemp: a name nobody could plant a link at),
        fsync, rename over ``path`` (a rename replaces a link there, never writes through it).  A
        cache that cannot be written is a warning: the data is good."""
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{CACHE_TEMP_PREFIX}{path.name}.")
            with open(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as err:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            self._warn_cache(name, err.strerror or err)

    def _warn_cache(self, name: str, problem) -> None:
        if not self._cache_warned:
            self._cache_warned = True
            print(f"warning: not caching {self.where(name)} in {self.cache_dir}: {problem}", file=sys.stderr)


class LocalStore(Store):
    """A directory of this machine (or ``file://`` URL): plain reads of BLOCK bytes, no seeks."""

    remote = False

    def __init__(self, location, **options):
        super().__init__(location, **options)
        path = urllib.parse.unquote(urllib.parse.urlparse(location).path) if location.startswith("file:") \
            else location
        self.path = os.path.abspath(path)

    def where(self, name: str) -> str:
        return os.path.join(self.path, name)

    def _identity(self) -> str:
        return self.path

    @contextlib.contextmanager
    def _open(self, name: str):
        try:
            with open(self.where(name), "rb", buffering=0) as f:
                yield f
        except FileNotFoundError:
            raise _Failure("no such file", retry=False) from None
        except OSError as err:
            raise _Failure(f"cannot read ({err.strerror or err})", retry=False) from None


class HttpStore(Store):
    """An http(s):// URL of the directory: ``GET <location>/<name>``, streamed."""

    def where(self, name: str) -> str:
        return f"{self.location.rstrip('/')}/{urllib.parse.quote(name)}"

    @contextlib.contextmanager
    def _open(self, name: str):
        request = urllib.request.Request(self.where(name), headers={"User-Agent": "bertforge-data_prep"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                yield response
                if response.isclosed() and response.length:  # read to its end, which came early
                    raise _Failure(f"truncated: the connection closed {response.length} bytes short of its "
                                   "Content-Length")
        except urllib.error.HTTPError as err:
            err.close()
            raise _Failure(f"HTTP {err.code} {err.reason}", retry=err.code >= 500 or err.code in HTTP_RETRIED) \
                from None
        except urllib.error.URLError as err:  # a certificate that does not verify will not on a retry
            raise _Failure(_network_problem(err.reason, self.timeout),
                           retry=not isinstance(err.reason, ssl.SSLCertVerificationError)) from None
        except (OSError, http.client.HTTPException) as err:
            raise _Failure(_network_problem(err, self.timeout)) from None


def _network_problem(err, timeout: float) -> str:
    if isinstance(err, TimeoutError):
        return f"no answer within {timeout:g} s"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err) or type(err).__name__


class PipeStore(Store):
    """``pipe:<command>``: a file is the stdout of the shell command, ``{name}`` replaced by the
    shell-quoted file name (``pipe:aws s3 cp s3://bucket/shards/{name} -``)."""

    def __init__(self, location, **options):
        super().__init__(location, **options)
        self.command = location[len("pipe:"):]
        if "{name}" not in self.command:
            raise PrepError(f"{location}: a pipe: command must contain {{name}} (the file it prints)")

    def where(self, name: str) -> str:
        return "pipe:" + self.command.replace("{name}", shlex.quote(name))

    @contextlib.contextmanager
    def _open(self, name: str):
        command = self.command.replace("{name}", shlex.quote(name))
        with tempfile.TemporaryFile() as stderr:  # a file, not a pipe: a chatty command cannot block
            # its own process group, so that stopping it early stops what the shell started too
            proc = subprocess.Popen(command, shell=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=stderr, bufsize=0, start_new_session=True)
            with contextlib.suppress(OSError, AttributeError):  # Linux only; the default size works too
                fcntl.fcntl(proc.stdout.fileno(), fcntl.F_SETPIPE_SZ, PIPE_SIZE)
            pipe = _TimedPipe(proc.stdout, self.timeout)
            try:
                yield pipe
            finally:
                if not pipe.ended:  # stopped reading early (enough bytes, a timeout, an error)
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                proc.stdout.close()
                try:
                    status = proc.wait(timeout=self.timeout)
                except subprocess.TimeoutExpired:  # closed its output but goes on running
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    if pipe.ended:
                        raise _Failure(f"the command did not exit within {self.timeout:g} s of the end of "
                                       "its output") from None
                    status = None
            if pipe.ended and status != 0:
                stderr.seek(0)
                tail = stderr.read().decode("utf-8", "replace").strip()[-STDERR_TAIL:]
                raise _Failure(f"the command exited with status {status}" + (f": {tail}" if tail else ""))


class _TimedPipe:
    """A pipe's read(n) that fails after ``timeout`` seconds without a byte."""

    def __init__(self, pipe, timeout: float):
        self.pipe, self.timeout = pipe, timeout
        self.ended = False  # the command's output was read to its end

    def read(self, n: int) -> bytes:
        ready, _, _ = select.select([self.pipe], [], [], self.timeout)
        if not ready:
            raise _Failure(f"the command printed nothing for {self.timeout:g} s")
        block = self.pipe.read(n)
        self.ended = not block
        return block


class FsspecStore(Store):
    """Any other URL fsspec opens (s3://, gs://, memory://, ...), through ``fsspec.open``; the
    backend's own options (credentials, its timeouts and retries) come from its usual configuration."""

    def where(self, name: str) -> str:
        return f"{self.location.rstrip('/')}/{name}"

    @contextlib.contextmanager
    def _open(self, name: str):
        import fsspec
        try:
            with fsspec.open(self.where(name), "rb") as f:
                yield f
        except FileNotFoundError:
            raise _Failure("no such file", retry=False) from None
        except (PermissionError, IsADirectoryError) as err:
            raise _Failure(str(err) or type(err).__name__, retry=False) from None
        except OSError as err:  # TimeoutError and ConnectionError included
            raise _Failure(err.strerror or str(err) or type(err).__name__) from None
        except _Failure:
            raise
        except Exception as err:  # the backend's own (botocore's NoCredentialsError, gcsfs's HttpError, ...)
            raise _Failure(f"{type(err).__name__}: {err}" if str(err) else type(err).__name__, retry=False) \
                from None


def _check_fsspec_backend(location: str, scheme: str) -> None:
    """A PrepError naming the package to install when fsspec or the backend of ``scheme`` is missing."""
    try:
        import fsspec
        from fsspec.registry import known_implementations
    except ImportError:
        raise PrepError(f"{location}: reading {scheme}:// URLs needs fsspec (pip install fsspec)") from None
    try:
        fsspec.get_filesystem_class(scheme)
    except ImportError as err:
        package = known_implementations.get(scheme, {}).get("class", scheme).split(".")[0]
        if package == "fsspec":  # one of fsspec's own filesystems, missing a dependency
            raise PrepError(f"{location}: reading {scheme}:// URLs: {err}") from None
        raise PrepError(f"{location}: reading {scheme}:// URLs needs the {package} package "
                        f"(pip install {package})") from None
    except ValueError:
        raise PrepError(f"{location}: {scheme}:// is not a scheme fsspec knows (local directories, pipe:, "
                        "http(s)://, s3://, gs:// and other fsspec URLs are)") from None

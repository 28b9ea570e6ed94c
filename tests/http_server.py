"""A real HTTP server for tests that read shards from a URL: ``serve_directory(root)`` serves ``root``
on 127.0.0.1 (a free port) from a thread, counts the GET requests per path, and can cut answers short
or hold them back.

    with serve_directory(tmp_path / "shards") as server:
        store = open_store(server.url)            # http://127.0.0.1:PORT
        server.truncate["/train-000000.tar"] = 100  # that file's body stops after 100 bytes
        server.delay["/train-000000.tar"] = 2.0     # that file's answer waits 2 s
        server.requests["/manifest.json"]           # GETs of that path so far
"""
from __future__ import annotations

import contextlib
import functools
import socket
import threading
import time
from collections import Counter
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator


class _Handler(SimpleHTTPRequestHandler):
    def log_message(self, *args):  # quiet: pytest shows stderr of failing tests
        pass

    def do_GET(self):
        self.server.requests[self.path] += 1
        time.sleep(self.server.delay.get(self.path, 0))
        cut = self.server.truncate.get(self.path)
        if cut is None:
            return super().do_GET()
        body = (Path(self.directory) / self.path.lstrip("/")).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))  # promises the whole file ...
        self.end_headers()
        self.wfile.write(body[:cut])                         # ... and sends less, then closes
        self.close_connection = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path):
        super().__init__(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
        self.requests: Counter = Counter()
        self.truncate: dict[str, int] = {}
        self.delay: dict[str, float] = {}
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


@contextlib.contextmanager
def serve_directory(root) -> Iterator[_Server]:
    server = _Server(Path(root))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@contextlib.contextmanager
def silent_server() -> Iterator[str]:
    """``http://127.0.0.1:PORT`` of a server that accepts connections and never answers."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept():
        listener.settimeout(0.1)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                held.append(listener.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        listener.close()

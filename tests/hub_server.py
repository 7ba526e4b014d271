"""A local HTTP server standing in for the Hugging Face hub: `/{owner}/{repo}/resolve/{rev}/{file}`
with Range support and the headers the hub sends (X-Repo-Commit, ETag, Content-Range), or, in
a hostile mode, with answers meant to break the client."""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional

COMMIT = "0123456789abcdef0123456789abcdef01234567"

# Hostile modes: what the server does instead of behaving.
MODES = {
    "etag-traversal": "an ETag that climbs out of the cache when used as a path",
    "commit-traversal": "an X-Repo-Commit that climbs out of the cache",
    "stall-headers": "never answers the first request",
    "stall-body": "sends half the file, then nothing",
    "huge-length": "announces a file of 2**62 bytes",
    "long-body": "sends the whole file after announcing half of it",
    "redirect-loop": "redirects to the same address, forever",
}


class _Server(ThreadingHTTPServer):
    # Stalled requests must not keep the server from closing.
    block_on_close = False


class HubServer:
    def __init__(self, repo: str, files: dict[str, Path], mode: Optional[str] = None) -> None:
        if mode is not None and mode not in MODES:
            raise ValueError(f"unknown mode {mode}")
        self.repo = repo
        self.files = files
        self.mode = mode
        self.requests: list[str] = []
        self.stopping = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                self._serve(body=False)

            def do_GET(self) -> None:
                self._serve(body=True)

            def _serve(self, body: bool) -> None:
                server.requests.append(f"{self.command} {self.path}")
                path = server.resolve(self.path)
                if path is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = path.read_bytes()
                header = self.headers.get("Range")
                metadata = header == "bytes=0-0"
                if server.mode == "redirect-loop":
                    self.send_response(302)
                    self.send_header("Location", self.path)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if server.mode == "stall-headers":
                    server.stopping.wait(30)
                    return
                start, end = 0, len(data) - 1
                status = 200
                if header and header.startswith("bytes="):
                    first, _, last = header[len("bytes=") :].partition("-")
                    start = int(first)
                    end = min(int(last), len(data) - 1) if last else len(data) - 1
                    status = 206
                chunk = data[start : end + 1]
                size = len(data)
                if not metadata and server.mode == "huge-length":
                    size = 2**62
                elif not metadata and server.mode == "long-body":
                    size = len(data) // 2
                self.send_response(status)
                if not metadata and server.mode == "long-body":
                    self.send_header("Connection", "close")
                else:
                    self.send_header("Content-Length", str(len(chunk) if size == len(data) else size))
                commit = "../../../../escape" if server.mode == "commit-traversal" else COMMIT
                etag = "../../../../escape" if server.mode == "etag-traversal" else hashlib.sha256(data).hexdigest()
                self.send_header("X-Repo-Commit", commit)
                self.send_header("ETag", '"' + etag + '"')
                self.send_header("Accept-Ranges", "bytes")
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{min(end, size - 1)}/{size}")
                self.end_headers()
                if not body:
                    return
                if not metadata and server.mode == "stall-body":
                    self.wfile.write(chunk[: len(chunk) // 2])
                    self.wfile.flush()
                    server.stopping.wait(30)
                    return
                self.wfile.write(chunk)

        self.httpd = _Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def resolve(self, url_path: str) -> Optional[Path]:
        prefix = f"/{self.repo}/resolve/"
        if not url_path.startswith(prefix):
            return None
        _revision, _, name = url_path[len(prefix) :].partition("/")
        return self.files.get(name)

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()

"""A local HTTP server standing in for the Hugging Face hub: `/{owner}/{repo}/resolve/{rev}/{file}`
with Range support and the headers hf-hub reads (X-Repo-Commit, ETag, Content-Range)."""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class HubServer:
    def __init__(self, repo: str, files: dict[str, Path]) -> None:
        self.repo = repo
        self.files = files
        self.requests: list[str] = []
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
                start, end = 0, len(data) - 1
                status = 200
                header = self.headers.get("Range")
                if header and header.startswith("bytes="):
                    first, _, last = header[len("bytes=") :].partition("-")
                    start = int(first)
                    end = min(int(last), len(data) - 1) if last else len(data) - 1
                    status = 206
                chunk = data[start : end + 1]
                self.send_response(status)
                self.send_header("Content-Length", str(len(chunk)))
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest() + '"')
                self.send_header("Accept-Ranges", "bytes")
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                self.end_headers()
                if body:
                    self.wfile.write(chunk)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
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

    def __enter__(self) -> "HubServer":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

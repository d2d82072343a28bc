"""A local stand-in for the Hugging Face Hub's file server: what `hf_hub_download` asks of it, on 127.0.0.1.

`hf_hub_download` sends HEAD, then GET, to `/{repo_id}/resolve/{revision}/{filename}`; it needs the
`X-Repo-Commit` and `ETag` headers, and on a 404 reads `X-Error-Code` (RepoNotFound, RevisionNotFound,
EntryNotFound) to pick its error type.
"""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote


class HubServer:
    def __init__(self) -> None:
        self.repos: dict[str, dict[str, Path]] = {}
        self.requests: list[tuple[str, str]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self):
                server.respond(self, body=False)

            def do_GET(self):
                server.respond(self, body=True)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def add(self, repo_id: str, folder: Path, revision: str = "main") -> None:
        self.repos.setdefault(repo_id, {})[revision] = Path(folder)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def respond(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        self.requests.append((handler.command, handler.path))
        parts = unquote(handler.path.split("?")[0]).strip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            return self._error(handler, 404, "RepoNotFound")
        repo_id, revision, filename = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
        if repo_id not in self.repos:
            return self._error(handler, 404, "RepoNotFound")
        if revision not in self.repos[repo_id]:
            return self._error(handler, 404, "RevisionNotFound")
        path = self.repos[repo_id][revision] / filename
        if not path.is_file():
            return self._error(handler, 404, "EntryNotFound")
        data = path.read_bytes()
        handler.send_response(200)
        commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
        handler.send_header("X-Repo-Commit", commit)
        handler.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        handler.send_header("Content-Length", str(len(data)))
        handler.send_header("Content-Type", "application/octet-stream")
        handler.end_headers()
        if body:
            handler.wfile.write(data)

    @staticmethod
    def _error(handler: BaseHTTPRequestHandler, status: int, code: str) -> None:
        message = f"{code}: {handler.path}".encode()
        handler.send_response(status)
        handler.send_header("X-Error-Code", code)
        handler.send_header("X-Error-Message", code)
        handler.send_header("Content-Length", str(len(message)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(message)

"""A Hugging Face Hub on loopback: model repositories served from local folders, with enough of the Hub's HTTP API
(repository info, tree listing, file resolution) for huggingface_hub's own snapshot_download to lay out a real Hub
cache. No network is used: the server listens on 127.0.0.1 and stops with the test."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from pathlib import Path
from urllib.parse import unquote, urlparse


def commit_of(repo_id: str, revision: str) -> str:
    return hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()


class HubHandler(http.server.BaseHTTPRequestHandler):
    repos: dict[str, dict[str, Path]] = {}  # repo id -> revision name -> folder
    requests: list[tuple[str, str]] = []

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        self._answer(head=False)

    def do_HEAD(self):
        self._answer(head=True)

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, data, head):
        self._send(200, json.dumps(data).encode(), {"Content-Type": "application/json"}, head)

    def _revision(self, repo_id: str, name: str) -> tuple[str, Path] | None:
        for revision, folder in self.repos[repo_id].items():
            if name in (revision, commit_of(repo_id, revision)):
                return commit_of(repo_id, revision), folder
        return None

    def _answer(self, head: bool):
        path = unquote(urlparse(self.path).path)
        self.requests.append((self.command, path))
        parts = path.strip("/").split("/")
        api = parts[:2] == ["api", "models"]
        rest = parts[2:] if api else parts
        repo_id = next((r for r in self.repos if rest[:len(r.split("/"))] == r.split("/")), None)
        if repo_id is None:
            return self._send(404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"}, head)
        tail = rest[len(repo_id.split("/")):]
        if len(tail) < 2:
            return self._send(404, b"{}", {"X-Error-Code": "EntryNotFound"}, head)
        found = self._revision(repo_id, tail[1])
        if found is None:
            return self._send(404, b'{"error": "Revision not found"}', {"X-Error-Code": "RevisionNotFound"}, head)
        commit, folder = found
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        if api and tail[0] == "revision":
            return self._json({"id": repo_id, "modelId": repo_id, "sha": commit, "private": False,
                               "siblings": [{"rfilename": str(p.relative_to(folder))} for p in files]}, head)
        if api and tail[0] == "tree":
            return self._json([{"type": "file", "path": str(p.relative_to(folder)), "size": p.stat().st_size,
                                "oid": hashlib.sha1(p.read_bytes()).hexdigest()} for p in files], head)
        if not api and tail[0] == "resolve":
            file = folder / "/".join(tail[2:])
            if not file.is_file():
                return self._send(404, b"", {"X-Error-Code": "EntryNotFound"}, head)
            data = file.read_bytes()
            return self._send(200, data, {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                                          "Content-Type": "application/octet-stream"}, head)
        return self._send(404, b"{}", {"X-Error-Code": "EntryNotFound"}, head)


def serve(repos: dict[str, dict[str, Path]]) -> http.server.ThreadingHTTPServer:
    """Start a loopback Hub for `repos` ({repo id: {revision: folder}}); `.shutdown()` stops it."""
    HubHandler.repos = {repo: {rev: Path(folder) for rev, folder in revs.items()} for repo, revs in repos.items()}
    HubHandler.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HubHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server

"""A Hugging Face Hub on loopback: model repositories served from local folders, with enough of the Hub's HTTP API
(repository info, tree listing, file resolution) for huggingface_hub's own snapshot_download to lay out a real Hub
cache. No network is used: the server listens on 127.0.0.1 and stops with the test."""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import threading
from pathlib import Path
from urllib.parse import unquote, urlparse


def commit_of(repo_id: str, revision: str) -> str:
    return hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()


class HubHandler(http.server.BaseHTTPRequestHandler):
    repos: dict[tuple[str, str], dict[str, Path]] = {}  # (models|datasets, repo id) -> revision name -> folder
    requests: list[tuple[str, str]] = []
    created: list[dict] = []      # repositories created through the API
    upload_root: Path = Path(".")  # where pushed repositories' files land

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        self._answer(head=False)

    def do_HEAD(self):
        self._answer(head=True)

    def do_POST(self):
        """Repository creation and commits of regular (base64) files: what huggingface_hub's upload_folder sends."""
        path = unquote(urlparse(self.path).path)
        self.requests.append(("POST", path))
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "validate-yaml"]:  # the model card's metadata is checked before a commit
            return self._json({"errors": [], "warnings": []}, False)
        if parts[:3] == ["api", "repos", "create"]:
            request = json.loads(body)
            repo_id = "/".join(filter(None, [request.get("organization"), request["name"]]))
            kind = (request.get("type") or "model") + "s"
            self.created.append({"repo_id": repo_id, **request})
            self.repos.setdefault((kind, repo_id), {"main": Path(self.upload_root) / repo_id})
            return self._json({"url": f"http://127.0.0.1/{repo_id}", "name": repo_id}, False)
        kind, action = parts[1], parts[-2]
        repo_id = "/".join(parts[2:-2])
        folder = self.repos[(kind, repo_id)]["main"]
        if action == "preupload":
            files = json.loads(body)["files"]
            return self._json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                         for f in files]}, False)
        if action == "commit":
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    target = folder / item["value"]["path"]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(base64.b64decode(item["value"]["content"]))
            return self._json({"commitUrl": f"http://127.0.0.1/{repo_id}/commit/1", "commitOid": "1" * 40}, False)
        return self._send(404, b"{}")

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

    def _revision(self, key: tuple[str, str], name: str) -> tuple[str, Path] | None:
        for revision, folder in self.repos[key].items():
            if name in (revision, commit_of(key[1], revision)):
                return commit_of(key[1], revision), folder
        return None

    def _answer(self, head: bool):
        url = urlparse(self.path)
        path = unquote(url.path)
        self.requests.append((self.command, path))
        parts = path.strip("/").split("/")
        api = parts[0] == "api"
        kind = parts[1] if api else ("datasets" if parts[0] == "datasets" else "models")
        rest = parts[2:] if api else (parts[1:] if parts[0] == "datasets" else parts)
        key = next((k for k in self.repos if k[0] == kind and rest[:len(k[1].split("/"))] == k[1].split("/")), None)
        if key is None:
            return self._send(404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"}, head)
        tail = rest[len(key[1].split("/")):]
        if len(tail) < 2:
            return self._send(404, b"{}", {"X-Error-Code": "EntryNotFound"}, head)
        found = self._revision(key, tail[1])
        if found is None:
            return self._send(404, b'{"error": "Revision not found"}', {"X-Error-Code": "RevisionNotFound"}, head)
        commit, folder = found
        if api and tail[0] == "revision":
            files = sorted(p for p in folder.rglob("*") if p.is_file())
            return self._json({"id": key[1], "sha": commit, "private": False,
                               "siblings": [{"rfilename": str(p.relative_to(folder))} for p in files]}, head)
        if api and tail[0] == "tree":
            return self._json(self._tree(folder, "/".join(tail[2:]), "recursive=true" in url.query), head)
        if not api and tail[0] == "resolve":
            file = folder / "/".join(tail[2:])
            if not file.is_file():
                return self._send(404, b"", {"X-Error-Code": "EntryNotFound"}, head)
            data = file.read_bytes()
            return self._send(200, data, {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                                          "Content-Type": "application/octet-stream"}, head)
        return self._send(404, b"{}", {"X-Error-Code": "EntryNotFound"}, head)

    @staticmethod
    def _tree(folder: Path, under: str, recursive: bool) -> list[dict]:
        base = folder / under
        entries = base.rglob("*") if recursive else base.iterdir()
        out = []
        for p in sorted(entries):
            rel = str(p.relative_to(folder))
            if p.is_dir():
                out.append({"type": "directory", "path": rel, "oid": hashlib.sha1(rel.encode()).hexdigest()})
            else:
                out.append({"type": "file", "path": rel, "size": p.stat().st_size,
                            "oid": hashlib.sha1(p.read_bytes()).hexdigest()})
        return out


def serve(models: dict[str, dict[str, Path]] | None = None, datasets: dict[str, dict[str, Path]] | None = None,
          upload_root: Path | None = None) -> http.server.ThreadingHTTPServer:
    """Start a loopback Hub for model and dataset repositories ({repo id: {revision: folder}}); `.shutdown()` stops
    it."""
    HubHandler.repos = {(kind, repo): {rev: Path(folder) for rev, folder in revs.items()}
                        for kind, table in (("models", models or {}), ("datasets", datasets or {}))
                        for repo, revs in table.items()}
    HubHandler.requests, HubHandler.created = [], []
    HubHandler.upload_root = Path(upload_root or ".")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HubHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server

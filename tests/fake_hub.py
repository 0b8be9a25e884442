"""A loopback stand-in for the Hugging Face Hub, enough for `tasks.release.publish` and huggingface_hub 2.4.0.

What huggingface_hub calls, and what this answers (read from the installed client's source):

    GET  /api/whoami-v2                                  who the bearer token belongs to
    POST /api/repos/create                               200 with the URL; 409 (with the URL) if it exists
    POST /api/validate-yaml                              the model card's front matter (legacy commit path)
    GET  /api/models/{repo}[/revision/{rev}]             repo info: sha, private, siblings
    GET  /api/models/{repo}/tree/{rev}[/{path}]          file listing (list_repo_files, snapshot_download)
    POST /api/models/{repo}/preupload/{rev}              upload mode per file, and the oid of what is there
    POST /api/models/{repo}/commit/{rev}                 ndjson commit: header, file (base64), lfsFile, deleted*
    GET  /api/models/{repo}/xet-{write,read}-token/{rev} 404: no Xet storage (or, with `offer_xet`, the
                                                         token headers, for a CAS that does not exist)
    POST /{repo}.git/info/lfs/objects/batch              LFS batch (basic transfer), only when `lfs_suffixes`
    PUT  /lfs-upload/{oid}                               the "presigned" upload URL the batch hands out
    HEAD|GET /{repo}/resolve/{rev}/{path}                download, with ETag, X-Repo-Commit, Content-Length

Files live in memory as commits (a repo is created with a `.gitattributes`, as on the Hub). Every
request except the presigned LFS upload must carry `Authorization: Bearer <token>`; a wrong one
gets 401. Requests are recorded (`hub.requests`, `hub.calls(...)`) so a test can assert what the
client did, and `hub.corrupt` makes downloads of a file return different bytes of the same size.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

GITATTRIBUTES = b"*.pt filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"


def git_blob_oid(content: bytes) -> str:
    """The oid git gives a blob: what the Hub (and huggingface_hub's no-op check) use for regular files."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class StoredFile:
    content: bytes
    lfs: bool = False

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @property
    def oid(self) -> str:
        """The oid the preupload endpoint reports: sha256 for LFS files, the git blob oid otherwise."""
        return self.sha256 if self.lfs else git_blob_oid(self.content)


@dataclass
class Commit:
    oid: str
    message: str
    files: dict[str, StoredFile]


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: list[Commit] = field(default_factory=list)

    @property
    def head(self) -> Commit:
        return self.commits[-1]

    def at(self, revision: str) -> Commit | None:
        if revision in ("main", "HEAD"):
            return self.head
        return next((c for c in self.commits if c.oid == revision), None)


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    status: int
    authorized: bool


class _Reply(Exception):
    """Raised inside a handler to answer with a status, JSON body and extra headers."""

    def __init__(self, status: int, body: Any = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(status)
        self.status, self.body, self.headers = status, body, headers or {}


class FakeHub:
    """The in-memory Hub; use as a context manager (`with FakeHub(token) as hub: hub.url`)."""

    def __init__(self, token: str, user: str = "tester", *, lfs_suffixes: tuple[str, ...] = (),
                 echo_token_in_errors: bool = False, offer_xet: bool = False) -> None:
        self.token = token
        self.user = user
        self.lfs_suffixes = lfs_suffixes              # files answered "lfs" by preupload; others "regular"
        self.echo_token_in_errors = echo_token_in_errors  # a careless server: 401 bodies quote the token
        self.offer_xet = offer_xet  # hand out Xet tokens (clients then take the Xet upload path for non-regular files)
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.corrupt: set[tuple[str, str]] = set()    # (repo_id, path) served with flipped bytes
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._counter = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> FakeHub:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the fake hub first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # -- what a test asserts on ---------------------------------------------------------------

    def calls(self, method: str, path_part: str = "") -> list[Request]:
        """The recorded requests of one method whose path contains `path_part`."""
        return [r for r in self.requests if r.method == method and path_part in r.path]

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        commit = self.repos[repo_id].at(revision)
        assert commit is not None, f"{repo_id} has no revision {revision}"
        return {path: f.content for path, f in commit.files.items()}

    # -- state changes (called with the lock held) ----------------------------------------------

    def _new_oid(self, *parts: str) -> str:
        self._counter += 1
        return hashlib.sha1("\0".join((str(self._counter), *parts)).encode()).hexdigest()

    def _create_repo(self, repo_id: str, private: bool) -> None:
        repo = Repo(repo_id, private)
        repo.commits.append(Commit(self._new_oid(repo_id, "initial"), "initial commit",
                                   {".gitattributes": StoredFile(GITATTRIBUTES)}))
        self.repos[repo_id] = repo

    def _commit(self, repo: Repo, lines: list[dict[str, Any]]) -> Commit:
        files = dict(repo.head.files)
        message = ""
        for line in lines:
            key, value = line.get("key"), line.get("value", {})
            if key == "header":
                message = value.get("summary", "")
            elif key == "file":
                if value.get("encoding") != "base64":
                    raise _Reply(400, {"error": f"unsupported encoding for {value.get('path')}"})
                files[value["path"]] = StoredFile(base64.b64decode(value["content"]))
            elif key == "lfsFile":
                content = self.lfs_objects.get(value["oid"])
                if content is None:
                    raise _Reply(400, {"error": f"LFS object {value['oid']} for {value['path']} was never uploaded"})
                files[value["path"]] = StoredFile(content, lfs=True)
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: f for p, f in files.items() if not p.startswith(prefix)}
            else:
                raise _Reply(400, {"error": f"unknown commit operation {key!r}"})
        commit = Commit(self._new_oid(repo.repo_id, message, *sorted(files)), message, files)
        repo.commits.append(commit)
        return commit


def _handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(_HubHandler):
        pass

    Handler.hub = hub
    return Handler


class _HubHandler(BaseHTTPRequestHandler):
    """One request: authenticate, route, answer JSON (or file bytes), record."""

    hub: FakeHub
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every answer has a Content-Length

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet test output
        pass

    def do_GET(self) -> None:
        self._handle("GET")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    # -- plumbing ----------------------------------------------------------------------------

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self, method: str) -> None:
        hub = self.hub
        split = urlsplit(self.path)
        path, query = unquote(split.path), parse_qs(split.query)
        body = self._body() if method in ("POST", "PUT") else b""
        presented = self.headers.get("Authorization", "")
        authorized = presented == f"Bearer {hub.token}"
        payload: bytes | None = None
        headers: dict[str, str] = {}
        try:
            if not authorized and not path.startswith("/lfs-upload/"):
                message = INVALID_CREDENTIALS
                if hub.echo_token_in_errors:
                    message += f": got {presented.removeprefix('Bearer ')!r}"
                raise _Reply(401, {"error": message}, {"X-Error-Message": message})
            with hub._lock:
                status, payload, headers = self._route(method, path, query, body)
        except _Reply as reply:
            status = reply.status
            headers = {"Content-Type": "application/json", **reply.headers}
            payload = json.dumps(reply.body if reply.body is not None else {}).encode()
        except Exception as exc:  # a bug here, or a request it cannot parse: fail fast (5xx would be retried)
            status, headers = 400, {"Content-Type": "application/json"}
            payload = json.dumps({"error": f"fake hub could not handle {method} {path}: {exc!r}"}).encode()
        hub.requests.append(Request(method, path, query, status, authorized))
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(payload or b"")))
        self.end_headers()
        if method != "HEAD" and payload:
            self.wfile.write(payload)

    def _json(self, data: Any, status: int = 200, headers: dict[str, str] | None = None):
        return status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})}

    # -- routes ------------------------------------------------------------------------------

    def _route(self, method: str, path: str, query: dict[str, list[str]], body: bytes):
        hub = self.hub
        if path == "/api/whoami-v2" and method == "GET":
            return self._json({"type": "user", "name": hub.user, "orgs": [],
                               "auth": {"type": "access_token", "accessToken": {"role": "write"}}})
        if path == "/api/repos/create" and method == "POST":
            return self._create(json.loads(body))
        if path == "/api/validate-yaml" and method == "POST":
            return self._validate_yaml(json.loads(body))
        if path.startswith("/api/models/"):
            return self._model_api(method, path.removeprefix("/api/models/"), query, body)
        if path.startswith("/lfs-upload/") and method == "PUT":
            oid = path.removeprefix("/lfs-upload/")
            if hashlib.sha256(body).hexdigest() != oid:
                raise _Reply(400, {"error": f"uploaded content does not match oid {oid}"})
            hub.lfs_objects[oid] = body
            return 200, b"", {}
        if path.endswith(".git/info/lfs/objects/batch") and method == "POST":
            return self._lfs_batch(path.removeprefix("/").removesuffix(".git/info/lfs/objects/batch"), json.loads(body))
        parts = path.removeprefix("/").split("/", 4)
        if len(parts) == 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(f"{parts[0]}/{parts[1]}", parts[3], parts[4], method)
        raise _Reply(404, {"error": f"fake hub: no route for {method} {path}"})

    def _repo(self, repo_id: str) -> Repo:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            raise _Reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        return repo

    def _commit_at(self, repo: Repo, revision: str) -> Commit:
        commit = repo.at(revision)
        if commit is None:
            raise _Reply(404, {"error": f"Invalid rev id: {revision}"}, {"X-Error-Code": "RevisionNotFound"})
        return commit

    def _create(self, payload: dict[str, Any]):
        hub = self.hub
        if payload.get("type", "model") != "model":
            raise _Reply(400, {"error": "the fake hub only hosts model repos"})
        namespace = payload.get("organization") or hub.user
        if namespace != hub.user:
            raise _Reply(403, {"error": f"You don't have the rights to create a model under {namespace}"})
        repo_id = f"{namespace}/{payload['name']}"
        url = f"{hub.url}/{repo_id}"
        if repo_id in hub.repos:
            raise _Reply(409, {"error": "You already created this model repo", "url": url})
        private = payload.get("visibility", "private" if payload.get("private") else "public") == "private"
        hub._create_repo(repo_id, private)
        return self._json({"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self, payload: dict[str, Any]):
        content = payload.get("content", "")
        if not content.startswith("---\n"):
            return self._json({"errors": [], "warnings": [{"message": "empty or missing yaml metadata"}]})
        try:
            meta = yaml.safe_load(content.split("---\n", 2)[1])
        except (yaml.YAMLError, IndexError) as exc:
            return self._json({"errors": [{"message": f"invalid YAML: {exc}"}]}, status=400)
        if not isinstance(meta, dict):
            return self._json({"errors": [{"message": "metadata must be a mapping"}]}, status=400)
        return self._json({"errors": [], "warnings": []})

    def _model_api(self, method: str, rest: str, query: dict[str, list[str]], body: bytes):
        parts = rest.split("/")
        repo = self._repo("/".join(parts[:2]))
        action, args = (parts[2], parts[3:]) if len(parts) > 2 else ("", [])
        if action == "" and method == "GET":
            return self._info(repo, repo.head)
        if action == "revision" and method == "GET":
            return self._info(repo, self._commit_at(repo, "/".join(args)))
        if action == "tree" and method == "GET":
            return self._tree(repo, self._commit_at(repo, args[0]), "/".join(args[1:]),
                              query.get("recursive", ["False"])[0].lower() == "true")
        if action == "preupload" and method == "POST":
            return self._preupload(repo, self._commit_at(repo, "/".join(args)), json.loads(body))
        if action == "commit" and method == "POST":
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            commit = self.hub._commit(repo, lines)
            return self._json({"success": True, "commitOid": commit.oid, "pullRequestUrl": None,
                               "commitUrl": f"{self.hub.url}/{repo.repo_id}/commit/{commit.oid}"})
        if action in ("xet-write-token", "xet-read-token"):
            if not self.hub.offer_xet:
                raise _Reply(404, {"error": "Xet storage is not enabled on this server"})
            return self._json({}, headers={"X-Xet-Cas-Url": "http://127.0.0.1:9", "X-Xet-Access-Token": "xet",
                                           "X-Xet-Token-Expiration": str(int(time.time()) + 3600)})
        raise _Reply(404, {"error": f"fake hub: no model route {method} {action}"})

    def _info(self, repo: Repo, commit: Commit):
        return self._json({"id": repo.repo_id, "modelId": repo.repo_id, "author": repo.repo_id.split("/")[0],
                           "sha": commit.oid, "private": repo.private, "disabled": False, "gated": False,
                           "siblings": [{"rfilename": p} for p in sorted(commit.files)], "tags": []})

    def _tree(self, repo: Repo, commit: Commit, folder: str, recursive: bool):
        prefix = f"{folder.strip('/')}/" if folder.strip("/") else ""
        entries, folders = [], set()
        for path, stored in sorted(commit.files.items()):
            if not path.startswith(prefix):
                continue
            below = path[len(prefix):]
            if "/" in below and not recursive:
                folders.add(prefix + below.split("/")[0])
                continue
            entry: dict[str, Any] = {"type": "file", "path": path, "size": len(stored.content),
                                     "oid": git_blob_oid(stored.content)}
            if stored.lfs:
                entry["lfs"] = {"oid": stored.sha256, "size": len(stored.content), "pointerSize": 134}
            entries.append(entry)
        entries += [{"type": "directory", "path": f, "oid": hashlib.sha1(f.encode()).hexdigest(), "size": 0}
                    for f in sorted(folders)]
        return self._json(entries)

    def _preupload(self, repo: Repo, commit: Commit, payload: dict[str, Any]):
        answers = []
        for item in payload.get("files", []):
            path = item["path"]
            lfs = path.endswith(self.hub.lfs_suffixes) if self.hub.lfs_suffixes else False
            existing = commit.files.get(path)
            oid = None
            if existing is not None:
                oid = existing.sha256 if lfs else git_blob_oid(existing.content)
            answers.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                            "oid": oid})
        return self._json({"files": answers, "commitOid": commit.oid})

    def _lfs_batch(self, repo_id: str, payload: dict[str, Any]):
        self._repo(repo_id)
        if payload.get("operation") != "upload":
            raise _Reply(400, {"message": "the fake hub only takes LFS uploads"})
        objects = []
        for obj in payload.get("objects", []):
            answer: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.hub.lfs_objects:
                answer["actions"] = {"upload": {"href": f"{self.hub.url}/lfs-upload/{obj['oid']}", "header": {}}}
            objects.append(answer)
        return 200, json.dumps({"transfer": "basic", "objects": objects}).encode(), {
            "Content-Type": "application/vnd.git-lfs+json"}

    def _resolve(self, repo_id: str, revision: str, path: str, method: str):
        repo = self._repo(repo_id)
        commit = self._commit_at(repo, revision)
        stored = commit.files.get(path)
        if stored is None:
            raise _Reply(404, {"error": f"{path} does not exist at {commit.oid}"},
                         {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit.oid})
        content = stored.content
        if (repo_id, path) in self.hub.corrupt:
            content = bytes(b ^ 0xFF for b in content[:16]) + content[16:]
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(len(content)),
                   "X-Repo-Commit": commit.oid, "Accept-Ranges": "bytes",
                   "ETag": f'"{stored.sha256 if stored.lfs else git_blob_oid(stored.content)}"'}
        if stored.lfs:
            headers |= {"X-Linked-Etag": f'"{stored.sha256}"', "X-Linked-Size": str(len(content))}
        return 200, (b"" if method == "HEAD" else content), headers

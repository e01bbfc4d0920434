"""A small Hugging Face Hub on 127.0.0.1 for tests/test_push.py: what create_repo and create_commit call, no more.

huggingface_hub (2.x) is pointed at it with ``HF_ENDPOINT`` in a subprocess (the variable is read
when huggingface_hub is imported, into ``huggingface_hub.constants.ENDPOINT``) or, in this
process, by setting that constant; ``HF_HUB_DISABLE_XET=1`` (or the constant
``HF_HUB_DISABLE_XET``) makes it upload through LFS. With hf_xet installed it otherwise takes the
Xet path without asking the LFS batch endpoint; a Xet request is not served here, so it lands in
``unexpected`` and fails the test.

Endpoints (every ``/api`` and ``.git`` request needs ``Authorization: Bearer <token>``, else 401):

    GET  /api/agent-harnesses                   the list huggingface_hub builds its user agent from: empty
    POST /api/repos/create                      create a repo; 409 when it exists; or answer ``create_status``
    GET  /api/models/ORG/NAME[/revision/REV]    repo_info: create_repo asks it after a 403, push before a branch
    POST /api/models/ORG/NAME/branch/BRANCH     create_branch, from main
    POST /api/validate-yaml                     the model card's metadata: accepted, or ``card_errors`` (400)
    POST /api/models/ORG/NAME/preupload/REV     upload modes: LFS for *.safetensors and binary samples
    POST /ORG/NAME.git/info/lfs/objects/batch   the "basic" transfer only: one PUT URL per object
    PUT  /lfs/OID                               an object's bytes, checked against its sha256 and size
    POST /api/models/ORG/NAME/commit/REV        the NDJSON commit: recorded in ``commits``

Anything else is recorded in ``unexpected`` and answered 404. The server stops itself after
``lifetime`` seconds and refuses bodies over ``MAX_BODY`` bytes.

Example:
    >>> with HubServer(token="hf_x") as hub:
    ...     hub.url.startswith("http://127.0.0.1:"), hub.commits
    (True, [])
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

MAX_BODY = 64 << 20
USER = "test-user"  # the namespace of a repo id given without one
_REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
ROUTES = [
    ("GET", re.compile(r"/api/agent-harnesses"), "agents"),
    ("POST", re.compile(r"/api/repos/create"), "create"),
    ("GET", re.compile(rf"/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?"), "info"),
    ("POST", re.compile(rf"/api/models/{_REPO}/branch/(?P<rev>[^/]+)"), "new_branch"),
    ("POST", re.compile(r"/api/validate-yaml"), "validate"),
    ("POST", re.compile(rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)"), "preupload"),
    ("POST", re.compile(rf"/{_REPO}\.git/info/lfs/objects/batch"), "lfs_batch"),
    ("PUT", re.compile(r"/lfs/(?P<oid>[0-9a-f]{64})"), "lfs_put"),
    ("POST", re.compile(rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)"), "commit"),
]

# Asked without a token: the presigned upload URL, and the harness list huggingface_hub's user agent is built from.
OPEN_ROUTES = ("lfs_put", "agents")


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, header_message: str | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.code, self.header_message = status, message, code, header_message
        self.extra = extra  # more of the JSON body


class HubServer:
    """The fake Hub; a context manager. ``create_status`` (e.g. 403) refuses every create.

    Records: ``requests`` (method, route, path, query, auth header), ``creates`` (create payloads),
    ``lfs_batches``, ``commits`` (repo_id, revision, create_pr, summary, description, files
    {path: sha256}, lfs [paths sent as LFS]), ``unexpected``; ``repos`` holds each repo's branches.
    """

    def __init__(self, token: str | None = "hf_test", *, lifetime: float = 120.0):
        self.token = token
        self.create_status: int | None = None
        self.card_errors: list[str] = []  # what validate-yaml answers (400) about the model card's metadata
        self.requests: list[dict] = []
        self.creates: list[dict] = []
        self.lfs_batches: list[dict] = []
        self.commits: list[dict] = []
        self.unexpected: list[str] = []
        self.repos: dict[str, dict] = {}
        self.blobs: dict[str, bytes] = {}
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                outer._serve(self, "GET")

            def do_POST(self):
                outer._serve(self, "POST")

            def do_PUT(self):
                outer._serve(self, "PUT")

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.timer = threading.Timer(lifetime, self.httpd.shutdown)  # a test that hangs cannot keep it alive
        self.timer.daemon = True

    def __enter__(self) -> HubServer:
        self.thread.start()
        self.timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.timer.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()

    # --- helpers for tests ----------------------------------------------------------------------

    def add_repo(self, repo_id: str, *, private: bool = False) -> None:
        """A repo that exists before the test (one empty commit on main)."""
        self.repos[repo_id] = {"private": private, "branches": {"main": {}}, "heads": {"main": "0" * 40}}

    def files(self, repo_id: str, revision: str = "main") -> dict[str, str]:
        """path -> sha256 of what ``revision`` of ``repo_id`` holds now."""
        return dict(self.repos[repo_id]["branches"][revision])

    # --- the server ----------------------------------------------------------------------------

    def _serve(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        split = urlsplit(handler.path)
        path = unquote(split.path)
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        route, match = next(
            ((name, m) for verb, rx, name in ROUTES if verb == method and (m := rx.fullmatch(path))), (None, None)
        )
        auth = handler.headers.get("Authorization")
        with self.lock:
            self.requests.append({"method": method, "route": route, "path": path, "query": query, "auth": auth})
        try:
            body = _read_body(handler)
            if route is None:
                with self.lock:
                    self.unexpected.append(f"{method} {handler.path}")
                raise HubError(404, f"not served by the test Hub: {method} {path}")
            if route not in OPEN_ROUTES and self.token is not None and auth != f"Bearer {self.token}":
                raise HubError(401, "Invalid credentials", header_message="Invalid credentials in Authorization header")
            with self.lock:
                status, payload = getattr(self, f"_{route}")(match.groupdict(), query, body)
        except HubError as exc:
            status, payload = exc.status, {"error": exc.message, **exc.extra}
            headers = {"X-Error-Code": exc.code, "X-Error-Message": exc.header_message}
        else:
            headers = {}
        data = json.dumps(payload).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        for key, value in headers.items():
            if value:
                handler.send_header(key, value)
        handler.end_headers()
        handler.wfile.write(data)

    def _repo(self, repo_id: str) -> dict:
        if repo_id not in self.repos:
            raise HubError(404, "Repository not found", code="RepoNotFound")
        return self.repos[repo_id]

    def _branch(self, repo: dict, rev: str) -> dict:
        rev = unquote(rev)
        if rev not in repo["branches"]:
            raise HubError(404, f"Invalid rev id: {rev}", code="RevisionNotFound")
        return repo["branches"][rev]

    def _agents(self, _, __, ___):
        return 200, {"standardEnvVars": [], "harnesses": {}}

    def _create(self, _, __, body):
        payload = json.loads(body)
        self.creates.append(payload)
        if self.create_status is not None:
            raise HubError(self.create_status, "You don't have the rights to create a model under this namespace")
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        if repo_id in self.repos:
            raise HubError(409, "You already created this model repo", url=f"{self.url}/{repo_id}")
        self.add_repo(repo_id, private=payload.get("visibility") == "private")
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}

    def _info(self, match, _, __):
        repo = self._repo(match["repo"])
        rev = match["rev"] or "main"
        self._branch(repo, rev)
        return 200, {"id": match["repo"], "sha": repo["heads"][unquote(rev)], "private": repo["private"]}

    def _new_branch(self, match, _, __):
        repo = self._repo(match["repo"])
        rev = unquote(match["rev"])
        if rev in repo["branches"]:
            raise HubError(409, "Reference already exists")
        repo["branches"][rev] = dict(repo["branches"]["main"])
        repo["heads"][rev] = repo["heads"]["main"]
        return 200, {}

    def _validate(self, _, __, body):
        json.loads(body)
        return (400 if self.card_errors else 200), {
            "errors": [{"message": m} for m in self.card_errors],
            "warnings": [],
        }

    def _preupload(self, match, _, body):
        repo = self._repo(match["repo"])
        self._branch(repo, match["rev"])
        files = json.loads(body)["files"]
        modes = []
        for f in files:
            sample = base64.b64decode(f["sample"])
            lfs = f["path"].endswith(".safetensors") or b"\0" in sample
            modes.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False})
        return 200, {"files": modes}

    def _lfs_batch(self, match, _, body):
        self._repo(match["repo"])
        payload = json.loads(body)
        self.lfs_batches.append(payload)
        if payload.get("operation") != "upload" or "basic" not in payload.get("transfers", []):
            raise HubError(422, "this Hub speaks the basic LFS transfer only")
        objects = []
        for obj in payload["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.blobs:
                entry["actions"] = {"upload": {"href": f"{self.url}/lfs/{obj['oid']}"}}
            objects.append(entry)
        return 200, {"transfer": "basic", "objects": objects}

    def _lfs_put(self, match, _, body):
        if hashlib.sha256(body).hexdigest() != match["oid"]:
            raise HubError(400, "the object's bytes do not have its sha256")
        self.blobs[match["oid"]] = body
        return 200, {}

    def _commit(self, match, query, body):
        repo = self._repo(match["repo"])
        rev = unquote(match["rev"])
        create_pr = query.get("create_pr") == "1"
        target = self._branch(repo, rev)
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        files, lfs = {}, []
        for line in lines:
            value = line["value"]
            if line["key"] == "file":
                data = base64.b64decode(value["content"])
                files[value["path"]] = hashlib.sha256(data).hexdigest()
                self.blobs[files[value["path"]]] = data
            elif line["key"] == "lfsFile":
                blob = self.blobs.get(value["oid"])
                if blob is None or len(blob) != value.get("size", len(blob)):
                    raise HubError(422, f"LFS object of {value['path']} was never uploaded")
                files[value["path"]] = value["oid"]
                lfs.append(value["path"])
            elif line["key"] != "header":
                raise HubError(400, f"this Hub does not take {line['key']!r} in a commit")
        oid = hashlib.sha1(body).hexdigest()
        commit = {
            "repo_id": match["repo"],
            "revision": rev,
            "create_pr": create_pr,
            "summary": header.get("summary"),
            "description": header.get("description"),
            "files": files,
            "lfs": sorted(lfs),
            "oid": oid,
        }
        self.commits.append(commit)
        answer = {"commitUrl": f"{self.url}/{match['repo']}/commit/{oid}", "commitOid": oid, "success": True}
        if create_pr:
            answer["pullRequestUrl"] = f"{self.url}/{match['repo']}/discussions/{len(self.commits)}"
        else:
            target.update(files)
            repo["heads"][rev] = oid
        return 200, answer


def _read_body(handler: BaseHTTPRequestHandler) -> bytes:
    """The request body, by Content-Length or chunked (httpx streams file uploads), at most MAX_BODY bytes."""
    length = handler.headers.get("Content-Length")
    if length is not None:
        if int(length) > MAX_BODY:
            raise HubError(413, "body too large for the test Hub")
        return handler.rfile.read(int(length))
    if "chunked" not in (handler.headers.get("Transfer-Encoding") or ""):
        return b""
    parts, total = [], 0
    while True:
        size = int(handler.rfile.readline().split(b";")[0].strip(), 16)
        if size == 0:
            handler.rfile.readline()
            return b"".join(parts)
        total += size
        if total > MAX_BODY:
            raise HubError(413, "body too large for the test Hub")
        parts.append(handler.rfile.read(size))
        handler.rfile.readline()

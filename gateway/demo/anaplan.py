"""A stand-in for a handful of Anaplan Integration API v2 endpoints, for the demo.

Shapes follow Anaplan's public API documentation (``meta``/``status`` envelopes,
workspaces, models, imports and their tasks, files and chunks). It keeps state in
memory and, as Anaplan does, answers 401 to anything but ``AnaplanAuthToken`` with a
live token its token service (:mod:`gateway.demo.tokenservice`) issued.

So that a user can see what reached "Anaplan", each answer carries
``X-Standin-Received`` and each call is logged: the scheme, a fingerprint of the
credential (the first 8 hex digits of its SHA-256, nothing to replay) and which
token-service sign-in issued it. :func:`token_service_app` logs the sign-ins.
"""

from __future__ import annotations

import hashlib
import itertools
import time
import uuid
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from gateway.demo.tokenservice import TokenServiceStandIn

Log = Callable[[str], None]
_USER = web.RequestKey("user", str)  # whom the presented token was issued to

WORKSPACE = "8a868cd97f8d0b50017fa0d6bb4f1d4c"
MODELS = [
    {"id": "75A40874E6B64FA3AE0743278996850F", "name": "FP&A Consolidation"},
    {"id": "0E5C1D1E0E3B4D6E8F0A1B2C3D4E5F60", "name": "Sales Forecasting"},
]
IMPORTS = [
    {"id": "112000000001", "name": "Actuals from ERP.csv", "importDataSourceId": "113000000001",
     "importType": "MODULE_DATA"},
    {"id": "112000000002", "name": "Employees.csv", "importDataSourceId": "113000000002",
     "importType": "HIERARCHY_DATA"},
]
FILES = [
    {"id": "113000000001", "name": "Actuals from ERP.csv", "chunkCount": 0, "delimiter": ",",
     "encoding": "UTF-8", "firstDataRow": 2, "format": "txt", "headerRow": 1,
     "separator": ","},
    {"id": "113000000002", "name": "Employees.csv", "chunkCount": 0, "delimiter": ",",
     "encoding": "UTF-8", "firstDataRow": 2, "format": "txt", "headerRow": 1,
     "separator": ","},
]


def _ok(**body: Any) -> web.Response:
    return web.json_response({"meta": {"schema": "https://api.anaplan.com/2/0/objects"},
                              "status": {"code": 200, "message": "Success"}, **body})


def _paged(name: str, items: list[dict[str, Any]]) -> web.Response:
    return web.json_response({
        "meta": {"paging": {"currentPageSize": len(items), "offset": 0,
                            "totalSize": len(items)},
                 "schema": f"https://api.anaplan.com/2/0/objects/{name[:-1]}"},
        "status": {"code": 200, "message": "Success"}, name: items})


def _not_found(what: str) -> web.Response:
    return web.json_response({"status": {"code": 404, "message": f"{what} not found"}},
                             status=404)


def fingerprint(credential: str) -> str:
    """The first 8 hex digits of ``credential``'s SHA-256: tells tokens apart in a log."""
    return hashlib.sha256(credential.encode()).hexdigest()[:8]


def _require_issued_token(tokens: TokenServiceStandIn, log: Log) -> Middleware:
    """The API's check: a live ``AnaplanAuthToken`` that ``tokens`` issued, else 401."""

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        value = value.strip()
        seen = f"{scheme} sha256:{fingerprint(value)}" if value else "no credential"
        issued = tokens.live(value) if scheme == "AnaplanAuthToken" and value else None
        if issued is None:
            log(f"{request.method} {request.path} -> 401: received {seen}, "
                "not a token the token service issued")
            return web.json_response({"status": {"code": 401, "message": "Unauthorized"}},
                                     status=401)
        number = list(tokens.tokens).index(value) + 1
        received = (f"{seen} = token-service token #{number} of {issued.user} "
                    f"(sign-ins so far: {tokens.calls['authenticate']})")
        request[_USER] = issued.user
        resp = await handler(request)
        resp.headers["X-Standin-Received"] = received
        log(f"{request.method} {request.path} -> {resp.status}: received {received}")
        return resp

    return check


def token_service_app(tokens: TokenServiceStandIn, log: Log) -> web.Application:
    """The token service of ``tokens``, logging each sign-in and refresh."""
    app = tokens.app()

    @web.middleware
    async def note(request: web.Request, handler: Handler) -> web.StreamResponse:
        resp = await handler(request)
        name = request.path.removeprefix("/token/")
        if name in ("authenticate", "refresh"):
            scheme = request.headers.get("Authorization", "").partition(" ")[0]
            if resp.status != 200:
                what = f"refused ({resp.status})"
            elif name == "refresh":
                what = "token refreshed"
            else:
                issued = list(tokens.tokens.values())[-1]
                what = f"issued token #{len(tokens.tokens)} to {issued.user}"
            log(f"token service: {name} #{tokens.calls[name]} with {scheme or 'nothing'}: "
                + what)
        return resp

    app.middlewares.append(note)
    return app


class AnaplanStandIn:
    """The in-memory state and the handlers."""

    def __init__(self) -> None:
        self.tasks: dict[str, dict[str, Any]] = {}
        self.chunks: dict[str, dict[int, bytes]] = {str(f["id"]): {} for f in FILES}
        self._ids = itertools.count(1)

    async def me(self, request: web.Request) -> web.Response:
        # whom the token was issued to: with the gateway in service mode, its identity
        user = request[_USER]
        return _ok(user={"id": uuid.uuid5(uuid.NAMESPACE_OID, user).hex, "active": True,
                         "email": user, "emailOptIn": False,
                         "firstName": user.partition("@")[0], "lastName": "",
                         "lastLoginDate": time.strftime("%Y-%m-%dT%H:%M:%S.000+0000")})

    async def workspaces(self, request: web.Request) -> web.Response:
        return _paged("workspaces", [{"id": WORKSPACE, "name": "Finance Planning",
                                      "active": True, "sizeAllowance": 10737418240,
                                      "currentSize": 1564482930}])

    def _check(self, request: web.Request) -> web.Response | None:
        if request.match_info.get("ws", WORKSPACE) != WORKSPACE:
            return _not_found("Workspace")
        if "model" in request.match_info and request.match_info["model"] not in {
                m["id"] for m in MODELS}:
            return _not_found("Model")
        return None

    async def models(self, request: web.Request) -> web.Response:
        return self._check(request) or _paged("models", [
            {**m, "activeState": "UNLOCKED", "currentWorkspaceId": WORKSPACE,
             "currentWorkspaceName": "Finance Planning", "modelUrl":
             f"https://us1a.app.anaplan.com/core/...&selectedModelId={m['id']}",
             "categoryValues": []} for m in MODELS])

    async def imports(self, request: web.Request) -> web.Response:
        return self._check(request) or _paged("imports", IMPORTS)

    async def files(self, request: web.Request) -> web.Response:
        return self._check(request) or _paged("files", [
            {**f, "chunkCount": len(self.chunks[str(f["id"])])} for f in FILES])

    async def start_task(self, request: web.Request) -> web.Response:
        if (bad := self._check(request)) is not None:
            return bad
        if request.match_info["import"] not in {i["id"] for i in IMPORTS}:
            return _not_found("Import")
        task_id = uuid.uuid4().hex.upper()
        self.tasks[task_id] = {"created": time.time(), "import": request.match_info["import"]}
        return _ok(task={"taskId": task_id})

    async def task(self, request: web.Request) -> web.Response:
        task = self.tasks.get(request.match_info["task"])
        if task is None:
            return _not_found("Task")
        done = time.time() - task["created"] > 2
        return _ok(task={
            "type": "taskInformation", "taskId": request.match_info["task"],
            "taskState": "COMPLETE" if done else "IN_PROGRESS",
            "progress": 1.0 if done else 0.5,
            "currentStep": "Complete." if done else "Importing...",
            "creationTime": int(task["created"] * 1000),
            "result": {"successful": True, "failureDumpAvailable": False,
                       "objectId": task["import"]} if done else None})

    async def put_chunk(self, request: web.Request) -> web.Response:
        file_id = request.match_info["file"]
        if file_id not in self.chunks:
            return _not_found("File")
        self.chunks[file_id][int(request.match_info["chunk"])] = await request.read()
        return web.Response(status=204)

    async def list_chunks(self, request: web.Request) -> web.Response:
        file_id = request.match_info["file"]
        if file_id not in self.chunks:
            return _not_found("File")
        return _paged("chunks", [{"id": str(i), "name": f"Chunk {i}"}
                                 for i in sorted(self.chunks[file_id])])

    async def get_chunk(self, request: web.Request) -> web.Response:
        data = self.chunks.get(request.match_info["file"], {}).get(
            int(request.match_info["chunk"]))
        if data is None:
            return _not_found("Chunk")
        return web.Response(body=data, content_type="application/octet-stream")


def create_app(tokens: TokenServiceStandIn, log: Log = lambda line: None
               ) -> web.Application:
    """The stand-in API as an aiohttp app, taking the tokens ``tokens`` issued."""
    s = AnaplanStandIn()
    app = web.Application(middlewares=[_require_issued_token(tokens, log)],
                          client_max_size=64 * 2**20)
    base = "/2/0/workspaces/{ws}/models/{model}"
    app.router.add_get("/2/0/users/me", s.me)
    app.router.add_get("/2/0/workspaces", s.workspaces)
    app.router.add_get("/2/0/workspaces/{ws}/models", s.models)
    app.router.add_get(base + "/imports", s.imports)
    app.router.add_post(base + "/imports/{import}/tasks", s.start_task)
    app.router.add_get(base + "/imports/{import}/tasks/{task}", s.task)
    app.router.add_get(base + "/files", s.files)
    app.router.add_get(base + "/files/{file}/chunks", s.list_chunks)
    app.router.add_put(base + "/files/{file}/chunks/{chunk:\\d+}", s.put_chunk)
    app.router.add_get(base + "/files/{file}/chunks/{chunk:\\d+}", s.get_chunk)
    return app

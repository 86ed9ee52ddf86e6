"""``python -m bench``: see :mod:`bench`."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys

from bench.harness import Options
from bench.load import wrk_available
from bench.scenarios import SCENARIOS, run
from bench.services import loop_factory


def parse_options(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Load the reference bare proxy and the gateway back to back, per "
                    "scenario, and print requests/s, p50, p99 and their ratio.")
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds of load per proxy and scenario, in 1-second runs "
                             "alternating bare and gateway (default 8, --quick 2)")
    parser.add_argument("--connections", type=int, default=32,
                        help="concurrent keep-alive connections (default 32)")
    parser.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS),
                        default=list(Options().scenarios), metavar="NAME",
                        help=f"any of {', '.join(SCENARIOS)} (default: all but "
                             "instructions, which needs valgrind and takes ~2 minutes)")
    parser.add_argument("--quick", action="store_true",
                        help="2-second runs, 1 MiB bodies only: about 40 seconds in all")
    parser.add_argument("--no-pin", dest="pin", action="store_false",
                        help="let every process run on every CPU (default: the proxy under "
                             "test alone on the last CPU, everything else on the others)")
    parser.add_argument("--instruction-requests", type=int, default=None, metavar="N",
                        help="requests counted per proxy by the instructions scenario "
                             "(default 2000)")
    parser.add_argument("--generator", choices=("auto", "wrk", "asyncio"), default="auto",
                        help="load generator (default: wrk when on PATH, else asyncio)")
    args = parser.parse_args(argv)
    generator = args.generator
    if generator == "auto":
        generator = "wrk" if wrk_available() else "asyncio"
    elif generator == "wrk" and not wrk_available():
        parser.error("wrk is not on PATH (Debian: apt-get install wrk)")
    if args.connections < 1 or (args.duration is not None and args.duration <= 0):
        parser.error("--connections and --duration must be positive")
    duration = args.duration if args.duration is not None else 2.0 if args.quick else 8.0
    options = Options(duration=duration, connections=args.connections, generator=generator,
                      scenarios=tuple(dict.fromkeys(args.scenarios)), pin=args.pin)
    if args.instruction_requests is not None:
        if args.instruction_requests < 1:
            parser.error("--instruction-requests must be positive")
        options = dataclasses.replace(options, instruction_requests=args.instruction_requests)
    if args.quick:
        options = dataclasses.replace(options, bodies=("1 MiB down", "1 MiB up"))
    return options


def main(argv: list[str] | None = None) -> int:
    options = parse_options(argv)
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        report = runner.run(run(options, sys.stdout))
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())

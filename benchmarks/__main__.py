"""python -m benchmarks: measure the service and its ceilings in one run, print one table."""

from __future__ import annotations

import argparse
import sys


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def _workers(text: str) -> list[int]:
    try:
        counts = [int(n) for n in _names(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of worker counts: {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"worker counts must be >= 1: {text!r}")
    return counts


def _positive(kind: type) -> object:
    def parse(text: str) -> object:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0: {text!r}")
        return value

    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Measure telemetry-ingest and the ceilings it runs under, side by side, in one run.",
    )
    p.add_argument("--duration", type=_positive(float), default=10.0, help="seconds per measurement (default 10)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of uncounted load before each (default 1)")
    p.add_argument("--concurrency", type=_positive(int), default=64,
                   help="closed-loop requests in flight = client connection limit (default 64)")
    p.add_argument("--workers", type=_workers, default=[1, 2], help="server worker counts to measure (default 1,2)")
    p.add_argument("--only", type=_names, metavar="NAME[,NAME]",
                   help="run only these benchmarks (plus the ceilings they are compared with)")
    p.add_argument("--dsn", help="use this PostgreSQL (default: an embedded one in a temporary directory)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    open_loop = p.add_mutually_exclusive_group()
    open_loop.add_argument("--open-fraction", type=_positive(float), metavar="F",
                           help="after each closed-loop run, an open-loop run at F x its rate; reports p99")
    open_loop.add_argument("--open-rate", type=_positive(float), metavar="RPS",
                           help="after each closed-loop run, an open-loop run at RPS requests/s; reports p99")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from . import runner

    if args.list:
        for name, bench in runner.load_registry().items():
            needs = f" (with {', '.join(bench.needs)})" if bench.needs else ""
            print(f"{name:18} {bench.doc}{needs}")
        return 0
    return runner.main(args)


if __name__ == "__main__":
    sys.exit(main())

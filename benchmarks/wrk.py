"""wrk as the closed-loop load generator: a native client, so the ceilings are the server's, not the client's.

The requests are the same ``Request`` objects the aiohttp driver sends: a fixed
cycle of them is written into a Lua script (method, path, headers and body of
each, pre-formatted once per wrk thread), and the script's ``response`` hook
counts every status and checks the body of each expected one for a substring
(``needle``), so an answer that is not what the benchmark expects is an error,
as with the aiohttp driver. ``done`` prints one JSON line with the counts and
wrk's latency percentiles.

wrk is taken from PATH; when it is missing and this process runs as root,
``ensure_wrk`` installs the Debian package once (``apt-get install -y wrk``,
after ``apt-get update`` if the first attempt fails). Otherwise the suite falls
back to the aiohttp driver and says so in each figure's notes.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from .loadgen import LoadStats, Request

APT_TIMEOUT = 300.0  # seconds for apt-get
WRK_TIMEOUT = "10s"  # wrk's per-request timeout, like the aiohttp driver's REQUEST_TIMEOUT


@functools.cache
def ensure_wrk() -> tuple[str | None, str]:
    """(path of wrk or None, how it was found: a note for the table when missing)."""
    found = shutil.which("wrk")
    if found:
        return found, "wrk"
    if os.name != "posix" or os.geteuid() != 0 or not shutil.which("apt-get"):
        return None, "aiohttp driver (wrk missing; not root, so not installed)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for attempt in (["apt-get", "install", "-y", "-q", "wrk"], ["apt-get", "update", "-q"],
                    ["apt-get", "install", "-y", "-q", "wrk"]):
        print(f"benchmarks: {' '.join(attempt)}", file=sys.stderr, flush=True)
        try:
            done = subprocess.run(attempt, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  timeout=APT_TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return None, f"aiohttp driver (wrk missing; apt-get failed: {exc})"
        if attempt[1] == "install" and done.returncode == 0 and shutil.which("wrk"):
            return shutil.which("wrk"), "wrk (installed by apt-get)"
    return None, "aiohttp driver (wrk missing; apt-get install wrk failed)"


def _lua_string(data: bytes | str) -> str:
    """A Lua string literal holding exactly ``data`` (bytes as decimal escapes where needed)."""
    raw = data.encode() if isinstance(data, str) else data
    out = []
    for byte in raw:
        ch = chr(byte)
        if ch in '"\\' or byte < 32 or byte > 126:
            out.append(f"\\{byte:03d}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


SCRIPT_TAIL = r"""
local threads = {}
function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

local formatted = {}
local n = 0
counts = {}
function init(args)
  for i, r in ipairs(reqs) do
    formatted[i] = wrk.format(r[1], r[2], r[3], r[4])
  end
  n = (tid or 0) * 7919  -- threads start at different points of the cycle
end

function request()
  n = n + 1
  return formatted[(n - 1) % #formatted + 1]
end

function response(status, headers, body)
  local key = tostring(status)
  if expect[status] then
    if needle ~= nil and (body == nil or not string.find(body, needle, 1, true)) then
      key = key .. ":bad_body"
    end
  end
  counts[key] = (counts[key] or 0) + 1
end

function done(summary, latency, requests)
  local total = {}
  for _, t in ipairs(threads) do
    for k, v in pairs(t:get("counts")) do total[k] = (total[k] or 0) + v end
  end
  local parts = {}
  for k, v in pairs(total) do parts[#parts + 1] = string.format('"%s":%d', k, v) end
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"duration_us":%d,"requests":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"p50_us":%d,"p95_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%f,"statuses":{%s}}\n',
    summary.duration, summary.requests, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.max, latency.mean,
    table.concat(parts, ",")))
end
"""


def write_script(path: Path, requests: Sequence[Request], needle: bytes | None) -> None:
    """The Lua script cycling through ``requests``; all must share one expected status set."""
    lines = ["reqs = {"]
    for req in requests:
        parts = urlsplit(req.url)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        headers = ", ".join(f"[{_lua_string(k)}] = {_lua_string(v)}" for k, v in (req.headers or {}).items())
        body = _lua_string(req.body) if req.body is not None else "nil"
        lines.append(f"  {{{_lua_string(req.method)}, {_lua_string(target)}, {{{headers}}}, {body}}},")
    lines.append("}")
    expect = ", ".join(f"[{status}] = true" for status in sorted(requests[0].expect))
    lines.append(f"expect = {{{expect}}}")
    lines.append(f"needle = {_lua_string(needle) if needle is not None else 'nil'}")
    path.write_text("\n".join(lines) + SCRIPT_TAIL)


def _seconds(value: float) -> str:
    return f"{max(1, math.ceil(value))}s"


async def run(
    wrk: str,
    script: Path,
    url: str,
    *,
    concurrency: int,
    duration: float,
    cores: Sequence[int] | None,
    expect: frozenset[int],
) -> tuple[LoadStats, float]:
    """One wrk run; returns its LoadStats (latencies as percentiles only) and wrk's CPU seconds."""
    threads = max(1, min(len(cores) if cores else 1, concurrency))
    argv = [wrk, f"-t{threads}", f"-c{concurrency}", f"-d{_seconds(duration)}", "--timeout", WRK_TIMEOUT,
            "-s", str(script), url]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None,
    )
    started = time.perf_counter()
    out, err = await asyncio.wait_for(proc.communicate(), duration + 60)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk exited {proc.returncode}: {err.decode(errors='replace')[-500:]}")
    found = [line for line in out.decode(errors="replace").splitlines() if line.startswith("WRK_JSON ")]
    if not found:
        raise RuntimeError(f"wrk printed no summary: {out.decode(errors='replace')[-500:]}")
    data = json.loads(found[-1].removeprefix("WRK_JSON "))
    stats = LoadStats("closed")
    stats.elapsed = data["duration_us"] / 1e6 or wall
    statuses: Counter[str] = Counter({k: int(v) for k, v in data["statuses"].items()})
    for kind, count in data["errors"].items():
        if count and kind != "status":  # non-2xx/3xx statuses are already counted by status
            statuses[f"socket_{kind}"] += int(count)
    expected = {str(s) for s in expect}
    stats.statuses = statuses
    stats.ok = sum(v for k, v in statuses.items() if k in expected)
    stats.errors = sum(statuses.values()) - stats.ok
    stats.fixed_percentiles = {q: data[f"p{q}_us"] / 1000 for q in (50, 95, 99)}
    stats.fixed_percentiles[100] = data["max_us"] / 1000
    stats.answered = int(data["requests"])
    return stats, cpu


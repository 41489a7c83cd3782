"""Reading request bodies: content type, encoding, size limits while reading and while inflating, JSON."""

from __future__ import annotations

import asyncio
import io
import json
import zlib
from typing import Any

import orjson
import zstandard
from aiohttp import web

from ingest.errors import BadRequest, RequestTimeout, TooLarge, UnsupportedMedia
from ingest.http.budget import JsonBudget
from ingest.keys import SETTINGS

_CHUNK = 64 * 1024
ENCODINGS = ("identity", "gzip", "zstd")


def check_content_type(request: web.Request) -> None:
    """415 unless the body is declared application/json (charset, if any, utf-8)."""
    if request.headers.get("Content-Type") == "application/json":  # the usual header, without parsing it
        return
    if request.content_type != "application/json":
        raise UnsupportedMedia("Content-Type must be application/json")
    charset = request.charset
    if charset and charset.lower() not in ("utf-8", "utf8"):
        raise UnsupportedMedia("JSON bodies must be UTF-8")


def content_encoding(request: web.Request) -> str:
    """The body's Content-Encoding, lower-cased; 415 for anything but identity, gzip or zstd."""
    enc = request.headers.get("Content-Encoding", "identity").strip().lower() or "identity"
    if enc not in ENCODINGS:
        raise UnsupportedMedia("Content-Encoding must be identity, gzip or zstd")
    return enc


async def read_raw(request: web.Request, limit: int, timeout: float | None = None) -> bytes:
    """The body as sent, refused with 413 as soon as it passes limit (whatever Content-Length says),
    and with 408 if the client takes longer than timeout seconds to send it."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise TooLarge(f"body is larger than {limit} bytes")
    content = request.content
    if content.is_eof():  # the whole body came with the headers (a usual heartbeat): no wait, no timer
        whole = content.read_nowait()
        if len(whole) > limit:
            raise TooLarge(f"body is larger than {limit} bytes")
        return whole
    buf = bytearray()
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.content.iter_chunked(_CHUNK):
                buf += chunk
                if len(buf) > limit:
                    raise TooLarge(f"body is larger than {limit} bytes")
    except TimeoutError:
        raise RequestTimeout(f"the body was not received within {timeout:g} seconds") from None
    return bytes(buf)


# A zstd frame may ask for a window of up to 2 GiB, allocated by the decoder whatever the body's
# size; 8 MiB covers every level up to 19 (zstd's --ultra levels are refused with 413).
ZSTD_MAX_WINDOW = 1 << 23


def inflate(data: bytes, encoding: str, limit: int, budget: JsonBudget | None = None) -> bytes:
    """Decompress, stopping with 413 once the output passes limit (never inflating a bomb whole).

    A gzip body must be exactly one member with nothing after it, a zstd body exactly one
    complete frame; anything else is 400 naming the encoding (a proxy that reads further
    members or frames would see another body than this service).

    Output is taken a chunk at a time into a list, joined once at the end: a growing buffer
    would be copied on the way (two copies alive at each step), a list never is, so refusing a
    bomb costs about limit bytes at most. Each chunk is counted by budget (if given) as it comes,
    so a body of too many JSON values is refused after about that many values' worth of
    output, however far it would inflate.
    """
    if encoding == "identity":
        if len(data) > limit:
            raise TooLarge(f"body is larger than {limit} bytes")
        if budget is not None:
            budget.feed(data)
        return data
    chunks: list[bytes] = []
    size = 0
    try:
        if encoding == "gzip":
            d = zlib.decompressobj(wbits=31)
            pending = data
            while pending:
                chunk = d.decompress(pending, min(_CHUNK * 4, limit + 1 - size))
                size = _take(chunks, chunk, size, limit, budget)
                pending = d.unconsumed_tail
                if d.eof:
                    break
            if not d.eof:
                size = _take(chunks, d.flush(limit + 1 - size), size, limit, budget)
            if not d.eof:
                raise BadRequest("truncated gzip body")
            if d.unused_data:
                raise BadRequest("a gzip body must be exactly one gzip member with nothing after it")
            return b"".join(chunks)
        if zstandard.get_frame_parameters(data).window_size > ZSTD_MAX_WINDOW:
            raise TooLarge(f"zstd window over {ZSTD_MAX_WINDOW} bytes")
        decompressor = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
        # First pass: the first frame, within limit and budget, a chunk at a time.
        reader = decompressor.stream_reader(io.BytesIO(data), read_across_frames=False)
        while chunk := reader.read(_CHUNK * 4):
            size = _take(None, chunk, size, limit, budget)  # measured and counted, not kept
        # Second pass, now that its output is known to be small enough to take at once: whether
        # that frame is complete and alone (the streaming reader says neither).
        whole = decompressor.decompressobj()
        out = whole.decompress(data)
        if not whole.eof:
            raise BadRequest("truncated zstd body")
        if whole.unused_data:
            raise BadRequest("a zstd body must be exactly one zstd frame with nothing after it")
        if len(out) != size:  # pragma: no cover - the same frame decoded twice
            raise BadRequest("body is not valid zstd")
        return out
    except (zlib.error, zstandard.ZstdError):
        raise BadRequest(f"body is not valid {encoding}") from None
    finally:
        chunks.clear()  # a refused body's output goes now, not whenever its traceback does


def _take(chunks: list[bytes] | None, chunk: bytes, size: int, limit: int, budget: JsonBudget | None) -> int:
    """Append one chunk of output (413 once past limit; counted by budget); the new size."""
    size += len(chunk)
    if size > limit:
        raise TooLarge(f"body inflates past {limit} bytes")
    if budget is not None:
        budget.feed(chunk)
    if chunks is not None:
        chunks.append(chunk)
    return size


def parse_object(data: bytes | bytearray) -> dict[str, Any]:
    """Parse a JSON object (400 for invalid JSON, invalid UTF-8, a duplicate key or a non-object)."""
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise BadRequest("body is not valid JSON") from None
    if not isinstance(doc, dict):
        raise BadRequest("body must be a JSON object")
    if has_duplicate_keys(data, doc):
        raise BadRequest("body has an object with a duplicate key")
    return doc


class _DuplicateKey(Exception):
    pass


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise _DuplicateKey
    return out


def has_duplicate_keys(data: bytes | bytearray, doc: Any) -> bool:
    r"""Whether the JSON text data (already parsed by orjson into doc) repeats a key in an object.

    orjson keeps the last of repeated keys silently, another parser on the way may keep the
    first: such a body is refused. The check is exact and, in the usual case, cheap (a
    fraction of the parse). doc is serialised again: text equal to what was sent cannot hold
    a repeat. Otherwise colons are counted. Every key is followed by one, strings may hold
    more, and orjson writes a string's colons (also those sent escaped, \u003a) literally and
    no other colon. So without a repeat the re-serialised text has as many colons as the body
    plus its escaped ones, and a repeat, being dropped, takes at least its own colon away.
    Counting "\u003a" can overcount (an escaped backslash before "u003a"); that, or a count
    that differs, only sends the body to the slow exact check by the standard library parser.
    """
    try:
        again = orjson.dumps(doc)
    except orjson.JSONEncodeError:  # nested deeper than orjson writes (but not reads)
        again = None
    if again is not None:
        if again == data:
            return False
        colons = data.count(b":")
        if b"\\" in data:
            colons += data.count(b"\\u003a") + data.count(b"\\u003A")
        if again.count(b":") == colons:
            return False
    try:
        json.loads(data, object_pairs_hook=_unique_pairs)
    except _DuplicateKey:
        return True
    except ValueError:  # not expected after orjson accepted it; refuse rather than pass it unchecked
        raise BadRequest("body is not valid JSON") from None
    except RecursionError:
        # Deeper than the interpreter's recursion limit (orjson reads 1024 levels); no policy
        # allows such depth (json_max_depth <= 1000), so refuse it rather than pass it unchecked.
        raise BadRequest("body is nested too deeply") from None
    return False


def decode(raw: bytes, encoding: str, limit: int, *, max_values: int, max_depth: int) -> bytes:
    """Inflate within limit, counting JSON values and depth on the way (413 / 400 past them), ready to parse."""
    if (encoding == "identity" and len(raw) <= limit and len(raw) <= max_values
            and raw.count(b"{") + raw.count(b"[") <= max_depth):
        # Within the budget whatever it holds (a usual heartbeat): every value takes at least a
        # byte, and every level of nesting a bracket (strings' brackets counted too: more, never fewer).
        return raw
    budget = JsonBudget(max_values, max_depth)
    data = inflate(raw, encoding, limit, budget)
    budget.finish()
    return data


async def read_json(request: web.Request, *, limit: int, decoded_limit: int) -> tuple[dict[str, Any], int, int]:
    """Check type and encoding, read within limits, inflate within limits and the value budget, parse;
    returns (doc, wire bytes, decoded bytes)."""
    check_content_type(request)
    encoding = "identity" if "Content-Encoding" not in request.headers else content_encoding(request)
    settings = request.app[SETTINGS]
    raw = await read_raw(request, limit, settings.read_timeout)
    data = decode(raw, encoding, decoded_limit, max_values=settings.json_max_values, max_depth=settings.json_max_depth)
    return parse_object(data), len(raw), len(data)

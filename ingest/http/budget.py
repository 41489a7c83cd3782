"""The value budget: how many JSON values a body holds and how deep it nests, counted before it is parsed.

Parsing builds one Python object per value (an empty `{}` costs about 64 bytes and
0.2 us), so a small body of many tiny values is where a parse is expensive. The budget is
counted on the bytes, chunk by chunk as they are inflated, so a body over it is refused
after reading about `max_values` values' worth of text, never parsed and never inflated
whole. Every step is a C-speed bytes method (translate, replace, count) over one chunk;
no Python code runs per byte or per value.

Why the count is sound. Outside strings, every value except the root is preceded by a
`,`, `[` or `:`; counting containers instead of colons gives the exact identity, for any
valid JSON text,

    values = 1 + commas + non-empty containers            (all outside strings)

(an array of n > 0 items holds n - 1 commas, an object of n members n - 1 commas and n
values; an empty container holds nothing.) The scanner computes

    counted = 1 + commas + objects + arrays - empty objects   (outside strings)

so values <= counted <= values + empty arrays. (An empty object is seen exactly, since a
non-empty one always holds a key; `[1]` and `[]` look alike once scalars are deleted, so
every array is taken as non-empty: an overcount, on the safe side.)

Strings are excluded without visiting them one by one in Python:

1. Escapes: every escaped `\\` and `"` is deleted, left to right as a parser reads them
   (`_without_escapes` deletes every escape, a backslash and the byte after it, when a chunk
   holds few; the other escapes hold no structural byte); afterwards every `"` left opens or
   closes a string.
2. translate deletes every byte but `" { } [ ] , :` (whitespace, scalars, string contents).
3. Two strings are always separated by a `,` or `:` (outside strings), so `""` is now
   exactly a string whose contents held none of those bytes: replaced by a marker `00` (two
   bytes for two, which bytes.replace does in place: 27 against 67 us for a one-byte marker
   on the 50 KiB benchmark scan).
   The few strings left (those that held structural bytes) are replaced by a regex.

A run of backslashes at a chunk's end is cut after its last complete pair (an odd run's last
backslash goes with the next chunk); a string still open at a chunk's end, and a `{` that ends
it, are carried to the next. For text that is not valid JSON the count may be wrong
after the first syntax error, but the parser stops there too: what it would build lies in
the valid prefix, which is counted right. Either way such a body gets a 4xx.

The count waits while it cannot pass the limit: every value counted but the root is one byte of
the structure left after step 3, so while `1 + its length <= max_values` the pieces' structure is
kept (at most max_values bytes in at most as many pieces: one with no structure is not kept) and
counted only when `values` is read or once more has come; from then on each piece is counted as it
comes. A body over the limit is refused at the same byte as before, and a usual one is never
counted (20 of the 90 us on the 50 KiB benchmark scan).

Depth: the bytes `{[` and `}]` outside strings, kept (both mapped to one pair, the parser
checks that they match), are peeled: each pass deletes every adjacent `{}`, which is one
level of nesting; a document nests deeper than `max_depth` when `max_depth` passes leave
brackets behind. The brackets kept are at most twice the values counted, so this costs at
most (max_depth + 1) passes over 2 * max_values bytes.
"""

from __future__ import annotations

import re

from ingest.errors import BadRequest, TooLarge

CHUNK = 1 << 20
FEW_ESCAPES = 64  # per chunk, cut out one by one (_without_escapes); past them, replaced in bulk

_KEEP = b'"{}[],:'
_DELETE_ALL_BUT_STRUCTURE = bytes(b for b in range(256) if b not in _KEEP)
_STRING = re.compile(rb'"[^"]*"')
_BRACKETS = bytes.maketrans(b"[]", b"{}")


def _without_escapes(chunk: bytes) -> bytes:
    """chunk with every escape (a backslash and the byte after it) deleted, read left to right as a parser does.

    For valid JSON this deletes what step 1 of the module docstring does (every escaped quote and
    backslash; the other escapes hold no structural byte). The few escapes of a usual document
    (a Windows path, DOMAIN\\user) are cut out by find, the chunk copied twice (slices, join); past
    FEW_ESCAPES of them, the rest of the chunk is done by two replaces over all of it (a find per
    escape in Python would cost more there). Measured on the 50 KiB benchmark scan, which holds
    two: 97 us for the two replaces over all of it before.
    """
    parts = []
    start = 0
    find = chunk.find
    at = find(b"\\")
    for _ in range(FEW_ESCAPES):
        if at < 0:
            parts.append(chunk[start:])
            return b"".join(parts)
        parts.append(chunk[start:at])
        start = at + 2
        at = find(b"\\", start)
    parts.append(chunk[start:].replace(b"\\\\", b"").replace(b'\\"', b""))
    return b"".join(parts)


class JsonBudget:
    """Counts the values and depth of a JSON text fed in pieces; TooLarge past max_values, BadRequest past max_depth."""

    def __init__(self, max_values: int, max_depth: int) -> None:
        self.max_values = max_values
        self.max_depth = max_depth
        self._values = 1
        self._structure = 0  # bytes of structure (outside strings) fed so far
        self._uncounted: list[bytes] = []  # the structure whose values are not counted yet
        self._inside = False  # a string is open at the end of what was fed
        self._tail = b""  # the last piece's unpaired backslash (an odd run at its end), or nothing
        self._open_brace = False  # what was fed ends with a "{" (whitespace aside)
        self._brackets: list[bytes] = []

    def feed(self, piece: bytes | bytearray | memoryview) -> None:
        """Count one more piece of the text (any size; large ones are taken CHUNK bytes at a time)."""
        view = memoryview(piece)
        for start in range(0, len(view), CHUNK):
            self._feed(bytes(view[start : start + CHUNK]))

    def _feed(self, chunk: bytes) -> None:
        if self._tail:
            chunk, self._tail = self._tail + chunk, b""
        if chunk.endswith(b"\\"):
            # A run of backslashes starts an escape at its first byte: pairs delete to nothing,
            # so only an odd run's last backslash waits for the byte it escapes. (Carrying the
            # whole run made a body of backslashes cost quadratic time and the run's memory.)
            kept = chunk.rstrip(b"\\")
            chunk, self._tail = kept, b"\\" if (len(chunk) - len(kept)) % 2 else b""
        if b"\\" in chunk:
            chunk = _without_escapes(chunk)
        t = chunk.translate(None, _DELETE_ALL_BUT_STRUCTURE)
        if self._inside:
            end = t.find(b'"')
            if end < 0:
                return  # the whole chunk is inside one string
            t = b"0" + t[end + 1 :]
            self._inside = False
        t = t.replace(b'""', b"00")  # same length: no second pass to size the result
        if b'"' in t:
            t = _STRING.sub(b"0", t)
            opened = t.find(b'"')
            if opened >= 0:  # a string open at the chunk's end: its start is all that is left of one
                t = t[:opened] + b"0"
                self._inside = True
        if self._open_brace and t.startswith(b"}"):
            self._values -= 1  # an empty object cut between two chunks
        if t:
            self._open_brace = t.endswith(b"{")
        self._structure += len(t)
        if 1 + self._structure <= self.max_values:
            # Within the limit whatever it holds (each value counted but the root is one byte of it,
            # a ',', '{' or '['): counted only when asked for (values), or once more has come.
            if t:  # (a piece of whitespace or scalars holds nothing to count: not kept)
                self._uncounted.append(t)
        else:
            self._values += self._count(t) + sum(map(self._count, self._uncounted))
            self._uncounted.clear()
            if self._values > self.max_values:
                raise TooLarge(f"body holds more than {self.max_values} JSON values")
        brackets = t.translate(_BRACKETS, b",:0")
        if brackets:
            self._brackets.append(brackets)

    @staticmethod
    def _count(t: bytes) -> int:
        return t.count(b",") + t.count(b"{") + t.count(b"[") - t.count(b"{}")

    @property
    def values(self) -> int:
        """The values counted in what was fed (an upper bound, see the module docstring)."""
        if self._uncounted:
            self._values += sum(map(self._count, self._uncounted))
            self._uncounted.clear()
        return self._values

    def finish(self) -> None:
        """Check the depth of everything fed (BadRequest if deeper than max_depth)."""
        nest = b"".join(self._brackets)
        self._brackets.clear()
        for _ in range(self.max_depth):
            if not nest:
                return
            peeled = nest.replace(b"{}", b"")
            if len(peeled) == len(nest):
                return  # unbalanced: not JSON, the parser refuses it
            nest = peeled
        if nest and b"{}" in nest:
            raise BadRequest(f"JSON nesting deeper than {self.max_depth}")


def check_budget(data: bytes | bytearray, max_values: int, max_depth: int) -> int:
    """The values counted in a whole JSON text (an upper bound, see the module docstring); raises past either limit."""
    budget = JsonBudget(max_values, max_depth)
    budget.feed(data)
    budget.finish()
    return budget.values

"""What crosses the wire between the gateway and its upstream, bounded and checked.

* **Constraints** (:func:`number_list_regex` for vLLM, :func:`number_list_gbnf` for llama.cpp):
  the numbers 1..max_value as digit classes (``[1-9][0-9]{0,6}|10000000`` for 10**7), so their
  size grows with the number of *digits* of the largest number, never with its value; a list of
  ``count`` of them is a repetition (``num(, num){2}``). Numbers of more than
  :data:`MAX_NUMBER_DIGITS` digits are refused (400, :class:`ConstraintTooLarge`).
* **Replies** are read up to a byte limit (:func:`read_capped` / :func:`aread_capped`, 502
  ``upstream_reply_too_large`` above it), parsed as JSON only when they are JSON objects of the
  expected shape (502 ``upstream_bad_reply`` otherwise, never a 200 with empty content); streams
  are split into lines by :func:`sse_lines` under the same byte limit.
* **Errors**: the upstream's status becomes the gateway's (:func:`upstream_error`), and every
  message that carries upstream text passes :func:`redact` (the upstream key, any ``Bearer``
  token, a URL's ``user:password@``) before it can reach a client or a log.
"""
from __future__ import annotations

import itertools
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx

from shoptune.serve.engine import EngineError

MAX_PERMUTATIONS = 720  # unique number lists up to 6! are spelled out; longer ones drop uniqueness
MAX_NUMBER_DIGITS = 40  # the largest number a list constraint may allow has at most this many digits
ERROR_BODY_BYTES = 64 << 10  # an error reply is read this far (its message is cut to 500 characters)
NO_COMPRESSION = {"Accept-Encoding": "identity"}  # byte limits count what the upstream sent

_SECRETS: set[str] = set()  # upstream keys this process uses (redacted from any upstream text)
_BEARER = re.compile(r"(?i)\b(bearer)(\s+)(?!\[redacted\])[^\s\"',;}\]]+")
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s\"']+@")


def register_secret(secret: str | None) -> None:
    if secret:
        _SECRETS.add(secret)


def redact(text: str) -> str:
    """``text`` without the upstream key(s), ``Bearer`` tokens or a URL's credentials."""
    for s in sorted(_SECRETS, key=len, reverse=True):
        text = text.replace(s, "[redacted]")
    text = _BEARER.sub(r"\1\2[redacted]", text)
    return _USERINFO.sub(r"\1[redacted]@", text)


class UpstreamError(EngineError):
    """The upstream engine answered with an error or could not be reached (message redacted)."""

    def __init__(self, message: str, *, status: int = 502, type_: str = "server_error",
                 code: str | None = "upstream_error", param: str | None = None):
        super().__init__(redact(message), param=param)
        self.status, self.type, self.code = status, type_, code


class NotSupported(UpstreamError):
    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message, status=501, type_="invalid_request_error",
                         code="not_supported_by_upstream", param=param)


class ConstraintTooLarge(UpstreamError):
    def __init__(self, message: str):
        super().__init__(message, status=400, type_="invalid_request_error",
                         code="constraint_too_large", param="input")


def bad_reply(what: str, detail: str) -> UpstreamError:
    return UpstreamError(f"{what}: {detail}", status=502, code="upstream_bad_reply")


# ----------------------------------------------------------------------------- constraints

def _range_parts(max_value: int) -> list[list[tuple]]:
    """1..max_value as alternatives of (literal digits | one digit in lo..hi | m..n any digits),
    e.g. 1..12: ``[1-9]``, ``1[0-1]``, ``12``."""
    s = str(max_value)
    alts: list[list[tuple]] = []
    if len(s) > 1:  # every number with fewer digits
        alts.append([("class", 1, 9), ("digits", 0, len(s) - 2)])
    for i, ch in enumerate(s):  # the same length, smaller at position i, equal before it
        lo, hi = (1 if i == 0 else 0), int(ch) - 1
        if hi >= lo:
            alts.append([("lit", s[:i]), ("class", lo, hi), ("digits", len(s) - i - 1, len(s) - i - 1)])
    alts.append([("lit", s)])
    return alts


def _render(part: tuple, gbnf: bool) -> str:
    if part[0] == "lit":
        return (f'"{part[1]}"' if gbnf else part[1]) if part[1] else ""
    if part[0] == "class":
        lo, hi = part[1], part[2]
        return f"[{lo}-{hi}]" if lo != hi else (f'"{lo}"' if gbnf else str(lo))
    lo, hi = part[1], part[2]
    if hi == 0:
        return ""
    return "[0-9]" + ("" if lo == hi == 1 else f"{{{lo}}}" if lo == hi else f"{{{lo},{hi}}}")


def _number(max_value: int, gbnf: bool) -> str:
    alts = [(" " if gbnf else "").join(x for p in alt if (x := _render(p, gbnf)))
            for alt in _range_parts(max_value)]
    return (" | " if gbnf else "|").join(alts)


def _check(max_value: int) -> None:
    bits = max_value.bit_length()
    if bits > 4 * MAX_NUMBER_DIGITS or len(str(max_value)) > MAX_NUMBER_DIGITS:
        digits = len(str(max_value)) if bits <= 14_000 else f"about {int(bits * 0.30103)}"
        raise ConstraintTooLarge(f"the question's numbered list goes up to a number of {digits} "
                                 f"digits; the gateway constrains answers to numbers of at most "
                                 f"{MAX_NUMBER_DIGITS} digits")


def _number_lists(max_value: int, count: int, unique: bool) -> list[list[str]] | None:
    """All allowed lists spelled out when uniqueness needs it and there are few; else None."""
    n = min(count, max_value)
    if not unique or n <= 1:
        return None
    total = 1
    for k in range(n):
        total *= max_value - k
        if total > MAX_PERMUTATIONS:
            return None
    return [list(p) for p in itertools.permutations([str(v) for v in range(1, max_value + 1)], n)]


def number_list_gbnf(max_value: int, count: int, unique: bool) -> str:
    """GBNF (llama.cpp) for exactly ``min(count, max_value)`` numbers in 1..max_value joined by
    ", " (no number twice when ``unique`` and the lists are few enough to spell out): the strings
    NumberListProcessor lets through. Raises :class:`ConstraintTooLarge` (400) above
    :data:`MAX_NUMBER_DIGITS` digits."""
    _check(max_value)
    n = min(count, max_value)
    if n <= 0:
        return 'root ::= ""\n'
    lists = _number_lists(max_value, count, unique)
    if lists is not None:
        return "root ::= " + " | ".join('"' + ", ".join(p) + '"' for p in lists) + "\n"
    rest = "" if n == 1 else ' ", " num' if n == 2 else f' (", " num){{{n - 1}}}'
    return f"root ::= num{rest}\nnum ::= {_number(max_value, True)}\n"


def number_list_regex(max_value: int, count: int, unique: bool) -> str:
    """The same language as :func:`number_list_gbnf`, as a regex (vLLM structured outputs)."""
    _check(max_value)
    n = min(count, max_value)
    if n <= 0:
        return ""
    lists = _number_lists(max_value, count, unique)
    if lists is not None:
        return "(" + "|".join(", ".join(p) for p in lists) + ")"
    num = "(" + _number(max_value, False) + ")"
    return num + ("" if n == 1 else f"(, {num})" if n == 2 else f"(, {num}){{{n - 1}}}")


# ----------------------------------------------------------------------------- replies

@dataclass
class Reply:
    """A whole (bounded) upstream reply."""
    status: int
    body: bytes
    content_type: str
    reason: str = ""

    def json(self, what: str, shape: type = dict):
        """The body as JSON of ``shape`` (dict or list), or a 502 saying what came instead."""
        try:
            value = json.loads(self.body)
        except (ValueError, RecursionError):
            raise bad_reply(what, f"the upstream answered {self.status} with a body that is not "
                                  f"JSON ({describe_bytes(self.body)})") from None
        if not isinstance(value, shape):
            raise bad_reply(what, f"the upstream answered {self.status} with {describe(value)}, "
                                  f"not a JSON {'object' if shape is dict else 'list'}")
        return value


def describe(value) -> str:
    kinds = {dict: "a JSON object", list: "a JSON list", str: "a JSON string", bool: "a JSON boolean",
             int: "a JSON number", float: "a JSON number", type(None): "JSON null"}
    return kinds.get(type(value), type(value).__name__)


def describe_bytes(body: bytes) -> str:
    if not body.strip():
        return "empty"
    head = body[:60].decode("utf-8", "replace")
    return f"starts {head!r}" + (f", {len(body)} bytes" if len(body) > 60 else "")


def too_large(what: str, limit: int) -> UpstreamError:
    return UpstreamError(f"{what}: the upstream's reply is larger than {limit} bytes (the gateway's "
                         "--upstream-max-bytes); not read further", code="upstream_reply_too_large")


def read_capped(r: httpx.Response, limit: int, what: str, *, truncate: bool = False) -> bytes:
    """A streamed (sync) response's body, at most ``limit`` bytes: over it, the first ``limit``
    bytes when ``truncate`` (error messages), else a 502."""
    buf = bytearray()
    for chunk in r.iter_bytes():
        buf += chunk
        if len(buf) > limit:
            if truncate:
                return bytes(buf[:limit])
            raise too_large(what, limit)
    return bytes(buf)


async def aread_capped(r: httpx.Response, limit: int, what: str, *, truncate: bool = False) -> bytes:
    buf = bytearray()
    async for chunk in r.aiter_bytes():
        buf += chunk
        if len(buf) > limit:
            if truncate:
                return bytes(buf[:limit])
            raise too_large(what, limit)
    return bytes(buf)


async def sse_lines(r: httpx.Response, limit: int, what: str) -> AsyncIterator[str]:
    """The lines of an event stream (CR, LF or CRLF ends), at most ``limit`` bytes in all (a
    502 after that, however the bytes are split into lines)."""
    buf, total, start = bytearray(), 0, 0
    async for chunk in r.aiter_bytes():
        total += len(chunk)
        if total > limit:
            raise too_large(what, limit)
        buf += chunk
        while (end := buf.find(b"\n", start)) >= 0:
            yield _line(bytes(buf[start:end]), what)
            start = end + 1
        del buf[:start]
        start = 0
    if buf:
        yield _line(bytes(buf), what)


def stream_event(data: str, what: str, kind: str, usage: dict | None) -> tuple[list[dict], dict | None]:
    """One ``data:`` event of a completion stream: its choices (each a JSON object whose text is
    a string) and the usage so far; an in-band error or any other shape raises."""
    try:
        chunk = json.loads(data)
    except (ValueError, RecursionError):
        raise bad_reply(what, f"an event that is not JSON ({describe_bytes(data.encode())})") from None
    if not isinstance(chunk, dict):
        raise bad_reply(what, f"an event that is {describe(chunk)}, not a JSON object")
    if "error" in chunk:
        raise UpstreamError(f"upstream {kind} failed mid-stream: {error_text(chunk['error'])}")
    choices = chunk.get("choices") or []
    if not isinstance(choices, list) or not all(
            isinstance(c, dict) and isinstance(c.get("text") or "", str) for c in choices):
        raise bad_reply(what, "an event whose choices are not OpenAI completion choices")
    return choices, (chunk["usage"] if isinstance(chunk.get("usage"), dict) else usage)


def finish_reason(value, what: str) -> str:
    """The gateway's finish reason for the upstream's; an aborted completion is no answer."""
    if value in ("abort", "error"):  # (vLLM: the request was aborted upstream)
        raise UpstreamError(f"{what}: the upstream ended the completion with finish_reason {value!r}")
    return "length" if value == "length" else "stop"


def _line(raw: bytes, what: str) -> str:
    try:
        return raw.rstrip(b"\r").decode("utf-8")
    except UnicodeDecodeError:
        raise bad_reply(what, "the upstream's event stream is not UTF-8 text") from None


# ----------------------------------------------------------------------------- errors

def error_text(err) -> str:
    """An upstream error object's message (OpenAI's ``{"message": ...}`` or anything else)."""
    return str(err.get("message", err) if isinstance(err, dict) else err)[:500]


def error_message(reply: Reply) -> str:
    """The upstream's own error message (OpenAI's shape, or its text), at most 500 characters."""
    try:
        body = json.loads(reply.body)
    except (ValueError, RecursionError):
        text = reply.body.decode("utf-8", "replace").strip()
        return text[:300] or reply.reason or "no message"
    err = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(err, dict):
        return str(err.get("message") or err.get("detail") or err)[:500]
    return str(err)[:500]


def upstream_error(reply: Reply, kind: str) -> UpstreamError:
    """The upstream's error answer as the gateway's: its 4xx message kept (redacted), statuses
    made clear."""
    msg, s = error_message(reply), reply.status
    text = f"upstream {kind} returned {s}: {msg}"
    if s in (400, 422):
        return UpstreamError(text, status=400, type_="invalid_request_error", code="upstream_rejected")
    if s in (401, 403):
        return UpstreamError(f"the upstream {kind} refused the gateway's key ({s}): {msg}; "
                             "check --upstream-api-key-env", status=502)
    if s == 404:
        return UpstreamError(text, status=404, type_="not_found_error", code="upstream_not_found")
    if s == 429:
        return UpstreamError(text, status=429, type_="rate_limit_error", code="upstream_busy")
    if s == 503:
        return UpstreamError(text, status=503, code="upstream_unavailable")
    if s == 501:
        return NotSupported(text)
    return UpstreamError(text, status=502)


def transport_error(e: Exception, url: str) -> UpstreamError:
    if isinstance(e, httpx.TimeoutException):
        return UpstreamError(f"upstream {url} timed out ({type(e).__name__})", status=504,
                             code="upstream_timeout")
    return UpstreamError(f"upstream {url} unreachable: {type(e).__name__}: {e}", status=503,
                         code="upstream_unreachable")

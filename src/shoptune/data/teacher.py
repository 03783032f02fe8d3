"""The teacher side of ``data synth``: an OpenAI-compatible client with a request and token
budget and its own retries, and the append-only JSON-lines logs a resumable run keeps.

Every HTTP request, retries included, is counted against the budget (except an attempt that
could not connect at all: it cost the teacher nothing), so the client is the
official ``openai`` client with ``max_retries=0`` and the back-off done here: 429 / 5xx /
connection errors wait ``backoff_s * 2**attempt`` (half to full, seeded jitter; at least the
server's ``Retry-After``), never more than ``max_backoff_s``. A 400 is about the one request
(e.g. its prompt is longer than the model's context): :class:`JobRefused`, the run rejects that
row and goes on; other errors (401, 403, 404) stop the run (:class:`TeacherError`).
"""
from __future__ import annotations

import json
import os
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path


class TeacherError(ValueError):
    """The teacher refused a request (not retryable): one line for the user."""


# --------------------------------------------------------------------------- teacher client

class _Spent(Exception):
    """An ``ask`` that ended without an answer; ``sent``: the requests it cost (budget)."""

    def __init__(self, msg: str, sent: int = 0):
        super().__init__(msg)
        self.sent = sent


class BudgetExhausted(_Spent):
    pass


class TeacherFailed(_Spent):
    """Retries used up on 429 / 5xx / connection errors."""


def _never_connected(e: Exception) -> str | None:
    """Why the request never reached the teacher (no connection made: refused, no such host,
    connect timeout), else None. Such an attempt costs nothing and is not counted."""
    cause = e.__cause__ or e.__context__
    if cause is not None and any(c.__name__ in ("ConnectError", "ConnectTimeout")
                                 for c in type(cause).__mro__):
        return " ".join(str(cause).split()) or type(cause).__name__
    return None


class JobRefused(_Spent):
    """A 400 about this one request (not the seed): the job is rejected, the run goes on."""


class LogError(ValueError):
    """A line of a JSON-lines file that is not a JSON object: ``path:LINE: reason``."""


@dataclass
class Teacher:
    """The official ``openai`` client with our own retries (so every request is counted against
    the budget): 429 / 5xx / connection errors back off exponentially with jitter, honouring a
    ``Retry-After`` header; other errors stop the run."""
    url: str
    model: str
    api_key: str
    retries: int = 6
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    timeout_s: float = 300.0
    max_requests: int | None = None
    max_total_tokens: int | None = None
    send_seed: bool = True  # OpenAI's ``seed``; dropped when the server refuses it
    requests: int = 0
    tokens: int = 0
    retried: Counter = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self):
        from openai import OpenAI
        self.client = OpenAI(base_url=self.url, api_key=self.api_key, max_retries=0,
                             timeout=self.timeout_s)

    def _take_request(self) -> None:
        with self._lock:
            if self.max_requests is not None and self.requests >= self.max_requests:
                raise BudgetExhausted(f"request budget reached ({self.max_requests})")
            if self.max_total_tokens is not None and self.tokens >= self.max_total_tokens:
                raise BudgetExhausted(f"token budget reached ({self.max_total_tokens})")
            self.requests += 1

    def ask(self, prompt: str, *, temperature: float, max_tokens: int, seed: int) -> dict:
        import openai
        rng = random.Random(seed)
        attempt = sent = 0
        while True:
            try:
                self._take_request()
            except BudgetExhausted as e:
                e.sent = sent
                raise
            sent += 1
            sent_seed = self.send_seed
            try:
                r = self.client.chat.completions.create(
                    model=self.model, messages=[{"role": "user", "content": prompt}],
                    temperature=temperature, max_tokens=max_tokens,
                    **({"seed": seed} if sent_seed else {}))
            except (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError,
                    openai.APITimeoutError) as e:
                status = getattr(e, "status_code", None) or type(e).__name__
                unreachable = _never_connected(e)
                with self._lock:
                    self.retried[str(status)] += 1
                    if unreachable:  # never sent: not spent (the budget is for the teacher's work)
                        self.requests -= 1
                if unreachable:
                    sent -= 1
                if attempt == self.retries:
                    if unreachable:
                        raise TeacherFailed(f"teacher {self.url}: cannot connect ({unreachable}) "
                                            f"after {attempt + 1} attempts", sent) from None
                    raise TeacherFailed(f"teacher {self.url}: {status} after {attempt + 1} "
                                        f"attempts: {_short(e)}", sent) from None
                wait = min(self.max_backoff_s, self.backoff_s * 2 ** attempt) * (0.5 + rng.random() / 2)
                headers = getattr(getattr(e, "response", None), "headers", None) or {}
                try:  # the server's Retry-After, within our own cap
                    wait = min(self.max_backoff_s, max(wait, float(headers.get("retry-after", 0))))
                except ValueError:
                    pass
                time.sleep(wait)
                attempt += 1
                continue
            except openai.APIStatusError as e:
                if e.status_code == 400 and sent_seed and "seed" in _short(e).lower():
                    self.send_seed = False  # e.g. `shoptune serve`: ask without it from now on
                    with self._lock:
                        self.retried["400-seed"] += 1
                    continue
                if e.status_code == 400:
                    raise JobRefused(f"400 {_short(e)}", sent) from None
                raise TeacherError(f"teacher {self.url} refused the request: {e.status_code} "
                                   f"{_short(e)}") from None
            usage = r.usage.total_tokens if r.usage else 0
            with self._lock:
                self.tokens += usage
            return {"text": r.choices[0].message.content or "", "usage": usage,
                    "finish_reason": r.choices[0].finish_reason, "model": r.model,
                    "attempts": sent, "seed_sent": self.send_seed}


def _short(e: Exception) -> str:
    msg = getattr(e, "message", None) or str(e)
    return " ".join(str(msg).split())[:200]


# --------------------------------------------------------------------------- append-only logs

def read_log(path: Path, *, own: bool = False) -> list[dict]:
    """Rows (JSON objects) of a JSON-lines file; :class:`LogError` names ``path:LINE`` of a bad one.
    Read bounded, line by line (:mod:`shoptune._io`: a regular file, each line at most
    ``SHOPTUNE_MAX_ROW_BYTES``, JSON depth and integer size bounded).

    ``own``: an append-only log this run writes. A killed writer can leave a torn last line
    (no newline, not JSON): only then is that line cut off the file, so appends start clean.
    Any other file (a predictions.jsonl, say) is only read, never written."""
    from shoptune._io import ROW_CAP, InputError, iter_lines, json_loads, open_input

    if not (path.exists() or path.is_symlink()):
        return []
    try:
        fh = open_input(path, "JSON-lines file")
    except InputError as e:
        raise LogError(str(e)) from None
    except OSError as e:
        raise LogError(f"{path}: cannot read: {e.strerror}") from None
    rows, kept_bytes, cut, unended = [], 0, False, False
    with fh:
        for n, raw in iter_lines(fh, ROW_CAP):
            if raw is None:
                raise LogError(f"{path}:{n}: a line longer than the limit ({ROW_CAP[0]} raises it)")
            unended = not raw.endswith(b"\n")
            if raw.strip():
                try:
                    row = json_loads(raw.decode("utf-8"))
                except (ValueError, UnicodeDecodeError) as e:
                    if unended and own:  # a torn last line of our own log
                        cut = True
                        break
                    raise LogError(f"{path}:{n}: not a JSON line: {getattr(e, 'msg', e)}") from None
                if not isinstance(row, dict):
                    raise LogError(f"{path}:{n}: not a JSON object")
                rows.append(row)
            kept_bytes += len(raw)
    if cut:
        with open(path, "r+b") as fh:
            fh.truncate(kept_bytes)
    elif unended and own and rows:  # a complete last row without its newline
        with open(path, "ab") as fh:
            fh.write(b"\n")
    return rows


class AppendLog:
    """A JSON-lines file appended to row by row (fsync'd); created by its first row."""

    def __init__(self, path: Path):
        self.path, self.fh = path, None
        self.lock = threading.Lock()

    def write(self, row: dict) -> None:
        with self.lock:
            if self.fh is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.fh = open(self.path, "a", encoding="utf-8")
            self.fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            self.fh.flush()
            os.fsync(self.fh.fileno())

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()

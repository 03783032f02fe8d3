"""Connection limits for ``shoptune serve`` (the built-in server and the gateway alike).

uvicorn 0.54 with h11 has no header-read timeout: a connection that sends nothing, or half its
headers, is kept until the client leaves (its keep-alive timer starts only after a response).
Its ``limit_concurrency`` counts such idle connections and then answers *every* request,
``/health`` included, with 503. So ``shoptune serve`` runs uvicorn's own h11 protocol with two
guards (:func:`guarded_h11`):

* **header timeout**: a connection must deliver a request's complete headers within
  ``header_timeout`` seconds of connecting (or of its previous response); else it is closed.
  (Bodies have their own deadline: ``--body-timeout``, enforced by the app.)
* **connection cap**: at most ``max_connections`` open at once. A new connection over the cap
  closes the oldest one that has no request in flight (idle, or still sending its headers); when
  every connection is busy with a request, the new one is closed instead. A flood of idle sockets
  therefore cannot exhaust file descriptors or lock out ``/health``.

:func:`fit_open_files` keeps the cap under the process's open-files limit (raising the soft limit
when the hard one allows), and :class:`AcceptErrorLogLimit` rate-limits asyncio's log of failed
``accept()`` calls (one traceback per attempt, up to ``backlog`` = 2048 attempts per event-loop
tick once the process is out of file descriptors: hundreds of megabytes a minute).
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("shoptune.serve")
FD_RESERVE = 128  # descriptors kept for everything but client connections (model files, upstream, logs)


class _Every:
    """True at most once per ``interval`` seconds; counts the calls in between."""

    def __init__(self, interval: float):
        self.interval, self.last, self.skipped = interval, float("-inf"), 0

    def __call__(self) -> bool:
        now = time.monotonic()
        if now - self.last < self.interval:
            self.skipped += 1
            return False
        self.last = now
        return True


class _Pool:
    """The open connections of one server; ``idle`` in the order they became idle."""

    def __init__(self, max_connections: int, header_timeout: float):
        self.max_connections, self.header_timeout = max_connections, header_timeout
        self.open: set = set()
        self.idle: OrderedDict = OrderedDict()
        self.timed_out = self.evicted = self.refused = 0
        self.warn = _Every(10.0)

    def make_room(self, new) -> None:
        victim = next((c for c in self.idle if c is not new), None)
        if victim is not None:
            self.evicted += 1
            victim.drop()
            what = "closed the oldest idle connection"
        else:
            self.refused += 1
            new.drop()
            what = "every connection is busy with a request: refused a new one"
        if self.warn():
            skipped, self.warn.skipped = self.warn.skipped, 0
            log.warning("connection limit (--max-connections %d) reached: %s%s", self.max_connections,
                        what, f" ({skipped} more such since the last message)" if skipped else "")


def guarded_h11(max_connections: int, header_timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a header timeout and a connection cap (module docstring);
    pass it as ``uvicorn.run(..., http=guarded_h11(...))``. One class per server (its pool)."""
    pool = _Pool(max_connections, header_timeout)

    class GuardedH11Protocol(H11Protocol):
        _pool = pool
        _header_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            pool.open.add(self)
            self._await_request()
            if len(pool.open) > pool.max_connections:
                pool.make_room(self)

        def connection_lost(self, exc) -> None:
            self._forget()
            super().connection_lost(exc)

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state is not h11.IDLE:  # a request's headers are in (or it failed)
                self._request_started()
            elif self._header_timer is None and not self.transport.is_closing():
                self._await_request()  # a new cycle began here (an early reply, then the body's end)

        def handle_websocket_upgrade(self, event) -> None:
            self._forget()  # (the websocket protocol takes the transport over)
            super().handle_websocket_upgrade(event)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE \
                    and self.conn.our_state is h11.IDLE:  # kept alive, waiting for the next request
                self._await_request()

        # -- the guards
        def _await_request(self) -> None:
            self._cancel_timer()
            pool.idle[self] = None
            pool.idle.move_to_end(self)
            self._header_timer = self.loop.call_later(pool.header_timeout, self._headers_overdue)

        def _request_started(self) -> None:
            self._cancel_timer()
            pool.idle.pop(self, None)

        def _headers_overdue(self) -> None:
            self._header_timer = None
            if self in pool.idle and self.conn.their_state is h11.IDLE:
                pool.timed_out += 1
                self.drop()

        def _cancel_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _forget(self) -> None:
            self._request_started()
            pool.open.discard(self)

        def drop(self) -> None:
            """Close now, pending output and all (an idle connection has nothing worth waiting for)."""
            self._forget()
            if not self.transport.is_closing():
                self.transport.abort()

    return GuardedH11Protocol


def fit_open_files(max_connections: int, reserve: int = FD_RESERVE) -> tuple[int, int]:
    """(connections that fit, the open-files soft limit): the soft limit is raised towards the
    hard one when ``max_connections + reserve`` does not fit under it."""
    try:
        import resource
    except ImportError:  # (not POSIX)
        return max_connections, -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = max_connections + reserve
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY or soft >= need:
        return max_connections, soft
    return max(1, soft - reserve), soft


def accept_backlog(max_connections: int) -> int:
    """uvicorn's ``backlog`` for a server that holds at most ``max_connections``. asyncio uses it
    twice: as the listen queue and as the number of ``accept()`` calls in one event-loop tick
    before any accepted connection's ``connection_made`` runs (which is where the cap closes the
    ones over it). With uvicorn's 2048, a burst of a few hundred sockets is accepted in one tick and
    runs the process out of descriptors before the cap can act; a backlog of half the cap keeps a
    burst within the descriptors kept free (``FD_RESERVE``)."""
    return max(8, min(2048, max_connections // 2))


class AcceptErrorLogLimit(logging.Filter):
    """On the ``asyncio`` logger: asyncio's "socket.accept() out of system resource" record
    (with a traceback) at most once per ``interval`` seconds, as one line with the count of the
    ones left out; every other record passes."""

    MESSAGE = "socket.accept() out of system resource"

    def __init__(self, interval: float = 10.0):
        super().__init__()
        self.every = _Every(interval)

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.MESSAGE):
            return True
        if not self.every():
            return False
        skipped, self.every.skipped = self.every.skipped, 0
        exc = record.exc_info[1] if record.exc_info else None
        record.msg = (f"{self.MESSAGE}: {exc}" + (f" ({skipped} more in the last "
                                                  f"{self.every.interval:g} s)" if skipped else "")
                      + "; lower --max-connections or raise the open-files limit (ulimit -n)")
        record.args, record.exc_info, record.exc_text = (), None, None
        return True


def install_accept_log_limit(interval: float = 10.0) -> AcceptErrorLogLimit:
    """Add :class:`AcceptErrorLogLimit` to the ``asyncio`` logger (once)."""
    logger = logging.getLogger("asyncio")
    for f in logger.filters:
        if isinstance(f, AcceptErrorLogLimit):
            return f
    f = AcceptErrorLogLimit(interval)
    logger.addFilter(f)
    return f

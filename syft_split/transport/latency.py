"""Latency: a transport that adds a fixed delay per call (a simulated WAN), and calls in flight.

:class:`DelayedTransport` wraps any transport: each request reaches the party ``seconds / 2``
after it is sent and its answer comes back ``seconds / 2`` after the party answered, so a call
costs at least ``seconds`` more than on ``inner``. Like a real link it carries several calls at
once: :meth:`DelayedTransport.submit` returns at once, and a party answers its requests in
the order they were sent. Benches and tests use it to measure what latency-tolerant schedules
(:mod:`syft_split.local_loss`, :mod:`syft_split.pipeline`) buy, instead of claiming it.

:func:`submit_call` is :meth:`Transport.call` without waiting: it returns a future of the
decoded answer. On a transport with a ``submit`` method (``DelayedTransport``) several calls
are in flight at once; on any other transport the calls to one party run one after the other
on a worker thread (in order), so the caller can compute while it waits. Those workers keep
nothing of a finished call and stop when their transport is gone (closed and no longer
referenced).
"""

from __future__ import annotations

import queue
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from typing import Any

from .. import wire
from ..errors import ConfigError, TransportError
from .base import MODEL_OWNER, Transport, TransportWrapper

__all__ = ["DelayedTransport", "submit_call"]


class _Worker:
    """A daemon thread running submitted jobs one after the other, each not before its time."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.Queue[tuple[float, Callable[[], None]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, not_before: float, job: Callable[[], None]) -> None:
        self._jobs.put((not_before, job))

    def _run(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            not_before, job = item
            del item  # nothing of a finished job (its transport, data) stays alive while idle
            wait = not_before - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            try:
                job()
            finally:
                del job

    def stop(self) -> None:
        self._jobs.put(None)


class _Link:
    """One party's link: requests in order after half the delay, answers after the other half."""

    def __init__(self, inner: Transport, party: str, half: float) -> None:
        self.inner, self.party, self.half = inner, party, half
        self.there = _Worker(f"syft-split-link-{party}-out")
        self.back = _Worker(f"syft-split-link-{party}-back")
        self._lock = threading.Lock()
        self._open: set[Future[bytes]] = set()  # calls not answered yet
        self._closed = False

    def submit(self, data: bytes, timeout: float | None, op: str) -> Future[bytes]:
        fut: Future[bytes] = Future()
        with self._lock:
            if self._closed:
                raise TransportError(f"{self.party}: the delayed transport is closed")
            self._open.add(fut)
        fut.add_done_callback(self._answered)

        def arrive() -> None:
            if self._closed:  # closed before the request left: never sent
                return
            try:
                raw = self.inner.request_within(self.party, data, timeout, op)
            except BaseException as exc:
                error = exc
                self.back.put(time.monotonic() + self.half, lambda: _settle(fut, error=error))
                return
            self.back.put(time.monotonic() + self.half, lambda: _settle(fut, raw))

        self.there.put(time.monotonic() + self.half, arrive)
        return fut

    def _answered(self, fut: Future[bytes]) -> None:
        with self._lock:
            self._open.discard(fut)

    def stop(self) -> None:
        """Stop both directions; a call still in flight fails with :class:`TransportError`
        (its future would otherwise never complete)."""
        with self._lock:
            self._closed = True
            open_calls = list(self._open)
        for fut in open_calls:
            _settle(fut, error=TransportError(
                f"{self.party}: the delayed transport was closed with the call in flight"))
        self.there.stop()
        self.back.stop()


def _settle(fut: Future[bytes], raw: bytes | None = None, *,
            error: BaseException | None = None) -> None:
    """Complete ``fut`` unless it is complete already (a call failed by close())."""
    try:
        if error is not None:
            fut.set_exception(error)
        else:
            assert raw is not None
            fut.set_result(raw)
    except InvalidStateError:
        pass


class DelayedTransport(TransportWrapper):
    """``inner`` with ``seconds`` of added latency per call (see the module docstring)."""

    def __init__(self, inner: Transport, seconds: float) -> None:
        if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not (
                0 <= seconds <= 60):
            raise ConfigError(f"seconds must be a delay in [0, 60], got {seconds!r}")
        super().__init__(inner)
        self.seconds = float(seconds)
        self._links: dict[str, _Link] = {}
        self._lock = threading.Lock()
        self._closed = False

    def _link(self, party: str) -> _Link:
        with self._lock:
            if self._closed:  # not sent again either (a retry would open a new link)
                err = TransportError(f"{party}: the transport is closed")
                err.party, err.retry = party, False
                raise err
            link = self._links.get(party)
            if link is None:
                link = self._links[party] = _Link(self.inner, party, self.seconds / 2)
            return link

    def submit(self, party: str, data: bytes, timeout: float | None = None,
               op: str = "?") -> Future[bytes]:
        """Send ``data`` to ``party`` now; the future holds the answer once it is back (or the
        :class:`CallTimeoutError` of a party that took longer than ``timeout`` seconds)."""
        return self._link(party).submit(data, timeout, op)

    def request(self, party: str, data: bytes) -> bytes:
        return self.submit(party, data).result()

    def close(self) -> None:
        """Close the links, then ``inner``: a call still in flight fails with
        :class:`TransportError` (whoever waits on it is not left waiting forever)."""
        with self._lock:
            links, self._links, self._closed = list(self._links.values()), {}, True
        for link in links:
            link.stop()
        self.inner.close()


_FALLBACK: weakref.WeakKeyDictionary[Transport, dict[str, _Worker]] = weakref.WeakKeyDictionary()
_FALLBACK_LOCK = threading.Lock()


def _fallback_submit(transport: Transport, party: str, data: bytes, timeout: float | None,
                     op: str) -> Future[bytes]:
    with _FALLBACK_LOCK:
        workers = _FALLBACK.get(transport)
        if workers is None:
            workers = _FALLBACK[transport] = {}
            # the transport gone (closed and dropped), its workers stop: no thread outlives it
            weakref.finalize(transport, _stop_all, workers)
        worker = workers.get(party)
        if worker is None:
            worker = workers[party] = _Worker(f"syft-split-calls-{party}")
    fut: Future[bytes] = Future()

    def run() -> None:
        try:
            fut.set_result(transport.request_within(party, data, timeout, op))
        except BaseException as exc:
            fut.set_exception(exc)

    worker.put(0.0, run)
    return fut


def _stop_all(workers: dict[str, _Worker]) -> None:
    for worker in workers.values():
        worker.stop()


def submit_call(transport: Transport, party: str, op: str, **fields: Any
                ) -> Future[dict[str, Any]]:
    """:meth:`Transport.call` that does not wait: a future of the decoded answer (a data
    owner's error is raised by ``result()`` as the same :mod:`syft_split.errors` class).
    Calls to one party are answered in the order they were submitted; each is bounded by the
    transport's policy timeout for ``op`` (not retried)."""
    data = wire.encode({"op": op, **fields})
    transport.traffic.add(MODEL_OWNER, party, op, len(data), tuple(fields))
    t0 = time.perf_counter()
    timeout = transport.policy.timeout_for(op)
    raw_future = (transport.submit(party, data, timeout, op)
                  if isinstance(transport, DelayedTransport)
                  else _fallback_submit(transport, party, data, timeout, op))
    out: Future[dict[str, Any]] = Future()

    def done(f: Future[bytes]) -> None:
        try:  # answers of several parties arrive at once: answered() takes the lock
            out.set_result(transport.answered(party, op, f.result(), t0))
        except BaseException as exc:
            out.set_exception(exc)

    raw_future.add_done_callback(done)
    return out

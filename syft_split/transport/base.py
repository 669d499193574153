"""The transport seam: the only thing that moves bytes between parties.

A :class:`Transport` delivers one request (bytes) from the model owner to a named party and
returns that party's response (bytes). Everything above it (encoding, errors, byte counting,
timeouts, retries) is shared, so the in-process and PySyft transports differ only in
:meth:`Transport.request` (and, for transports that bound their own I/O, in
:meth:`Transport.request_within`).

Every call has a timeout (:class:`CallPolicy`, default 120 s per attempt; per-op overrides):
past it the call raises :class:`~syft_split.errors.CallTimeoutError` naming the party. A call
that fails in transit (a :class:`~syft_split.errors.TransportError`, timeouts included) is
retried with exponential backoff when repeating it is safe (an answer that cannot be read
counts as such a failure): read-only ops, evaluation
forwards, every request carrying a step id (the host applies each step id once) and a
``propose`` carrying a token (the host makes one proposal per token).

Bytes (:class:`TrafficLog`): a request is logged as sent at every attempt, also one that
failed (whether it reached the party is unknown at this layer: a timed-out request may still
be applied; a refused connection delivered nothing but is counted all the same); an answer is
logged as received once it arrived, also one that cannot be read.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .. import wire
from ..errors import (
    CallTimeoutError,
    ConfigError,
    PayloadTooLargeError,
    TransportError,
    WireError,
    error_from_wire,
)

__all__ = ["Transport", "TransportWrapper", "TrafficLog", "TrafficRecord", "MODEL_OWNER",
           "CallPolicy", "READ_ONLY_OPS", "run_with_timeout"]

T = TypeVar("T")

#: ops that change nothing at the data owner: always safe to send again
READ_ONLY_OPS = frozenset({"describe", "status", "export", "seal", "leakage", "watch",
                           "he_context", "he_costs", "psi_serve", "secagg_round"})


@dataclass(frozen=True)
class CallPolicy:
    """How long one call may take and how it is retried.

    ``timeout``: seconds one attempt may take (None: unbounded; ``op_timeouts`` overrides it
    per op, e.g. ``{"leakage": 600}``: the leakage measurement trains an attack).
    ``retries``: further attempts after a transport failure, for requests safe to repeat; the
    waits start at ``backoff`` seconds and double up to ``max_backoff``.
    """

    timeout: float | None = 120.0
    retries: int = 3
    backoff: float = 0.25
    max_backoff: float = 4.0
    op_timeouts: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        seconds = {"timeout": self.timeout,
                   **{f"op_timeouts[{k!r}]": v for k, v in self.op_timeouts.items()}}
        for name, value in seconds.items():
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                      or not (value > 0 and math.isfinite(value))):
                raise ConfigError(f"CallPolicy.{name} must be a positive number of seconds or "
                                  f"None, got {value!r}")
        if not isinstance(self.retries, int) or isinstance(self.retries, bool) or self.retries < 0:
            raise ConfigError(f"CallPolicy.retries must be an int >= 0, got {self.retries!r}")
        for name in ("backoff", "max_backoff"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ConfigError(f"CallPolicy.{name} must be >= 0 seconds, got {value!r}")

    def timeout_for(self, op: str) -> float | None:
        """The timeout of one attempt of ``op``."""
        return self.op_timeouts.get(op, self.timeout)


#: ops that change state but answer a repeat of the same request from their record
IDEMPOTENT_OPS = frozenset({"secagg_contribute", "secagg_check", "secagg_aggregate"})


def repeatable(op: str, fields: Mapping[str, Any]) -> bool:
    """Whether sending this request twice is safe (see the module docstring)."""
    if "step" in fields or op in READ_ONLY_OPS or op in IDEMPOTENT_OPS:
        return True
    if op == "propose" and "token" in fields:
        return True
    return op in ("forward", "loss_step") and fields.get("train") is False


def decode_response(raw: bytes, party: str, op: str, max_bytes: int) -> dict[str, Any]:
    """Decode a party's answer. One that cannot be read (damaged, truncated, over
    ``max_bytes``) is a :class:`TransportError`: the party may have applied the request, so
    its fate is unknown (a request with a step id is settled by sending it again), unlike an
    answer that reports an error, which says nothing was applied."""
    try:
        return wire.decode(raw, max_bytes=max_bytes)
    except (WireError, PayloadTooLargeError) as exc:
        err = TransportError(f"{party} answered {op!r} with a response that cannot be read "
                             f"({type(exc).__name__}: {exc}); whether it applied the request "
                             "is unknown")
        err.party = party
        # too large comes back too large: sending it again runs the request again for nothing
        err.retry = not isinstance(exc, PayloadTooLargeError)
        raise err from exc


class _CallThreads:
    """Daemon threads that run calls under a watchdog; an idle one is reused.

    A fresh thread per call costs milliseconds: torch builds an intra-op (OpenMP) thread
    team for every new calling thread, and a second team spinning beside the model owner's
    competes for the cores. So call threads are reused and use one intra-op thread each
    (what an in-process data owner computes runs single-threaded). Measured, plain
    in-process digits step: 11 ms with a new thread per call, 2.8 ms with reused threads,
    1.7 ms with reused single-threaded ones, 1.5 ms without a watchdog. A call that times
    out keeps its thread busy; the next call then gets a new one. (Not a
    ``ThreadPoolExecutor``: its threads are joined at interpreter exit, so one hung call
    would hang the exit; these are daemon threads.)
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._idle = 0
        self._lock = threading.Lock()

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            spawn = self._idle == 0
            if not spawn:
                self._idle -= 1  # reserved: that idle thread takes this job
        self._jobs.put(job)
        if spawn:
            threading.Thread(target=self._loop, daemon=True, name="syft-split-call").start()

    def _loop(self) -> None:
        import torch

        torch.set_num_threads(1)  # per thread: the caller's setting is unchanged
        while True:
            self._jobs.get()()
            with self._lock:
                self._idle += 1


_CALL_THREADS = _CallThreads()


def run_with_timeout(fn: Callable[[], T], timeout: float | None, *, party: str,
                     op: str) -> T:
    """``fn()`` on a watchdog thread; :class:`CallTimeoutError` if it takes over ``timeout``
    seconds (the thread is abandoned: whatever it was doing may still complete)."""
    if timeout is None:
        return fn()
    box: dict[str, Any] = {}
    done = threading.Event()

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc
        finally:
            done.set()

    _CALL_THREADS.submit(run)
    if not done.wait(timeout):
        raise timeout_error(party, op, timeout)
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


def timeout_error(party: str, op: str, timeout: float) -> CallTimeoutError:
    exc = CallTimeoutError(f"{party} did not answer op {op!r} within {timeout:g} s (it may "
                           "still apply it: a request with a step id is safe to send again)")
    exc.party = party
    return exc

#: the name the model owner (driver) goes by in traffic logs.
MODEL_OWNER = "model_owner"


@dataclass(frozen=True)
class TrafficRecord:
    """One message on the wire: who sent it to whom, for which op, how big, which fields."""

    src: str
    dst: str
    op: str
    nbytes: int
    fields: tuple[str, ...]


@dataclass
class TrafficLog:
    """Every message a transport carried, and byte totals per party and direction.

    Safe to add to from several threads (concurrent calls to different parties)."""

    records: list[TrafficRecord] = field(default_factory=list)
    #: records dropped by :meth:`clear` (:meth:`size` and :meth:`since` count every record
    #: ever added, so a reader's position survives a clear)
    dropped: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, src: str, dst: str, op: str, nbytes: int, fields: tuple[str, ...]) -> None:
        with self._lock:
            self.records.append(TrafficRecord(src, dst, op, nbytes, fields))

    def snapshot(self) -> list[TrafficRecord]:
        """The records so far (a copy; safe while other threads add)."""
        with self._lock:
            return list(self.records)

    def size(self) -> int:
        """How many records were ever added (those dropped by :meth:`clear` included)."""
        with self._lock:
            return self.dropped + len(self.records)

    def since(self, start: int) -> list[TrafficRecord]:
        """The records added from position ``start`` (a :meth:`size`) on, still held (a copy)."""
        with self._lock:
            return self.records[max(0, start - self.dropped):]

    def bytes_by_party(self) -> dict[str, dict[str, int]]:
        """``{party: {"sent": n, "received": n}}`` over all records."""
        out: dict[str, dict[str, int]] = defaultdict(lambda: {"sent": 0, "received": 0})
        for r in self.snapshot():
            out[r.src]["sent"] += r.nbytes
            out[r.dst]["received"] += r.nbytes
        return {k: dict(v) for k, v in out.items()}

    def bytes_by_direction(self) -> dict[str, int]:
        """``{"src->dst": n}`` over all records."""
        out: dict[str, int] = defaultdict(int)
        for r in self.snapshot():
            out[f"{r.src}->{r.dst}"] += r.nbytes
        return dict(out)

    def fields_sent_by(self, party: str) -> set[str]:
        """Names of every field ``party`` ever sent (e.g. to assert labels never left)."""
        return {f for r in self.snapshot() if r.src == party for f in r.fields}

    def clear(self) -> None:
        with self._lock:
            self.dropped += len(self.records)
            self.records.clear()


class Transport(ABC):
    """Moves requests from the model owner to data-owner hosts and returns their answers.

    Subclasses implement :meth:`request` only. :meth:`call` encodes, counts, decodes, and
    re-raises a host's error as the same :mod:`syft_split.errors` class.

    Calls to *different* parties may run concurrently from several threads (the counters and
    the traffic log are locked; :meth:`request` of the built-in transports serialises calls
    to the same party). ``seconds_in_transport`` sums every call's duration, so it can exceed
    wall time when calls overlap.
    """

    def __init__(self, *, max_response_bytes: int = wire.DEFAULT_MAX_BYTES,
                 policy: CallPolicy | None = None) -> None:
        self.traffic = TrafficLog()
        self.max_response_bytes = max_response_bytes
        self.seconds_in_transport = 0.0
        self.calls = 0
        #: timeouts and retries of every call (replace it to reconfigure)
        self.policy = policy or CallPolicy()
        #: attempts repeated after a transport failure
        self.retries = 0
        self._counter_lock = threading.Lock()

    @property
    @abstractmethod
    def user(self) -> str:
        """The identity this transport acts as (the model owner's e-mail)."""

    @abstractmethod
    def parties(self) -> list[str]:
        """Names of the data-owner parties reachable through this transport."""

    @abstractmethod
    def request(self, party: str, data: bytes) -> bytes:
        """Deliver ``data`` to ``party`` as :attr:`user` and return the response bytes."""

    def request_within(self, party: str, data: bytes, timeout: float | None,
                       op: str = "?") -> bytes:
        """:meth:`request`, bounded by ``timeout`` seconds (:class:`CallTimeoutError`). This
        default runs it on a watchdog thread; transports that bound their own I/O override it."""
        return run_with_timeout(lambda: self.request(party, data), timeout, party=party, op=op)

    def call(self, party: str, op: str, **fields: Any) -> dict[str, Any]:
        """Send ``op`` with ``fields`` to ``party``; return the decoded response fields.

        Bounded by the policy's timeout; retried with backoff after a transport failure when
        the request is safe to repeat (see the module docstring)."""
        data = wire.encode({"op": op, **fields})
        policy = self.policy
        attempts = 1 + (policy.retries if repeatable(op, fields) else 0)
        wait = policy.backoff
        t0 = time.perf_counter()
        for attempt in range(attempts):
            # booked as sent at every attempt: whether a failed attempt reached the party is
            # unknown here (a timed-out request may still be applied), so each one counts
            self.traffic.add(MODEL_OWNER, party, op, len(data), tuple(fields))
            try:
                raw = self.request_within(party, data, policy.timeout_for(op), op)
                response = self._read(party, op, raw)  # an unreadable answer is retried too
                break
            except TransportError as exc:
                if exc.party is None:
                    exc.party = party
                if attempt == attempts - 1 or not exc.retry:
                    with self._counter_lock:
                        self.seconds_in_transport += time.perf_counter() - t0
                    raise
                with self._counter_lock:
                    self.retries += 1
                time.sleep(wait)
                wait = min(2 * wait, policy.max_backoff)
        with self._counter_lock:
            self.seconds_in_transport += time.perf_counter() - t0
        return _raise_error(response)

    def answered(self, party: str, op: str, raw: bytes, t0: float) -> dict[str, Any]:
        """The answer ``raw`` to a call of ``op`` sent at ``t0``: counted (also from several
        threads at once), logged, decoded; a data owner's error raised as its class."""
        with self._counter_lock:
            self.seconds_in_transport += time.perf_counter() - t0
        return _raise_error(self._read(party, op, raw))

    def _read(self, party: str, op: str, raw: bytes) -> dict[str, Any]:
        """Count an answer and log its bytes (also one that cannot be read: it was received),
        then decode it (:class:`TransportError` if it cannot be read)."""
        with self._counter_lock:
            self.calls += 1
        try:
            response = decode_response(raw, party, op, self.max_response_bytes)
        except TransportError:
            self.traffic.add(party, MODEL_OWNER, op, len(raw), ())
            raise
        self.traffic.add(party, MODEL_OWNER, op, len(raw), tuple(response))
        return response

    def datasite_host(self, party: str) -> str:
        """The host ``party`` is reached at: a direct channel connects only to it (by name or an
        address it resolves to) or to a host the model owner allowed (``channel_hosts``).
        Default: ``localhost`` (a data owner in this process)."""
        return "localhost"

    def close(self) -> None:
        """Release what the transport holds (servers it launched, connections)."""


def _raise_error(response: dict[str, Any]) -> dict[str, Any]:
    """``response``, or the data owner's error it reports raised as its class (with the
    ``peer`` it names, if that is a short string)."""
    if "error" in response:
        exc = error_from_wire(str(response.get("error")), str(response.get("message", "")))
        peer = response.get("peer")
        if isinstance(peer, str) and 0 < len(peer) <= 256:
            exc.peer = peer
        raise exc
    return response


class TransportWrapper(Transport):
    """A transport around ``inner`` that adds something to each request (a delay, a record,
    direct channels): same user and parties, its own traffic log and call policy (``inner``'s
    by default); :meth:`close` closes ``inner``. Subclasses override :meth:`request`."""

    def __init__(self, inner: Transport, *, policy: CallPolicy | None = None) -> None:
        super().__init__(max_response_bytes=inner.max_response_bytes,
                         policy=policy or inner.policy)
        self.inner = inner

    @property
    def user(self) -> str:
        return self.inner.user

    def parties(self) -> list[str]:
        return self.inner.parties()

    def request(self, party: str, data: bytes) -> bytes:
        return self.inner.request(party, data)

    def datasite_host(self, party: str) -> str:
        return self.inner.datasite_host(party)

    def close(self) -> None:
        self.inner.close()

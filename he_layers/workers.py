"""A second core for the model owner's ciphertext products: worker processes.

SEAL (through ``tenseal.sealapi``) holds the GIL, so threads give no speedup. With
``LayerSpec.workers = k`` the layouts split a product into output chunks
(:meth:`Layout.chunk_owner`); the model owner computes its own chunks while ``k - 1``
worker processes compute the others. A worker is a separate interpreter
(running :func:`main`) started once and reused; it talks over its stdin/stdout
in he_layers frames (JSON header + byte blobs, length-prefixed; no pickle). It only ever
holds what the model owner already has: the public context, the input ciphertexts and the
model owner's own plain matrix. If a worker fails, the model owner computes its chunks
itself (same result) and starts a new worker for the next product.
"""

from __future__ import annotations

import atexit
import os
import select
import subprocess
import sys
import threading
from collections import Counter
from typing import IO, Any

import numpy as np

from syft_split.errors import HEError

from ._seal_io import load_ciphertext, to_bytes
from .packing import Layout
from .wire import array_from_bytes, array_to_bytes, decode_frame, encode_frame

__all__ = ["WorkerPool", "parallel_matmul", "pool"]

_KIND = "he_worker"
_MAX_FRAME = 1 << 31
#: public contexts a worker keeps (oldest dropped first, on both sides alike)
MAX_CONTEXTS = 8
#: pipe capacity asked for (bytes): a digits-sized product's request and reply fit
PIPE_BYTES = 1 << 20
#: seconds the model owner waits for a worker's reply before computing the chunks itself
REPLY_TIMEOUT = 120.0


def _write(stream: IO[bytes], frame: bytes) -> None:
    stream.write(len(frame).to_bytes(8, "little") + frame)
    stream.flush()


def _read(stream: IO[bytes]) -> bytes | None:
    head = stream.read(8)
    if len(head) < 8:
        return None
    n = int.from_bytes(head, "little")
    if n > _MAX_FRAME:
        raise HEError(f"worker frame of {n} bytes is larger than {_MAX_FRAME}")
    data = stream.read(n)
    if len(data) < n:
        return None
    return data


def _grow_pipe(stream: Any) -> None:
    """Let a pipe hold a whole product's frame (Linux; elsewhere a no-op), so that the
    sender goes on computing instead of waiting for the reader 64 KiB at a time."""
    try:
        import fcntl

        with open("/proc/sys/fs/pipe-max-size") as fh:
            limit = int(fh.read())
        fcntl.fcntl(stream.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), min(limit, PIPE_BYTES))
    except (ImportError, OSError, ValueError):
        pass


class _Worker:
    """One worker process and the contexts it has loaded."""

    def __init__(self) -> None:
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([here, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env["OMP_NUM_THREADS"] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from he_layers.workers import main; main()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, env=env)
        for stream in (self.proc.stdin, self.proc.stdout):  # a product's frames fit whole
            _grow_pipe(stream)
        self.contexts: list[str] = []  # what the worker holds, in its eviction order

    def hold(self, cid: str) -> None:
        """Record that the worker now holds context ``cid`` (and dropped its oldest)."""
        self.contexts.append(cid)
        del self.contexts[:-MAX_CONTEXTS]

    def send(self, head: dict[str, Any], blobs: list[bytes]) -> None:
        assert self.proc.stdin is not None
        _write(self.proc.stdin, encode_frame(_KIND, head, blobs))

    def receive(self) -> tuple[dict[str, Any], list[bytes]]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], REPLY_TIMEOUT)
        if not ready:
            raise HEError(f"he_layers worker (pid {self.proc.pid}) did not answer within "
                          f"{REPLY_TIMEOUT:g} s")
        data = _read(self.proc.stdout)
        if data is None:
            raise HEError(f"he_layers worker (pid {self.proc.pid}) exited")
        head, blobs = decode_frame(data, _KIND)
        if "error" in head:
            raise HEError(f"he_layers worker: {head['error']}")
        return head, blobs

    def close(self) -> None:
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()
        self.proc.kill()
        self.proc.wait()


class WorkerPool:
    """Worker processes for :func:`parallel_matmul` (started on first use, then reused)."""

    def __init__(self) -> None:
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self.failures = 0

    def workers(self, n: int) -> list[_Worker]:
        """At least ``n`` live workers (started if needed); the first ``n`` of them."""
        self._workers = [w for w in self._workers if w.proc.poll() is None]
        while len(self._workers) < n:
            self._workers.append(_Worker())
        return self._workers[:n]

    def drop(self, worker: _Worker) -> None:
        """Forget (and kill) a worker that failed."""
        self.failures += 1
        if worker in self._workers:
            self._workers.remove(worker)
        worker.close()

    def close(self) -> None:
        """Stop every worker."""
        for w in self._workers:
            w.close()
        self._workers = []


_POOL: WorkerPool | None = None


def pool() -> WorkerPool:
    """The process-wide pool (shared by every encrypted layer of this process)."""
    global _POOL
    if _POOL is None:
        _POOL = WorkerPool()
        atexit.register(_POOL.close)
    return _POOL


def _positions(layout: Layout, chunks: list[int]) -> list[int]:
    """Where the outputs of ``chunks`` sit in a product's output list, in the order a worker
    sends them."""
    return [r * layout.out_chunks + j for j in chunks for r in range(layout.row_chunks)]


def parallel_matmul(ctx: Any, cts: list[Any], blobs: list[bytes], p: np.ndarray,
                    layout: Layout, *, rescale: bool, workers: int) -> list[Any]:
    """``ctx.evaluator.matmul`` with the output chunks split over ``workers`` processes.

    ``ctx`` is the :class:`~he_layers.keys.ServerContext`; ``blobs`` the bytes ``cts`` were
    loaded from. The workers' operation counts are added to the evaluator's. With one
    process (or one output chunk) it is ``ev.matmul`` and no worker is started.
    """
    ev = ctx.evaluator
    k = max(1, min(workers, layout.out_chunks))
    if k == 1:
        return ev.matmul(cts, p, layout, rescale=rescale)
    mine = [j for j in range(layout.out_chunks) if layout.chunk_owner(j, k) == 0]
    theirs = {w: [j for j in range(layout.out_chunks) if layout.chunk_owner(j, k) == w]
              for w in range(1, k)}
    the_pool = pool()
    with the_pool._lock:
        try:
            procs = the_pool.workers(k - 1)
        except OSError:  # no process can be started here: one core it is
            the_pool.failures += 1
            return ev.matmul(cts, p, layout, rescale=rescale)
        p = np.ascontiguousarray(p, dtype=np.float64)
        sent: dict[int, tuple[_Worker, int]] = {}  # worker index -> (process, replies due)
        for w, proc in zip(theirs, procs, strict=True):
            try:
                replies = 1
                if ctx.context_id not in proc.contexts:
                    proc.send({"op": "setup", "ctx": ctx.context_id, "keep": MAX_CONTEXTS},
                              [ctx.public_bytes])
                    proc.hold(ctx.context_id)
                    replies = 2
                proc.send({"op": "matmul", "ctx": ctx.context_id, "layout": layout.to_dict(),
                           "rescale": rescale, "chunks": theirs[w], "shape": list(p.shape)},
                          [*blobs, array_to_bytes(p)])
                sent[w] = (proc, replies)
            except (OSError, ValueError):
                the_pool.drop(proc)
        try:
            out = ev.matmul(cts, p, layout, rescale=rescale, chunks=mine)
        except BaseException:  # their replies would be read as the next product's: drop them
            for proc, _ in sent.values():
                the_pool.drop(proc)
            raise
        for w, chunks in theirs.items():
            where = _positions(layout, chunks)
            results: list[Any] | None = None
            if w in sent:
                proc, replies = sent[w]
                try:
                    results = _results(proc, replies, ctx, len(where))
                except (HEError, OSError, ValueError):
                    the_pool.drop(proc)
            if results is None:  # the worker failed: the same chunks here
                part = ev.matmul(cts, p, layout, rescale=rescale, chunks=chunks)
                results = [part[i] for i in where]
            for i, ct in zip(where, results, strict=True):
                out[i] = ct
    return out


def _results(proc: _Worker, replies: int, ctx: Any, n: int) -> list[Any]:
    """Read a worker's replies (a setup's, then the product's); count its operations."""
    for _ in range(replies - 1):
        proc.receive()
    head, blobs = proc.receive()
    if len(blobs) != n:
        raise HEError(f"he_layers worker returned {len(blobs)} ciphertexts, expected {n}")
    cts = [load_ciphertext(ctx.seal_context, b, "worker output") for b in blobs]
    ctx.evaluator.counts.update({str(k): int(v) for k, v in head.get("counts", {}).items()})
    return cts


# ----------------------------------------------------------------------------- worker side
def _handle(contexts: dict[str, Any], head: dict[str, Any],
            blobs: list[bytes]) -> tuple[dict[str, Any], list[bytes]]:
    from .keys import ServerContext

    if head.get("op") == "setup":
        contexts[str(head["ctx"])] = ServerContext.from_bytes(blobs[0])
        for old in list(contexts)[:-max(1, int(head["keep"]))]:
            del contexts[old]
        return {"ok": True}, []
    if head.get("op") != "matmul":
        raise HEError(f"unknown worker op {head.get('op')!r}")
    ctx = contexts[str(head["ctx"])]
    layout = Layout(**head["layout"])
    shape = tuple(int(v) for v in head["shape"])
    p = array_from_bytes(blobs[-1], shape, "plain matrix")
    cts = ctx.load_inputs(blobs[:-1], layout, "worker input")
    ev = ctx.evaluator
    before = Counter(ev.counts)
    chunks = [int(j) for j in head["chunks"]]
    out = ev.matmul(cts, p, layout, rescale=bool(head["rescale"]), chunks=chunks)
    ops = Counter(ev.counts)
    ops.subtract(before)
    return {"counts": dict(ops)}, [to_bytes(out[i]) for i in _positions(layout, chunks)]


def main() -> None:
    """Serve frames on stdin/stdout until stdin closes."""
    inp = sys.stdin.buffer
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints go to stderr, never into the frames
    contexts: dict[str, Any] = {}
    while True:
        data = _read(inp)
        if data is None:
            return
        try:
            head, blobs = decode_frame(data, _KIND)
            reply = _handle(contexts, head, blobs)
        except Exception as exc:  # reported to the model owner, which computes it itself
            reply = ({"error": f"{type(exc).__name__}: {exc}"}, [])
        _write(out, encode_frame(_KIND, *reply))

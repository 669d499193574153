"""Benchmark: one split-learning training step through PySyft datasites vs locally.

A small CNN on 8x8 digits (scikit-learn's bundled ``load_digits``), batch 128. The data
owner holds the features and runs the first segment (Conv2d-ReLU-MaxPool-Flatten, 256 values
per record); the model owner holds the labels and the rest (Linear-ReLU-Linear). SGD.

Every split variant runs in steady state with ONE data-owner call per step: the fused
``forward`` carries the gradient of the previous forward (backward(t) + forward(t+1)).

- ``step_s_local``: the unsplit model, one local step (median).
- ``step_s_inprocess``: through ``InProcessTransport`` + ``DataOwnerHost`` (serialised).
- ``step_s_datasite_mem``: through ``PySyftTransport`` to an embedded datasite.
- ``step_s_datasite_http``: through ``PySyftTransport`` to a uvicorn datasite on loopback.
- ``noop_call_s_http``: ``api.call`` of a custom endpoint that does nothing, on the same
  HTTP server, as the same user: PySyft's floor for one call. Sampled between the timed steps
  (every steps/100-th step, outside the step timing) so both see the same machine load.
- ``rss_growth_mib_2000_steps``: RSS of the HTTP datasite process (psutil) after minus before
  the timed steps (2 000, or ``steps_http`` with ``--quick``), after a warm-up.
- ``host_op_s_http``: median time the host spent inside ``handle`` per step (from its audit).
- ``action_objects_growth_http``: rows added to the datasite's action-object table over the
  timed steps (PySyft stores every call's result; the endpoint deletes the previous one).

The direct data plane (the segment is approved with ``channel=True``; the same transport,
first with ``direct=False``, then ``direct=True``), on the same datasites in the same run:

- ``step_s_direct_http`` / ``step_s_direct_mem``: the same fused step over the TLS 1.3 channel
  the datasite opened through PySyft (answered by the same ``host.handle``, audited per step).
- ``ratio_direct_vs_local``: ``step_s_direct_http / step_s_local`` (goal <= 3).
- ``channel_open_s``: median time to open a channel (PySyft ``open_channel`` call, TLS
  handshake with the pinned certificate, key check), HTTP datasite.
- ``rss_growth_mib_direct_2000_steps``: RSS growth of the HTTP datasite process over the timed
  direct steps (goal <= 50); ``host_op_s_direct_http``: time inside ``handle`` per step.
- Crypto cost, on loopback in this process, one step's frames (grad + indices out, activation
  back): ``roundtrip_s_tls_step`` (the channel's framing over TLS 1.3),
  ``roundtrip_s_plain_step`` (same framing, plain TCP), ``crypto_s_per_step`` (the
  difference), ``crypto_share_of_direct_step``; and the alternatives the choice was made
  against: ``roundtrip_s_zmq_curve_step`` (ZeroMQ REQ/REP with CURVE, which PySyft already
  installs) and ``secretbox_s_step`` (PyNaCl SecretBox seal + open of both frames, no I/O).

torch runs with ``--threads`` intra-op threads (default 1) in this process and the forked
datasite: on a busy 2-core machine the default 2 threads make each tiny op ~50x slower.

Writes ``bench/results/pysyft_step.json`` (flat object of named numbers) and prints it.
``--quick``: few steps, written to ``bench/results/pysyft_step_quick.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")

from syft_split.host import DataOwnerHost  # noqa: E402
from syft_split.spec import OptimizerSpec, module_to_spec, spec_state  # noqa: E402
from syft_split.transport.base import Transport  # noqa: E402
from syft_split.transport.inprocess import InProcessTransport  # noqa: E402

BATCH = 128
PARTY = "hospital"
LR = 0.05


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return x, torch.tensor(d.target, dtype=torch.int64)


def make_model(seed: int = 0) -> tuple[nn.Sequential, nn.Sequential]:
    torch.manual_seed(seed)
    bottom = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                           nn.Flatten())
    top = nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 10))
    return bottom, top


def batches(n_records: int, steps: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(n_records, generator=g)[:BATCH] for _ in range(steps)]


def bench_local(x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    bottom, top = make_model()
    model = nn.Sequential(bottom, top)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    times = []
    for idx in batches(len(x), steps):
        t0 = time.perf_counter()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def propose(transport: Transport, bottom: nn.Module) -> str:
    state = {f"state/{k}": v for k, v in spec_state(bottom).items()}
    return str(transport.call(PARTY, "propose", role="input", spec=module_to_spec(bottom),
                              optimizer=OptimizerSpec("sgd", lr=LR).to_json(),
                              datasets=["digits"], max_batch=BATCH, **state)["segment"])


def run_split(transport: Transport, pid: str, y: torch.Tensor, n_records: int, steps: int,
              warmup: int, on_warm: Callable[[], None] | None = None,
              between: Callable[[int], None] | None = None) -> tuple[float, float, int]:
    """Fused steady state; returns (median step seconds, final loss, data-owner calls/step).

    ``between(i)`` runs after timed step ``i``, outside the timing (e.g. a floor sample).
    """
    _, top = make_model()
    opt = torch.optim.SGD(top.parameters(), lr=LR)
    plan = batches(n_records, warmup + steps + 1)
    act = transport.call(PARTY, "forward", segment=pid, indices=plan[0])["activation"]
    times, loss_value, calls, calls0 = [], float("nan"), 0, 0
    for i in range(warmup + steps):
        if i == warmup and on_warm is not None:
            on_warm()
        calls0 = transport.calls
        t0 = time.perf_counter()
        a = act.requires_grad_()
        opt.zero_grad()
        loss = nn.functional.cross_entropy(top(a), y[plan[i]])
        loss.backward()
        opt.step()
        assert a.grad is not None
        act = transport.call(PARTY, "forward", segment=pid, indices=plan[i + 1],
                             grad=a.grad)["activation"]
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            calls += transport.calls - calls0
            if between is not None:
                between(i - warmup)
        loss_value = float(loss)
    transport.call(PARTY, "discard", segment=pid)
    return statistics.median(times), loss_value, round(calls / steps)


def bench_inprocess(x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    host = DataOwnerHost(PARTY)
    host.add_dataset("digits", x)
    transport = InProcessTransport([host])
    pid = propose(transport, make_model()[0])
    host.approve(pid)
    return run_split(transport, pid, y, len(x), steps, warmup=5)[0]


def noop_endpoint(context: object) -> bytes:
    """PySyft's floor: an endpoint that does nothing (but unregister PySyft's per-call client
    APIs, as the syft-split endpoint does; otherwise each call leaks ~10 MiB)."""
    from syft_split.datasite_serve import _unregister_call_clients

    _unregister_call_clients(context)
    return b""


def action_objects(data_dir: Path) -> int:
    """Rows in the datasite's action-object table (stored results, assets, endpoints)."""
    import sqlite3

    [db] = list((data_dir / "db").glob("*.db"))
    with sqlite3.connect(db) as conn:
        return int(conn.execute('select count(*) from "ActionObject"').fetchone()[0])


def bench_datasite(x: torch.Tensor, y: torch.Tensor, *, http: bool, steps: int,
                   noop_calls: int) -> dict[str, float]:
    import psutil
    import syft as sy

    from syft_split.transport.pysyft import deployment

    kind = "http" if http else "mem"
    out: dict[str, float] = {}
    dep = deployment({PARTY: {"digits": (x, None)}}, http=http, name_prefix=f"bench-{kind}")
    try:
        transport = dep.transport
        site = transport.datasites[PARTY]
        pid = propose(transport, make_model()[0])
        dep.owners[PARTY].approve(pid, channel=True)
        proc = psutil.Process(site.pid)
        rss: dict[str, int] = {}

        objects_before = 0

        def mark() -> None:
            nonlocal objects_before
            objects_before = action_objects(site.data_dir)
            gc.collect()
            rss["before"] = proc.memory_info().rss
            rss["client"] = psutil.Process().memory_info().rss

        site.root.api.services.api.add(
            endpoint=sy.api_endpoint(path="syft_split.noop")(noop_endpoint))
        client = transport._client(PARTY)
        every = max(1, steps // noop_calls)
        noop: list[float] = []

        def floor_sample(i: int) -> None:  # interleaved with the steps: same load
            if i % every == 0:
                t0 = time.perf_counter()
                result = client.api.services.api.call("syft_split.noop")
                noop.append(time.perf_counter() - t0)
                site.root.api.services.action.delete(result.id)  # keep the store as it was

        audit_start = len(dep.owners[PARTY].audit())
        transport.direct = False  # the PySyft path first
        step_s, loss, calls = run_split(transport, pid, y, len(x), steps, warmup=20,
                                        on_warm=mark, between=floor_sample)
        gc.collect()
        out[f"rss_growth_mib_{kind}"] = (proc.memory_info().rss - rss["before"]) / 2**20
        if http:
            out["rss_growth_mib_client_http"] = (
                psutil.Process().memory_info().rss - rss["client"]) / 2**20
        out[f"step_s_datasite_{kind}"] = step_s
        out[f"noop_call_s_{kind}"] = statistics.median(noop)
        out[f"final_loss_{kind}"] = loss
        out[f"datasite_calls_per_step_{kind}"] = calls
        host_s = [e.seconds for e in dep.owners[PARTY].audit(audit_start) if e.op == "forward"]
        out[f"host_op_s_{kind}"] = statistics.median(host_s)
        out[f"action_objects_growth_{kind}"] = (
            action_objects(site.data_dir) - objects_before)
        out.update(bench_direct(transport, dep.owners[PARTY], pid, proc, y, len(x), kind, steps,
                                mark, rss))
    finally:
        dep.close()
    return out


def bench_direct(transport: Any, owner: Any, pid: str, proc: Any, y: torch.Tensor,
                 n_records: int, kind: str, steps: int, mark: Callable[[], None],
                 rss: dict[str, int]) -> dict[str, float]:
    """The same steps over the direct channel (same transport, same datasite, same segment)."""
    out: dict[str, float] = {}
    transport.direct = True
    opens = []
    for _ in range(5):
        t0 = time.perf_counter()
        transport.router.open(PARTY, [pid])  # replaces the previous channel
        opens.append(time.perf_counter() - t0)
    out[f"channel_open_s_{kind}"] = statistics.median(opens)
    calls0 = transport.router.direct_calls
    audit_start = len(owner.audit())
    step_s, loss, calls = run_split(transport, pid, y, n_records, steps, warmup=20, on_warm=mark)
    gc.collect()
    out[f"rss_growth_mib_direct_{kind}"] = (proc.memory_info().rss - rss["before"]) / 2**20
    out[f"step_s_direct_{kind}"] = step_s
    out[f"final_loss_direct_{kind}"] = loss
    out[f"direct_calls_per_step_{kind}"] = calls
    entries = owner.audit(audit_start)
    host_s = [e.seconds for e in entries if e.op == "forward"]
    out[f"host_op_s_direct_{kind}"] = statistics.median(host_s)
    # every step was answered over the channel and audited once at the data owner
    assert transport.router.direct_calls - calls0 == len(host_s) + 1  # + the closing discard
    transport.direct = False
    return out


def _echo_server(wrap: Callable[[socket.socket], socket.socket], reply: bytes
                 ) -> tuple[int, threading.Thread]:
    from syft_split.channel import tls

    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        raw, _ = listener.accept()
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = wrap(raw)
        try:
            while True:
                tls.recv_frame(conn, 1 << 26)
                tls.send_frame(conn, reply)
        except (EOFError, OSError):
            pass
        finally:
            conn.close()
            listener.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return int(listener.getsockname()[1]), thread


def _roundtrip(request: bytes, reply: bytes, reps: int, *, use_tls: bool) -> float:
    from syft_split.channel import tls

    der, pem, key = tls.make_certificate()
    server_ctx, client_ctx = tls.server_context(pem, key), tls.client_context(der)
    port, thread = _echo_server(
        (lambda s: server_ctx.wrap_socket(s, server_side=True)) if use_tls else (lambda s: s),
        reply)
    raw = socket.create_connection(("127.0.0.1", port))
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn = client_ctx.wrap_socket(raw, server_hostname="bench") if use_tls else raw
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        tls.send_frame(conn, request)
        tls.recv_frame(conn, 1 << 26)
        times.append(time.perf_counter() - t0)
    conn.close()
    thread.join(timeout=5)
    return statistics.median(times)


def _zmq_curve(request: bytes, reply: bytes, reps: int) -> float:
    import zmq

    ctx = zmq.Context()
    server_public, server_secret = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    rep = ctx.socket(zmq.REP)
    rep.curve_secretkey, rep.curve_publickey, rep.curve_server = server_secret, server_public, True
    port = rep.bind_to_random_port("tcp://127.0.0.1")
    req = ctx.socket(zmq.REQ)
    req.curve_serverkey, req.curve_publickey = server_public, client_public
    req.curve_secretkey = client_secret
    req.connect(f"tcp://127.0.0.1:{port}")

    def serve() -> None:
        for _ in range(reps):
            rep.recv()
            rep.send(reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        req.send(request)
        req.recv()
        times.append(time.perf_counter() - t0)
    thread.join(timeout=10)
    req.close(0)
    rep.close(0)
    ctx.term()
    return statistics.median(times)


def _secretbox(request: bytes, reply: bytes, reps: int) -> float:
    from nacl.secret import SecretBox
    from nacl.utils import random as nacl_random

    box = SecretBox(nacl_random(SecretBox.KEY_SIZE))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        box.decrypt(box.encrypt(request))
        box.decrypt(box.encrypt(reply))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_crypto(reps: int) -> dict[str, float]:
    """One step's frames (grad + indices out, activation back) through each candidate."""
    from syft_split import wire

    g = torch.Generator().manual_seed(0)
    request = wire.encode({"op": "forward", "segment": "hospital/seg1",
                           "indices": torch.randperm(1797, generator=g)[:BATCH],
                           "grad": torch.randn(BATCH, 256, generator=g)})
    reply = wire.encode({"activation": torch.randn(BATCH, 256, generator=g)})
    out = {"frame_bytes_out": len(request), "frame_bytes_back": len(reply)}
    out["roundtrip_s_plain_step"] = _roundtrip(request, reply, reps, use_tls=False)
    out["roundtrip_s_tls_step"] = _roundtrip(request, reply, reps, use_tls=True)
    out["crypto_s_per_step"] = max(0.0, out["roundtrip_s_tls_step"]
                                   - out["roundtrip_s_plain_step"])
    out["roundtrip_s_zmq_curve_step"] = _zmq_curve(request, reply, max(20, reps // 10))
    out["secretbox_s_step"] = _secretbox(request, reply, reps)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps_local = 50 if args.quick else 500
    steps_mem = 20 if args.quick else 300
    steps_http = 30 if args.quick else 2000
    noop_calls = 10 if args.quick else 100

    x, y = load_digits()
    level = logging.getLogger().level
    out: dict[str, float] = {"batch": BATCH, "torch_threads": args.threads,
                             "steps_http": steps_http, "steps_mem": steps_mem}
    out["step_s_local"] = bench_local(x, y, steps_local)
    out["step_s_inprocess"] = bench_inprocess(x, y, steps_local)
    out.update(bench_datasite(x, y, http=False, steps=steps_mem, noop_calls=noop_calls))
    out.update(bench_datasite(x, y, http=True, steps=steps_http, noop_calls=noop_calls))
    logging.getLogger().setLevel(level)
    out.update(bench_crypto(50 if args.quick else 300))
    out["rss_growth_mib_2000_steps"] = out.pop("rss_growth_mib_http")
    out["rss_growth_mib_direct_2000_steps"] = out.pop("rss_growth_mib_direct_http")
    out["channel_open_s"] = out.pop("channel_open_s_http")
    out["ratio_datasite_mem_vs_local"] = out["step_s_datasite_mem"] / out["step_s_local"]
    out["ratio_http_vs_noop_floor"] = out["step_s_datasite_http"] / out["noop_call_s_http"]
    out["ratio_direct_vs_local"] = out["step_s_direct_http"] / out["step_s_local"]
    out["ratio_http_vs_direct"] = out["step_s_datasite_http"] / out["step_s_direct_http"]
    out["crypto_share_of_direct_step"] = out["crypto_s_per_step"] / out["step_s_direct_http"]
    out = {k: round(v, 6) if isinstance(v, float) else v for k, v in out.items()}
    path = ROOT / "bench" / "results" / ("pysyft_step_quick.json" if args.quick
                                         else "pysyft_step.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    print(json.dumps(out, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()

"""Benchmark: the packed CKKS layer (he_layers) vs the anchors, each timed its own way, and an
HE-protected training step of the digits CNN vs the same step in plain.

Anchors (one training step of the first server layer: forward z = xW + b, weight gradient
dW = x^T delta, dL/dx = delta W^T; same inputs, same CKKS parameters N=8192, primes
(60, 40, 60), scale 2^40; each method runs the way its authors run it):

- ``packed``: the full he_layers level-A protocol (data owner encrypts x and the rotated
  copies of x^T; model owner forward; data owner decrypts and folds; model owner backward;
  data owner decrypts), every message serialized to bytes. One core (sealapi).
- ``ckks_tensor`` (HESplitNet, Split Ways): ``ts.ckks_tensor(x, batch=True)`` reshaped to
  ``[1, d_in]`` times W, and the weight gradient from the anchor's own separate encryption
  of x^T (``ts.ckks_tensor(x.T, batch=True)`` reshaped to ``[1, B]``, times delta), as
  ``hesplitnet/models.py`` does; serialized as sent. TenSEAL's default thread count (all
  cores), as the authors run it.
- ``per_sample``: one ``ts.ckks_vector`` per record, ``.matmul(W)`` (TenSEAL's rotations), and
  the record's weight-gradient contribution ``x_i delta[i, q]`` accumulated per output.
  Rows run until ``PER_SAMPLE_BUDGET_S`` is spent; the rest is extrapolated linearly (every
  row costs the same) and the JSON says so (``per_sample_rows_timed_*``,
  ``per_sample_extrapolated_*``). ``ckks_tensor`` always runs in full
  (``ckks_tensor_extrapolated_* = 0``).

Digits step: ``syft_split.models.digits_cnn`` cut at ``"pool2"``, fc1 (128 -> 64) encrypted,
level A, batch 32, Adam, in-process transport, one torch thread. ``protected_step_s_*``:
the model owner's ciphertext products split over two processes (``workers=2``: both
cores); ``*_one_core``: one process (``workers=1``). Blocks of plain and protected steps
alternate so all see the same machine load; medians of the blocks.
The per-step breakdown (encryption, (de)serialization, model-owner compute, decryption,
bytes, messages, round trips, key switches beside the packing's minimum) comes from the
run report's ``he`` costs. The demo's own cut (``"pool1"``, Conv2d(16, 32, 3) encrypted) is
timed the same way. ``bench/he_ecg.py`` adds the ECG epoch (``--ecg`` runs it here too).

Writes ``bench/results/he_layer.json`` (flat object of named numbers; keys it does not
produce are kept) and prints it. ``--quick``: one small shape, no ECG, to
``he_layer_quick.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tenseal as ts  # noqa: E402

from he_layers import (  # noqa: E402
    CKKSParams,
    HEClient,
    HEServer,
    KeyOwner,
    LayerSpec,
    ServerContext,
    merge_costs,
)

SHAPES = [(64, 128, 64), (64, 512, 128), (256, 512, 128)]
QUICK_SHAPES = [(16, 64, 32)]
PER_SAMPLE_BUDGET_S = 60.0


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def _data(b: int, d_in: int, d_out: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(b * 7 + d_in + d_out)
    x = rng.standard_normal((b, d_in))
    w = rng.uniform(-1, 1, (d_in, d_out)) / np.sqrt(d_in)  # (d_in, d_out): z = x w + bias
    bias = rng.uniform(-0.1, 0.1, d_out)
    delta = rng.standard_normal((b, d_out)) / b
    return x, w, bias, delta


def bench_packed(x, w, bias, delta, reps: int) -> dict[str, float]:
    b, d_in = x.shape
    d_out = w.shape[1]
    owner = KeyOwner(LayerSpec(b, d_in, d_out), CKKSParams())
    public = owner.public_context_bytes()
    context = ServerContext.from_bytes(public)
    runs: list[tuple[float, dict[str, float], dict[str, float]]] = []
    err = 0.0
    for _ in range(reps):
        client = HEClient(owner)
        server = HEServer(context, torch.from_numpy(w.T.copy()), torch.from_numpy(bias))
        t0 = time.perf_counter()
        z = server.receive_output(client.decrypt_output(server.forward(
            client.encrypt_input(torch.from_numpy(x)))))
        ret, dx = client.decrypt_gradients(server.backward(torch.from_numpy(delta)))
        gw, _ = server.receive_gradients(ret)
        elapsed = time.perf_counter() - t0
        err = max(err, _rel(z.numpy(), x @ w + bias), _rel(gw.numpy().T, x.T @ delta),
                  _rel(dx.numpy(), delta @ w.T))
        runs.append((elapsed, merge_costs(client.costs, server.costs),
                     server.costs.last_step))
    runs.sort(key=lambda r: r[0])
    elapsed, costs, ops = runs[len(runs) // 2]  # the median run, with its own phase costs
    lay = owner.layouts
    return {
        "s": elapsed, "err": err, "enc_s": costs["enc_s"], "server_s": costs["server_s"],
        "dec_s": costs["dec_s"], "ser_s": costs["client_ser_s"] + costs["server_ser_s"],
        "bytes_up": costs["bytes_up"], "bytes_down": costs["bytes_down"],
        "public_context_bytes": float(len(public)),
        "rotations": ops["rotations"], "keyswitches_min": ops["keyswitches_min"],
        "multiplications": ops["multiplications"], "encodes": ops["encodes"],
        "fwd_lanes": lay["forward"].lanes, "fwd_replicas": lay["forward"].replicas,
        "grad_lanes": lay["grad"].lanes, "grad_replicas": lay["grad"].replicas,
    }


def _ts_context(galois: bool) -> ts.Context:
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 60])
    ctx.global_scale = 2**40
    if galois:
        ctx.generate_galois_keys()
    return ctx


def bench_ckks_tensor(ctx, x, w, bias, delta) -> dict[str, float]:
    """HESplitNet's step: Enc(a) and its own Enc(a^T), both batched, serialized as sent."""
    b, d_in = x.shape
    t0 = time.perf_counter()
    enc_a = ts.ckks_tensor(ctx, x.tolist(), batch=True)       # d_in ciphertexts of B values
    enc_a.reshape_([1, d_in])
    enc_at = ts.ckks_tensor(ctx, x.T.tolist(), batch=True)    # B ciphertexts of d_in values
    enc_at.reshape_([1, b])
    up = len(enc_a.serialize()) + len(enc_at.serialize())
    t_enc = time.perf_counter() - t0
    t0 = time.perf_counter()
    y = enc_a.mm(w.tolist()) + bias.tolist()                 # server forward
    y_bytes = y.serialize()
    z = np.array(ts.ckks_tensor_from(ctx, y_bytes).decrypt().tolist()).reshape(b, -1)
    t_fwd = time.perf_counter() - t0
    t0 = time.perf_counter()
    g = enc_at.mm(delta.tolist())                            # server: Enc(dW^T), d_in in slots
    g_bytes = g.serialize()
    dw = np.array(ts.ckks_tensor_from(ctx, g_bytes).decrypt().tolist()).reshape(d_in, -1)
    dx = delta @ w.T                                         # plain, as in HESplitNet
    t_dw = time.perf_counter() - t0
    err = max(_rel(z, x @ w + bias), _rel(dw, x.T @ delta))
    return {"s": t_enc + t_fwd + t_dw, "enc_s": t_enc, "fwd_s": t_fwd, "dw_s": t_dw,
            "err": err, "bytes": float(up + len(y_bytes) + len(g_bytes) + dx.size * 8)}


def bench_per_sample(ctx, x, w, bias, delta, budget_s: float) -> dict[str, float]:
    """One CKKSVector per record; rows until the budget is spent, the rest extrapolated."""
    b = x.shape[0]
    err, nbytes, rows = 0.0, 0, 0
    acc: list[Any] | None = None
    t0 = time.perf_counter()
    while rows < b and (rows == 0 or time.perf_counter() - t0 < budget_s):
        i = rows
        v = ts.ckks_vector(ctx, x[i].tolist())
        y = v.matmul(w.tolist()).add(bias.tolist())
        nbytes += len(v.serialize()) + len(y.serialize())
        err = max(err, _rel(np.array(y.decrypt()), x[i] @ w + bias))
        contrib = [v * float(delta[i, q]) for q in range(w.shape[1])]  # x_i^T delta_i
        acc = contrib if acc is None else [a + c for a, c in zip(acc, contrib, strict=True)]
        rows += 1
    assert acc is not None
    dw = np.array([a.decrypt() for a in acc]).T
    nbytes_dw = sum(len(a.serialize()) for a in acc)
    elapsed = time.perf_counter() - t0
    err = max(err, _rel(dw, x[:rows].T @ delta[:rows]))
    return {"s": elapsed * b / rows, "err": err, "bytes": float(nbytes * b / rows + nbytes_dw),
            "rows": float(rows), "extrapolated": float(rows < b)}


def bench_anchors(shapes: list[tuple[int, int, int]], reps: int, budget_s: float
                  ) -> dict[str, float]:
    out: dict[str, float] = {"per_sample_budget_s": budget_s,
                             "tenseal_threads": float(os.cpu_count() or 1)}
    tensor_ctx, vector_ctx = _ts_context(False), _ts_context(True)
    out["tenseal_default_public_context_bytes"] = float(
        len(vector_ctx.serialize(save_secret_key=False)))
    for b, d_in, d_out in shapes:
        s = f"{b}x{d_in}x{d_out}"
        x, w, bias, delta = _data(b, d_in, d_out)
        print(f"[{s}] packed ...", flush=True)
        pk = bench_packed(x, w, bias, delta, reps)
        print(f"[{s}] ckks_tensor ...", flush=True)
        ct = bench_ckks_tensor(tensor_ctx, x, w, bias, delta)
        print(f"[{s}] per-sample ...", flush=True)
        ps = bench_per_sample(vector_ctx, x, w, bias, delta, budget_s)
        out.update({
            f"packed_s_{s}": pk["s"], f"packed_enc_s_{s}": pk["enc_s"],
            f"packed_server_s_{s}": pk["server_s"], f"packed_dec_s_{s}": pk["dec_s"],
            f"packed_ser_s_{s}": pk["ser_s"], f"max_rel_err_{s}": pk["err"],
            f"bytes_up_per_batch_{s}": pk["bytes_up"], f"bytes_down_per_batch_{s}": pk["bytes_down"],
            f"bytes_per_batch_{s}": pk["bytes_up"] + pk["bytes_down"],
            f"public_context_bytes_{s}": pk["public_context_bytes"],
            f"keyswitches_per_step_{s}": pk["rotations"],
            f"keyswitches_min_per_step_{s}": pk["keyswitches_min"],
            f"multiplications_per_step_{s}": pk["multiplications"],
            f"encodes_per_step_{s}": pk["encodes"],
            f"packed_fwd_lanes_{s}": float(pk["fwd_lanes"]),
            f"packed_fwd_replicas_{s}": float(pk["fwd_replicas"]),
            f"packed_grad_lanes_{s}": float(pk["grad_lanes"]),
            f"packed_grad_replicas_{s}": float(pk["grad_replicas"]),
            f"ckks_tensor_s_{s}": ct["s"], f"ckks_tensor_enc_s_{s}": ct["enc_s"],
            f"ckks_tensor_fwd_s_{s}": ct["fwd_s"], f"ckks_tensor_dw_s_{s}": ct["dw_s"],
            f"ckks_tensor_max_rel_err_{s}": ct["err"],
            f"ckks_tensor_bytes_per_batch_{s}": ct["bytes"],
            f"ckks_tensor_extrapolated_{s}": 0.0,
            f"per_sample_s_{s}": ps["s"], f"per_sample_rows_timed_{s}": ps["rows"],
            f"per_sample_extrapolated_{s}": ps["extrapolated"],
            f"per_sample_max_rel_err_{s}": ps["err"],
            f"per_sample_bytes_per_batch_{s}": ps["bytes"],
            f"plain_bytes_per_batch_{s}": float(4 * b * (d_out + d_out + d_in)),
            f"speedup_vs_ckks_tensor_{s}": ct["s"] / pk["s"],
            f"speedup_vs_per_sample_{s}": ps["s"] / pk["s"],
        })
    return out


# ----------------------------------------------------------------------------- digits step
#: processes of the protected digits steps (``*_one_core``: 1)
WORKERS = 2


def _digits_session(cut: str, protected: bool, parties: dict[str, Any],
                    workers: int = 1) -> Any:
    from syft_split import OptimizerSpec, SplitPlan, SplitSession, split_model
    from syft_split.deploy import inprocess
    from syft_split.he import protect
    from syft_split.models import digits_cnn

    torch.manual_seed(0)
    plan = SplitPlan.vanilla(split_model(digits_cnn(), cut), "h")
    if protected:
        shape = (16, 4, 4) if cut == "pool1" else None
        plan = protect(plan, level="A", batch_size=32, input_shape=shape, workers=workers)
    dep = inprocess(parties)
    session = SplitSession(plan, dep.transport, optimizer=OptimizerSpec("adam", lr=1e-2))
    dep.approve_all(session.propose())
    return session


#: (JSON key, cost name) of the per-step counts the bench records for a protected session
LAST_COUNTS = (
    ("keyswitches", "model_owner.h.last_rotations"),
    ("keyswitches_min", "model_owner.h.last_keyswitches_min"),
    ("multiplications", "model_owner.h.last_multiplications"),
    ("encodes", "model_owner.h.last_encodes"),
    ("rescales", "model_owner.h.last_rescales"),
    ("relinearizations", "model_owner.h.last_relinearizations"),
    ("bytes_up", "h.last_bytes_sent"),
    ("bytes_down", "h.last_bytes_received"),
)


def bench_digits_step(cut: str, blocks: int, steps: int) -> dict[str, float]:
    """Median seconds per training step, plain and protected, alternating blocks."""
    from syft_split.datasets import digits_parties

    (d,) = digits_parties(1)
    parties = {"h": {"train": (d.x_train, d.y_train), "test": (d.x_test, d.y_test)}}
    # "he": both cores (the model owner's products split over processes); "he1": one core
    sessions = {"plain": _digits_session(cut, False, parties),
                "he": _digits_session(cut, True, parties, workers=WORKERS),
                "he1": _digits_session(cut, True, parties, workers=1)}
    counter = dict.fromkeys(sessions, 0)

    def run(kind: str, n: int) -> float:
        s = sessions[kind]
        t0 = time.perf_counter()
        for _ in range(n):
            i = counter[kind]
            counter[kind] += 1
            idx = (torch.arange(32) + 32 * i) % len(d.y_train)
            s.zero_grad()
            loss, _ = s.loss("h", idx, d.y_train[idx])
            loss.backward()
            s.step()
        return (time.perf_counter() - t0) / n

    times: dict[str, list[float]] = {k: [] for k in sessions}
    for kind in sessions:
        run(kind, 3)
    warm = sessions["he"].he.costs()  # the per-step breakdown leaves out the warm-up
    for _ in range(blocks):
        for kind in sessions:
            times[kind].append(run(kind, steps * 4 if kind == "plain" else steps))
    costs = {k: v if ".last_" in k else v - warm.get(k, 0.0)
             for k, v in sessions["he"].he.costs().items()}
    one = sessions["he1"].he.costs()  # the one-core session's last step: its own counts
    n = costs["model_owner.h.steps"]
    p_s, h_s, h1_s = (statistics.median(times[k]) for k in ("plain", "he", "he1"))
    tag = "digits" if cut == "pool2" else "demo_pool1"
    out = {f"protected_step_s_{tag}": h_s, f"plain_step_s_{tag}": p_s,
           f"ratio_protected_vs_plain_{tag}": h_s / p_s,
           f"protected_step_s_{tag}_one_core": h1_s,
           f"ratio_protected_vs_plain_{tag}_one_core": h1_s / p_s,
           f"he_workers_{tag}": float(WORKERS),
           f"he_enc_s_per_step_{tag}": costs["h.enc_s"] / n,
           f"he_client_ser_s_per_step_{tag}": costs["h.ser_s"] / n,
           f"he_client_other_s_per_step_{tag}": costs["h.client_s"] / n,
           f"he_server_s_per_step_{tag}": costs["model_owner.h.server_s"] / n,
           f"he_server_ser_s_per_step_{tag}": costs["model_owner.h.ser_s"] / n,
           f"he_dec_s_per_step_{tag}": costs["h.dec_s"] / n,
           f"round_trips_per_step_{tag}": costs["model_owner.h.round_trips"] / n,
           f"step_blocks_{tag}": float(blocks)}
    # the last step's counts, of both sessions ("_one_core": one process)
    for suffix, c in (("", costs), ("_one_core", one)):
        out.update({f"{key}_per_step_{tag}{suffix}": c[name] for key, name in LAST_COUNTS})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one small shape, no ECG")
    ap.add_argument("--ecg", action="store_true", help="also run bench/he_ecg.py's epoch")
    ap.add_argument("--skip-anchors", action="store_true",
                    help="only the digits steps (and --ecg); other keys of the JSON are kept")
    args = ap.parse_args()
    torch.set_num_threads(1)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    out: dict[str, float] = {"poly_modulus_degree": 8192.0, "scale_bits": 40.0,
                             "load_average_1min_start": os.getloadavg()[0]}
    if not args.skip_anchors:
        out.update(bench_anchors(shapes, 1 if args.quick else 3,
                                 5.0 if args.quick else PER_SAMPLE_BUDGET_S))
    print("[digits pool2] ...", flush=True)
    out.update(bench_digits_step("pool2", 2 if args.quick else 5, 4 if args.quick else 10))
    if not args.quick:
        print("[digits pool1, conv] ...", flush=True)
        out.update(bench_digits_step("pool1", 3, 4))
    if args.ecg and not args.quick:
        sys.path.insert(0, str(ROOT / "bench"))
        from he_ecg import bench_ecg

        print("[ecg] ...", flush=True)
        ecg = bench_ecg()
        (ROOT / "bench" / "results" / "he_ecg.json").write_text(
            json.dumps(ecg, indent=2, sort_keys=True) + "\n")
        out.update({k: v for k, v in ecg.items() if "epoch" not in k or "per_1000" in k})
    out["load_average_1min_end"] = os.getloadavg()[0]
    path = ROOT / "bench" / "results" / ("he_layer_quick.json" if args.quick else "he_layer.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(path.read_text()) if path.exists() and not args.quick else {}
    stale = [k for k in old if k.startswith(("speedup_vs_ckks_tensor_fwd_only_", "ckks_tensor_dw_features",
                                             "per_sample_scaled_", "torch_s_"))]
    for k in stale:
        old.pop(k)
    old.update(out)
    path.write_text(json.dumps(old, indent=2, sort_keys=True) + "\n")
    print(json.dumps(old, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()

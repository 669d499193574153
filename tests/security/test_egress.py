"""What leaves a data owner, pinned on values, not field names.

A :class:`RecordingTransport` keeps the raw bytes of every response a data owner sends, over
the real transports (in process, and embedded PySyft datasites). The tests then search those
bytes for the data owner's labels and raw feature rows in every encoding a leak could use
(int64/int32/int16/uint8/float32/float64, JSON and comma-separated text) and, in the vertical
plan, for record ids in clear. Positive controls (labels released on purpose, a pass-through
segment) show that the search finds them when they do leave.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from syft_split import OptimizerSpec, SplitPlan, SplitSession, Trainer, wire
from syft_split.deploy import Deployment
from syft_split.topology import ALIGNED, RELEASED
from syft_split.transport.base import Transport, TransportWrapper

from .conftest import clinic_data, vertical_data

SGD = OptimizerSpec("sgd", lr=0.05)


class RecordingTransport(TransportWrapper):
    """Wraps a real transport; keeps (party, request fields, raw response) of every call."""

    def __init__(self, inner: Transport) -> None:
        super().__init__(inner)
        self.log: list[tuple[str, dict[str, Any], bytes]] = []

    def request(self, party: str, data: bytes) -> bytes:
        raw = self.inner.request(party, data)
        self.log.append((party, wire.decode(data), raw))
        return raw


def label_patterns(y: torch.Tensor) -> list[bytes]:
    """Byte sequences that would carry the label vector ``y``."""
    out = [y.to(dt).numpy().tobytes() for dt in (torch.int64, torch.int32, torch.int16,
                                                  torch.uint8, torch.float32, torch.float64)]
    values = [int(v) for v in y]
    out += [json.dumps(values).encode(), json.dumps(values, separators=(",", ":")).encode(),
            ",".join(map(str, values)).encode(), " ".join(map(str, values)).encode()]
    return out


def row_patterns(x: torch.Tensor) -> list[bytes]:
    """Each record's raw features as float32 and float64 bytes."""
    rows = x.reshape(x.shape[0], -1)
    return [r.to(dt).numpy().tobytes() for r in rows for dt in (torch.float32, torch.float64)]


def leaks(log: list[tuple[str, dict[str, Any], bytes]], party: str,
          patterns: list[bytes]) -> list[str]:
    """Which responses of ``party`` contain one of ``patterns`` (op and pattern index)."""
    found = []
    for p, req, raw in log:
        if p == party:
            found += [f"{req.get('op')}#{k}" for k, pat in enumerate(patterns) if pat in raw]
    return found


def _scan(log: list[tuple[str, dict[str, Any], bytes]], party: str, x: torch.Tensor,
          y: torch.Tensor | None) -> tuple[list[str], list[str]]:
    """(label leaks, row leaks) of ``party``: the labels of every batch it was asked about,
    and of the whole dataset in storage order; the rows of every batch."""
    label_hits, row_hits = [], []
    for p, req, raw in log:
        if p != party:
            continue
        idx = req.get("indices")
        batches = [idx] if isinstance(idx, torch.Tensor) and idx.numel() >= 8 else []
        pats = [q for i in batches for q in row_patterns(x[i])]
        row_hits += [str(req.get("op")) for q in pats if q in raw]
        if y is not None:
            lp = [q for i in batches for q in label_patterns(y[i])] + label_patterns(y)
            label_hits += [str(req.get("op")) for q in lp if q in raw]
    return label_hits, row_hits


# ----------------------------------------------------------------------------- helpers
def _session(dep: Deployment, plan: SplitPlan) -> tuple[SplitSession, RecordingTransport]:
    rec = RecordingTransport(dep.transport)
    session = SplitSession(plan, rec, optimizer=SGD)
    dep.approve_all(session.propose())
    return session, rec


def _encoder() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))


def _fit(session: SplitSession, labels: Any = None, **kw: Any) -> None:
    kw.setdefault("leakage_budget_s", 1.0)  # the figures leave; how good they are is not tested
    Trainer(session, batch_size=32, progress=False, labels=labels, **kw).fit(1, verbose=False)


# ---------------------------------------------------------------------------- tests
def test_vanilla_labels_and_rows_stay_at_the_data_owner(world: Deployment) -> None:
    """Labels at the model owner (it has its own copy): the clinic's labels and raw rows are
    in none of the clinic's responses (activations, metadata, proposals, leakage figures)."""
    x, y = clinic_data()
    torch.manual_seed(0)
    plan = SplitPlan.vanilla([_encoder(), nn.Sequential(nn.Flatten(), nn.Linear(64, 10))],
                             "clinic")
    session, rec = _session(world, plan)
    _fit(session, labels={"clinic": {"train": y, "test": y[:16]}})
    assert {r[1]["op"] for r in rec.log} >= {"describe", "propose", "forward", "leakage"}
    labels, rows = _scan(rec.log, "clinic", x, y)
    assert labels == [] and rows == []


def test_u_shaped_labels_and_rows_stay_at_the_data_owner(world: Deployment) -> None:
    x, y = clinic_data()
    torch.manual_seed(0)
    plan = SplitPlan.u_shaped([_encoder(), nn.Sequential(nn.Flatten(), nn.Linear(64, 12),
                                                         nn.ReLU()), nn.Linear(12, 10)],
                              "clinic")
    session, rec = _session(world, plan)
    _fit(session)
    assert {r[1]["op"] for r in rec.log} >= {"forward", "loss_step", "leakage"}
    labels, rows = _scan(rec.log, "clinic", x, y)
    assert labels == [] and rows == []


def test_vertical_ids_labels_and_rows_stay_with_their_owners(world: Deployment) -> None:
    """PSI alignment then vertical training: no record id in clear in any PSI message, no
    label of the bank (it holds them too, the plan uses the model owner's), no raw row."""
    from syft_split.alignment import align_records

    xv, yv, ids = vertical_data()
    rec = RecordingTransport(world.transport)
    for p in ("bank", "insurer"):
        world.owners[p].allow_alignment("train", rec.user)
    mo_ids = ids[::-1][:36]  # the model owner's labelled records, its own order
    rows = align_records(rec, ["bank", "insurer"], "train", mo_ids)
    order = [ids.index(mo_ids[int(r)]) for r in rows]  # aligned row j = record order[j]
    id_patterns = [i.encode() for i in ids]
    for p in ("bank", "insurer"):
        assert leaks(rec.log, p, id_patterns) == []
    torch.manual_seed(0)
    plan = SplitPlan.vertical({"bank": nn.Sequential(nn.Linear(5, 4), nn.ReLU()),
                               "insurer": nn.Sequential(nn.Linear(5, 4), nn.ReLU())},
                              nn.Linear(8, 2), datasets=["train@aligned"])
    session, rec2 = _session(world, plan)
    aligned_y = yv[order]
    _fit(session, labels={ALIGNED: {"train@aligned": aligned_y}},
         train_dataset="train@aligned", test_dataset="train@aligned", measure_leakage=False)
    log = rec.log + rec2.log
    labels, bank_rows = _scan(log, "bank", xv[order][:, :5], aligned_y)
    assert labels == [] and bank_rows == []
    assert leaks(log, "bank", label_patterns(yv)) == []
    _, insurer_rows = _scan(log, "insurer", xv[order][:, 5:], None)
    assert insurer_rows == []


def test_the_search_finds_labels_and_rows_that_do_leave(world: Deployment) -> None:
    """Positive controls on the same transports: labels released on purpose (the original
    SplitNN setting) and a segment that passes the raw rows through are both found."""
    x, y = clinic_data()
    torch.manual_seed(0)
    plan = SplitPlan.vanilla([_encoder(), nn.Sequential(nn.Flatten(), nn.Linear(64, 10))],
                             "clinic", labels=RELEASED)
    session, rec = _session(world, plan)
    _fit(session, measure_leakage=False)
    labels, rows = _scan(rec.log, "clinic", x, y)
    assert "forward" in labels and rows == []
    copy_rows = nn.Sequential(nn.Flatten(), nn.Linear(64, 64))
    with torch.no_grad():  # identity weights: the first batch leaves exactly
        copy_rows[1].weight.copy_(torch.eye(64))
        copy_rows[1].bias.zero_()
    plan = SplitPlan.vanilla([copy_rows, nn.Linear(64, 10)], "clinic")
    session, rec = _session(world, plan)
    _fit(session, labels={"clinic": {"train": y, "test": y[:16]}}, measure_leakage=False)
    labels, rows = _scan(rec.log, "clinic", x, y)
    assert labels == [] and rows.count("forward") >= 32  # the first batch, in the clear

"""Vertical and multi-task plans train exactly like the equivalent unsplit computation."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from syft_split import MODEL_OWNER, OptimizerSpec, SplitPlan, SplitSession
from syft_split.deploy import Deployment
from syft_split.topology import ALIGNED

from .conftest import DEPLOY_KINDS, deployed

OPT = {"sgd_momentum": OptimizerSpec("sgd", lr=0.05, momentum=0.9),
       "adam": OptimizerSpec("adam", lr=1e-2)}


def _breast_cancer() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x = torch.tensor(data.data, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0)
    return x, torch.tensor(data.target, dtype=torch.int64)


class VerticalReference(nn.Module):
    """One model over all columns: the computation a vertical concat plan splits."""

    def __init__(self, encoders: dict[str, nn.Module], columns: dict[str, slice],
                 head: nn.Module, merge: str) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict(encoders)
        self.columns = columns
        self.head = head
        self.merge = merge

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [enc(x[:, self.columns[p]]) for p, enc in self.encoders.items()]
        if self.merge == "concat":
            return self.head(torch.cat(parts, 1))
        stacked = torch.stack(parts)
        return self.head(stacked.sum(0) if self.merge == "sum" else stacked.mean(0))


COLUMNS = {"bank": slice(0, 10), "insurer": slice(10, 20), "shop": slice(20, 30)}


@pytest.fixture(scope="module", params=DEPLOY_KINDS)
def three_banks(request: pytest.FixtureRequest) -> Iterator[Deployment]:
    """Three vertical parties, shared by every merge and optimizer (one proposal each)."""
    x, _ = _breast_cancer()
    with deployed(request.param, {p: {"train": (x[:, c], None), "test": (x[:64, c], None)}
                                  for p, c in COLUMNS.items()}) as dep:
        yield dep


@pytest.mark.parametrize("opt_name", sorted(OPT))
@pytest.mark.parametrize("merge", ["concat", "sum", "mean"])
def test_vertical_three_parties_equals_one_model(three_banks: Deployment, merge: str,
                                                 opt_name: str) -> None:
    x, y = _breast_cancer()
    columns = COLUMNS
    torch.manual_seed(0)
    width = 6
    encoders = {p: nn.Sequential(nn.Linear(10, width), nn.ReLU()) for p in columns}
    head = nn.Linear(width * (3 if merge == "concat" else 1), 2)
    reference = VerticalReference(copy.deepcopy(encoders), columns, copy.deepcopy(head), merge)
    ref_opt = OPT[opt_name].build(reference.parameters())

    dep = three_banks
    plan = SplitPlan.vertical(encoders, head, merge=merge)
    session = SplitSession(plan, dep.transport, optimizer=OPT[opt_name])
    # on datasites, concat runs every step through PySyft, sum and mean over the direct channel
    dep.approve_all(session.propose(), channel=merge != "concat")

    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        idx = torch.randperm(len(y), generator=g)[:32]
        ref_opt.zero_grad()
        F.cross_entropy(reference(x[idx]), y[idx]).backward()
        ref_opt.step()
        session.zero_grad()
        loss, _ = session.loss(ALIGNED, idx, y[idx])
        loss.backward()
        session.step()
    session.flush()

    for i, party in enumerate(columns):
        got = dep.owners[party].export_weights(session.remote[(party, i)].segment_id)
        want = reference.encoders[party].state_dict()
        assert max(float((a - b).abs().max()) for a, b in zip(got.values(), want.values())) <= 1e-6
    got_head = session.local[3].state_dict()
    assert all(torch.allclose(a, b, atol=1e-6, rtol=0)
               for a, b in zip(got_head.values(), reference.head.state_dict().values()))
    # labels never leave the model owner, and no party sends anything but activations
    assert "labels" not in dep.transport.traffic.fields_sent_by(MODEL_OWNER)
    for party in columns:
        assert "labels" not in dep.transport.traffic.fields_sent_by(party)


def test_vertical_trainer_learns(make_deployment) -> None:
    x, y = _breast_cancer()
    cols = {"bank": slice(0, 10), "insurer": slice(10, 20), "shop": slice(20, 30)}
    train, test = torch.arange(0, 450), torch.arange(450, len(y))
    dep = make_deployment({p: {"train": (x[train][:, c], None), "test": (x[test][:, c], None)}
                           for p, c in cols.items()})
    torch.manual_seed(0)
    plan = SplitPlan.vertical({p: nn.Sequential(nn.Linear(10, 8), nn.ReLU()) for p in cols},
                              nn.Linear(24, 2))
    session = SplitSession(plan, dep.transport, optimizer=OptimizerSpec("adam", lr=1e-2))
    dep.approve_all(session.propose(), channel=True)  # datasites: the direct channel
    from syft_split import Trainer

    report = Trainer(session, batch_size=32, progress=False, measure_leakage=False,
                     labels={ALIGNED: {"train": y[train], "test": y[test]}}).fit(2, verbose=False)
    assert report.final_test_accuracy is not None and report.final_test_accuracy >= 0.9


def test_multi_task_equals_unsplit_weighted_loss(make_deployment) -> None:
    from syft_split.datasets import digits_parties

    (d,) = digits_parties(1, limit=200)
    x, y = d.x_train, d.y_train
    parity = y % 2
    torch.manual_seed(0)
    trunk = [nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                           nn.Flatten()),
             nn.Sequential(nn.Linear(64, 16), nn.ReLU())]
    heads = {"digit": nn.Linear(16, 10), "parity": nn.Linear(16, 2)}
    ref_trunk = copy.deepcopy(nn.Sequential(*trunk))
    ref_heads = copy.deepcopy(nn.ModuleDict(heads))
    params = list(ref_trunk.parameters()) + list(ref_heads.parameters())
    opt = OptimizerSpec("adam", lr=1e-2)
    ref_opt = opt.build(params)

    dep = make_deployment({"clinic": {"train": (x, y), "test": (x, y)}})
    plan = SplitPlan.multi_task(trunk, heads, "clinic", weights={"parity": 0.5})
    session = SplitSession(plan, dep.transport, optimizer=opt)
    dep.approve_all(session.propose())
    g = torch.Generator().manual_seed(3)
    for _ in range(4):
        idx = torch.randperm(len(y), generator=g)[:24]
        h = ref_trunk(x[idx])
        ref_loss = (F.cross_entropy(ref_heads["digit"](h), y[idx])
                    + 0.5 * F.cross_entropy(ref_heads["parity"](h), parity[idx]))
        ref_opt.zero_grad()
        ref_loss.backward()
        ref_opt.step()
        session.zero_grad()
        loss, m = session.loss("clinic", idx, {"digit": y[idx], "parity": parity[idx]})
        loss.backward()
        session.step()
        assert abs(float(loss.detach()) - float(ref_loss.detach())) < 1e-5
        assert set(m.per_task) == {"digit", "parity"}
    session.flush()
    got = list(dep.owners["clinic"].export_weights(session.remote[("clinic", 0)].segment_id)
               .values())
    got += [t for i in (1, 2, 3) for t in session.local[i].state_dict().values()]
    want = (list(ref_trunk.state_dict().values())
            + list(ref_heads["digit"].state_dict().values())
            + list(ref_heads["parity"].state_dict().values()))
    assert max(float((a - b).abs().max()) for a, b in zip(got, want)) <= 1e-6


def test_psi_aligns_parties_on_the_intersection_only(make_deployment) -> None:
    from syft_split.alignment import align_records

    x, y = _breast_cancer()
    ids = [f"patient-{i:04d}" for i in range(len(y))]
    g = torch.Generator().manual_seed(5)
    cols = {"bank": slice(0, 10), "insurer": slice(10, 20), "shop": slice(20, 30)}
    held = {p: sorted(torch.randperm(len(y), generator=g)[:420].tolist()) for p in cols}
    mo_rows = sorted(torch.randperm(len(y), generator=g)[:480].tolist())
    common = set(mo_rows).intersection(*map(set, held.values()))
    dep = make_deployment({p: {"train": (x[held[p]][:, c], None, [ids[r] for r in held[p]])}
                           for p, c in cols.items()})
    for p in cols:
        dep.owners[p].allow_alignment("train", dep.transport.user)
    mo_ids = [ids[r] for r in mo_rows]
    rows = align_records(dep.transport, list(cols), "train", mo_ids)
    assert sorted(mo_ids[int(r)] for r in rows) == sorted(ids[r] for r in common)
    aligned_y = y[[mo_rows[int(r)] for r in rows]]
    # every party now holds exactly the common records, in the model owner's order
    meta = {p: dep.transport.call(p, "describe")["datasets"]["train@aligned"] for p in cols}
    assert {m["records"] for m in meta.values()} == {len(common)}
    order = [mo_rows[int(r)] for r in rows]
    for p, c in cols.items():
        host_x = dep.owners[p].datasets["train@aligned"].features if hasattr(
            dep.owners[p], "datasets") else None
        if host_x is not None:  # in-process: check the rows are the same records, same order
            assert torch.equal(host_x, x[order][:, c])
    # ids never travelled in clear, and nothing but PSI messages and counts came back
    for p in cols:
        sent = dep.transport.traffic.fields_sent_by(p)
        assert sent <= {"setup", "response", "request", "records", "host", "datasets"}
    # train on the aligned records
    torch.manual_seed(0)
    plan = SplitPlan.vertical({p: nn.Sequential(nn.Linear(10, 8), nn.ReLU()) for p in cols},
                              nn.Linear(24, 2), datasets=["train@aligned"])
    session = SplitSession(plan, dep.transport, optimizer=OptimizerSpec("adam", lr=1e-2))
    dep.approve_all(session.propose(), channel=True)  # datasites: the direct channel
    from syft_split import Trainer

    report = Trainer(session, batch_size=32, progress=False, train_dataset="train@aligned",
                     test_dataset="train@aligned", measure_leakage=False,
                     labels={ALIGNED: {"train@aligned": aligned_y}}).fit(2, verbose=False)
    assert report.final_test_accuracy is not None and report.final_test_accuracy >= 0.9


def test_psi_needs_the_owners_permission(make_deployment) -> None:
    from syft_split import AccessError
    from syft_split.alignment import align_records

    x = torch.randn(5, 3)
    dep = make_deployment({"bank": {"train": (x, None, list(range(5)))}})
    with pytest.raises(AccessError, match="may not align"):
        align_records(dep.transport, ["bank"], "train", [1, 2, 3])


def test_a_revoked_alignment_permission_refuses_psi(make_deployment) -> None:
    """The data owner withdraws one permission (dataset, user): that user's PSI ops on that
    dataset are refused from then on; the aligned dataset it made stays."""
    from syft_split import AccessError, ConfigError
    from syft_split.alignment import align_records

    x = torch.randn(5, 3)
    dep = make_deployment({"bank": {"train": (x, None, list(range(5)))}})
    bank, user = dep.owners["bank"], dep.transport.user
    bank.allow_alignment("train", user)
    assert align_records(dep.transport, ["bank"], "train", [1, 2, 3]).tolist() == [0, 1, 2]
    out = bank.revoke_alignment("train", user)
    assert out["dataset"] == "train" and out["aligned"] == ["train@aligned"]
    with pytest.raises(AccessError, match="may not align"):
        align_records(dep.transport, ["bank"], "train", [1, 2, 3], as_name="again")
    with pytest.raises(AccessError, match="may not align"):
        dep.transport.call("bank", "psi_request", dataset="train")
    assert "train@aligned" in dep.transport.call("bank", "describe")["datasets"]
    with pytest.raises(ConfigError, match="nothing to revoke"):
        bank.revoke_alignment("train", user)


def test_multi_task_heads_sharing_a_layer_step_it_once(make_deployment) -> None:
    """Two model-owner heads holding the same layer: the split steps it once per step, like
    the unsplit model (a duplicated parameter list stepped it twice)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 16, generator=g), torch.randint(0, 10, (64,), generator=g)
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(16, 8), nn.ReLU())
    shared = nn.Linear(8, 8)
    heads = {"a": nn.Sequential(shared, nn.ReLU(), nn.Linear(8, 10)),
             "b": nn.Sequential(shared, nn.ReLU(), nn.Linear(8, 10))}
    ref = copy.deepcopy(nn.ModuleDict({"trunk": trunk, **heads}))  # keeps the sharing
    assert ref["a"][0] is ref["b"][0]
    opt = OptimizerSpec("sgd", lr=0.1, momentum=0.9)
    ref_opt = opt.build(ref.parameters())
    dep = make_deployment({"clinic": {"train": (x, y), "test": (x, y)}})
    session = SplitSession(SplitPlan.multi_task([trunk], heads, "clinic"), dep.transport,
                           optimizer=opt)
    dep.approve_all(session.propose())
    for step in range(3):
        idx = torch.arange(step * 16, step * 16 + 32)
        h = ref["trunk"](x[idx])
        ref_loss = F.cross_entropy(ref["a"](h), y[idx]) + F.cross_entropy(ref["b"](h), y[idx])
        ref_opt.zero_grad()
        ref_loss.backward()
        ref_opt.step()
        session.zero_grad()
        loss, _ = session.loss("clinic", idx, {"a": y[idx], "b": y[idx]})
        loss.backward()
        session.step()
    assert torch.equal(session.local[1][0].weight, ref["a"][0].weight)
    for name in ("a", "b"):
        got = session.local[1 if name == "a" else 2].state_dict()
        assert all(torch.equal(got[k], v) for k, v in ref[name].state_dict().items())

"""What a data owner saves after each op, so a crash right after it loses nothing the model
owner was told: a ``train=False`` field only skips saving on ops that evaluate (forward, loss
step); sealed-weight and secure-aggregation ops save the segment's weights with the round."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from syft_split import DataOwnerHost, InProcessTransport, SplitPlan, SplitSession, secagg, wire
from syft_split.deployment import Deployment
from syft_split.errors import ProtocolError
from syft_split.spec import module_to_spec, spec_state

NAMES = ["a", "b", "c"]
USER = "model-owner@example.org"
_g = torch.Generator().manual_seed(0)
DATA = {n: (torch.randn(20, 1, 4, 4, generator=_g), torch.randint(0, 3, (20,), generator=_g))
        for n in NAMES}


def _host(name: str, root: Path, **kw: Any) -> DataOwnerHost:
    """A data owner as it (re)starts from ``root/name`` (no clean shutdown before: a crash)."""
    host = DataOwnerHost(name, state_dir=root / name, **kw)
    host.add_dataset("train", *DATA[name])
    host.restore_state()
    return host


def _peers(root: Path, **kw: Any) -> tuple[Deployment, InProcessTransport, dict[str, str]]:
    """Three data owners, trusted peers, one peer-shared input segment each."""
    hosts = {n: _host(n, root, **kw) for n in NAMES}
    t = InProcessTransport(list(hosts.values()), user=USER)
    dep = Deployment(t, hosts)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.ReLU(), nn.Linear(6, 3))
    plan = SplitPlan.vanilla([copy.deepcopy(model[:2]), copy.deepcopy(model[2:])], NAMES,
                             share_weights="peer", datasets=["train"])
    s = SplitSession(plan, t)
    dep.approve_all(s.propose())
    dep.trust_each_other()
    return dep, t, {n: s.remote[(n, 0)].segment_id for n in NAMES}


def _train_step(t: InProcessTransport, party: str, seg: str, seed: int) -> None:
    act = t.call(party, "forward", segment=seg, indices=torch.arange(8),
                 dataset="train")["activation"]
    t.call(party, "backward", segment=seg,
           grad=torch.randn(act.shape, generator=torch.Generator().manual_seed(seed)))


def _flat(host: DataOwnerHost, seg: str) -> Any:
    st = host.export_weights(seg)
    return secagg.flatten(st, [k for k, v in st.items() if v.is_floating_point()])


def _others(hosts: dict[str, DataOwnerHost]) -> InProcessTransport:
    return InProcessTransport(list(hosts.values()), user=USER)


def test_train_false_does_not_stop_a_contribution_being_saved(tmp_path: Path) -> None:
    """Otherwise a restarted member contributes to the same round over new weights: the
    same masks twice, and another member recovers its update exactly."""
    dep, t, segs = _peers(tmp_path)
    desc = dict(label="node0", round=1, members=segs, weights={n: 1.0 for n in NAMES})
    t.call("a", "secagg_contribute", segment=segs["a"], train=False, **desc)
    a2 = _host("a", tmp_path)  # a crashes and restarts
    t2 = _others({**dep.owners, "a": a2})
    assert t2.call("a", "secagg_round", segment=segs["a"])["pending"] == 1
    _train_step(t2, "a", segs["a"], seed=1)
    with pytest.raises(ProtocolError, match="another description or other weights"):
        t2.call("a", "secagg_contribute", segment=segs["a"], **desc)


def test_train_false_does_not_stop_a_loaded_relay_being_saved(tmp_path: Path) -> None:
    """Otherwise a restarted member loads the same sealed weights again (a rollback)."""
    dep, t, segs = _peers(tmp_path)
    sealed = t.call("a", "seal", segment=segs["a"], peer="b", to_segment=segs["b"])["sealed"]
    t.call("b", "unseal", segment=segs["b"], sender="a", sealed=sealed, train=False)
    _train_step(t, "b", segs["b"], seed=3)
    b2 = _host("b", tmp_path)
    t2 = _others({**dep.owners, "b": b2})
    before = _flat(b2, segs["b"])
    with pytest.raises(ProtocolError, match="a replay is refused"):
        t2.call("b", "unseal", segment=segs["b"], sender="a", sealed=sealed)
    assert (_flat(b2, segs["b"]) == before).all()


def test_train_false_on_backward_still_saves_the_step(tmp_path: Path) -> None:
    host = DataOwnerHost("m", state_dir=tmp_path / "m")
    module = nn.Sequential(nn.Linear(4, 4))
    req = {"op": "propose", "role": "middle", "datasets": [], "input_shape": [4],
           "spec": module_to_spec(module), "optimizer": {"name": "sgd", "lr": 0.1},
           **{f"state/{k}": v for k, v in spec_state(module).items()}}
    pid = wire.decode(host.handle(USER, wire.encode(req)))["segment"]
    host.approve(pid)

    def call(h: DataOwnerHost, **fields: Any) -> dict[str, Any]:
        return dict(wire.decode(h.handle(USER, wire.encode(fields))))

    call(host, op="forward", segment=pid, x=torch.randn(4, 4), step=1)
    assert call(host, op="backward", segment=pid, grad=torch.ones(4, 4), step=2,
                train=False)["steps"] == 1
    trained = host.export_weights(pid)
    again = DataOwnerHost("m", state_dir=tmp_path / "m")  # a crash, then a restart
    again.restore_state()
    assert again.runtimes[pid].steps == 1 and again.runtimes[pid].last_step == 2
    assert all(torch.equal(trained[k], v) for k, v in again.export_weights(pid).items())


@pytest.mark.parametrize("op", ["secagg_aggregate", "unseal"])
def test_weights_a_family_op_loaded_are_saved_with_it_whatever_checkpoint_every(
        tmp_path: Path, op: str) -> None:
    """checkpoint_every=10: a round (or relay) recorded as loaded on disk comes with the weights
    it loaded, not the ones before it."""
    dep, t, segs = _peers(tmp_path, checkpoint_every=10)
    for n in NAMES:  # the copies differ
        _train_step(t, n, segs[n], seed=ord(n))
    if op == "secagg_aggregate":
        w = {n: 1.0 for n in NAMES}
        sealed = {n: t.call(n, "secagg_contribute", segment=segs[n], label="node0", round=1,
                            members=segs, weights=w) for n in NAMES}
        for n in NAMES:
            t.call(n, "secagg_aggregate", segment=segs[n], round=1,
                   **{f"sealed/{o}": sealed[o][f"sealed/{n}"] for o in NAMES if o != n})
    else:
        relay = t.call("b", "seal", segment=segs["b"], peer="a", to_segment=segs["a"])
        t.call("a", "unseal", segment=segs["a"], sender="b", sealed=relay["sealed"])
    loaded = _flat(dep.owners["a"], segs["a"])
    a2 = _host("a", tmp_path, checkpoint_every=10)  # a crashes right after loading
    assert (_flat(a2, segs["a"]) == loaded).all()
    if op == "secagg_aggregate":
        t2 = _others({**dep.owners, "a": a2})
        assert t2.call("a", "secagg_round", segment=segs["a"])["aggregated"] == 1

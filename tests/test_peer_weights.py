"""What a segment that shares weights with peer data owners never gives the model owner:
another member's weights, through an average it chose or a relay (found in review), and
what such a segment never loads: weights past the data owner's bound."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from syft_split import (
    AccessError,
    ConfigError,
    SplitSession,
    ValidationError,
    secagg,
    wire,
)
from syft_split.host.weights import fingerprint
from syft_split.schedules import SecureAverage, relay_weights

NAMES = ["a", "b", "c"]


@pytest.fixture
def peers(three_peers):
    """Three data owners, one shared (peer) input segment each, trained differently
    (conftest's ``three_peers``), by segment id."""
    dep, session, segs = three_peers
    return dep, session, {n: s.segment_id for n, s in segs.items()}


def _flat(dep, name: str, seg: str) -> np.ndarray:
    state = dep.owners[name].export_weights(seg)
    return secagg.flatten(state, [k for k, v in state.items() if v.is_floating_point()])


def test_an_average_of_one_member_never_reaches_the_model_owner(peers) -> None:
    """Averaging weights {a: 1, b: 0, c: 0} load a's exact weights at b and c (what SplitFed
    needs when only a had a batch); b's data owner then releasing its own segment would hand
    a's weights to the model owner, though a released nothing: refused, nothing exported."""
    dep, session, segs = peers
    want = _flat(dep, "a", segs["a"])
    SecureAverage(session)(NAMES, [1.0, 0.0, 0.0])
    assert np.abs(_flat(dep, "b", segs["b"]) - want).max() <= 1e-6  # b holds a's weights
    with pytest.raises(ConfigError, match="never released"):
        dep.owners["b"].release_weights(segs["b"])
    assert not dep.owners["b"].runtimes[segs["b"]].extra.get("weights_released")
    with pytest.raises(AccessError, match="never exported"):
        dep.transport.call("b", "export", segment=segs["b"])


def test_a_segment_holding_peer_weights_is_never_released(peers) -> None:
    """b's data owner releasing its own segment would hand the model owner what b loaded
    from its peers (a relayed copy of a's weights; an average): refused at approval, as an
    owner op, and the export refuses a flag set before (e.g. in a saved state)."""
    dep, session, segs = peers
    relay_weights(session, "a", "b")  # b now holds a's exact weights
    assert np.array_equal(_flat(dep, "b", segs["b"]), _flat(dep, "a", segs["a"]))
    for n in NAMES:
        assert "release_weights is refused" in dep.owners[n].review(segs[n])
        with pytest.raises(ConfigError, match="never released"):
            dep.owners[n].release_weights(segs[n])
        with pytest.raises(AccessError, match="never exported"):
            dep.transport.call(n, "export", segment=segs[n])
    dep.owners["b"].runtimes[segs["b"]].extra["weights_released"] = True  # an old grant
    with pytest.raises(AccessError, match="never exported"):
        dep.transport.call("b", "export", segment=segs["b"])
    again = SplitSession(session.plan, dep.transport).propose()
    with pytest.raises(ConfigError, match="never released"):
        dep.owners["c"].approve(again["c"][0], release_weights=True)
    assert dep.owners["c"].proposal(again["c"][0]).status == "pending"  # nothing approved


def _forged_for_a(dep, segs, value: float) -> bytes:
    """b's contribution to round 1, crafted for a alone: b masks weights of ``value`` (with
    its own pairwise keys, so the masks still cancel) instead of its own."""
    b = dep.owners["b"].families["weights"]
    pending = b.pending[segs["b"]]
    q = secagg.encode(np.full(len(pending["own"]) // 8, value), 1.0, 3)
    masked = secagg.mask(q, "b", {p: bytes(b._box(p).shared_key()) for p in ("a", "c")},
                         secagg.canonical(pending["descriptor"]))
    return bytes(b._box("a").encrypt(wire.encode({
        "kind": "secagg", "sender": "b", "recipient": "a",
        "descriptor": pending["descriptor"], "masked": masked.tobytes()})))


def test_peer_weights_past_the_bound_are_never_loaded(peers) -> None:
    """A member's crafted contribution (or relay) would load weights of 1e8 at a, past a's
    bound of 1e6: refused before anything changes; a genuine contribution still loads."""
    dep, _, segs = peers
    t, host_a = dep.transport, dep.owners["a"]
    assert host_a.limits.max_abs_value == 1e6
    before = _flat(dep, "a", segs["a"])
    w = {n: 1.0 for n in NAMES}
    sealed = {n: t.call(n, "secagg_contribute", segment=segs[n], label="node0", round=1,
                        members=segs, weights=w) for n in NAMES}
    with pytest.raises(ValidationError, match="exceeds the data owner's bound"):
        t.call("a", "secagg_aggregate", segment=segs["a"], round=1,
               **{"sealed/b": _forged_for_a(dep, segs, 1e8), "sealed/c": sealed["c"]["sealed/a"]})
    assert np.array_equal(_flat(dep, "a", segs["a"]), before)
    t.call("a", "secagg_aggregate", segment=segs["a"], round=1,
           **{f"sealed/{o}": sealed[o]["sealed/a"] for o in ("b", "c")})
    assert float(np.abs(_flat(dep, "a", segs["a"])).max()) < 10.0  # the honest average

    # a relay of b's crafted weights: the same refusal, nothing loaded
    b = dep.owners["b"].families["weights"]
    state = {k: torch.full_like(v, 1e8) for k, v in dep.owners["b"].export_weights(
        segs["b"]).items()}
    plain = wire.encode({"kind": "relay", "sender": "b", "from_segment": segs["b"],
                         "recipient": "c", "to_segment": segs["c"], "seq": 1,
                         "fingerprint": fingerprint(dep.owners["c"].runtimes[segs["c"]]),
                         **{f"state/{k}": v for k, v in state.items()}})
    before_c = _flat(dep, "c", segs["c"])
    with pytest.raises(ValidationError, match="exceeds the data owner's bound"):
        t.call("c", "unseal", segment=segs["c"], sender="b",
               sealed=bytes(b._box("c").encrypt(plain)))
    assert np.array_equal(_flat(dep, "c", segs["c"]), before_c)


def test_input_weights_never_load_into_a_segment_of_another_role() -> None:
    """a's input segment and b's middle segment of the same spec, both shared with peers
    (found in review): averaging would load a's input weights at b, whose
    forward of the identity reads them back (and from them a record). The fingerprint binds
    the role and input shape: the contribution and the relay are refused, nothing loaded."""
    from torch import nn

    from syft_split import DataOwnerHost, InProcessTransport, ProtocolError
    from syft_split.spec import module_to_spec, spec_state

    a, b = DataOwnerHost("a"), DataOwnerHost("b")
    a.add_dataset("train", torch.randn(16, 6), torch.randint(0, 2, (16,)))
    t = InProcessTransport([a, b])
    m = nn.Linear(6, 4)
    common = dict(spec=module_to_spec(m), optimizer={"name": "sgd", "lr": 0.5},
                  share_weights="peer", **{f"state/{k}": v for k, v in spec_state(m).items()})
    pa = t.call("a", "propose", role="input", datasets=["train"], **common)["segment"]
    pb = t.call("b", "propose", role="middle", datasets=[], input_shape=[6], **common)["segment"]
    a.approve(pa)
    b.approve(pb)
    a.trust_peer("b", b.public_key())
    b.trust_peer("a", a.public_key())
    t.call("a", "forward", segment=pa, indices=torch.tensor([7]))
    t.call("a", "backward", segment=pa, grad=torch.ones(1, 4))  # a's weights now hold record 7
    before = {k: v.clone() for k, v in b.export_weights(pb).items()}
    members, w = {"a": pa, "b": pb}, {"a": 1.0, "b": 1.0}
    ca = t.call("a", "secagg_contribute", segment=pa, label="r", round=1, members=members,
                weights=w)
    t.call("b", "secagg_contribute", segment=pb, label="r", round=1, members=members, weights=w)
    with pytest.raises(ProtocolError, match="not for round 1"):
        t.call("b", "secagg_aggregate", segment=pb, round=1, **{"sealed/a": ca["sealed/b"]})
    sealed = t.call("a", "seal", segment=pa, peer="b", to_segment=pb)
    with pytest.raises(ProtocolError, match="not for"):
        t.call("b", "unseal", segment=pb, **sealed)
    after = b.export_weights(pb)
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing of a's loaded


def test_weights_loaded_from_peers_are_held_to_the_watch_bound() -> None:
    """b and c approved a blind (rank-1) segment with a leakage bound; their trusted peer a
    the same spec with invertible weights (found in review). Loading a's weights, averaged
    with a at b or relayed to c, would let evaluation forwards release every record with
    no step for the watch to look at: the watch measures them at once, the load is refused
    (own weights kept) and the segment halted."""
    from torch import nn

    from syft_split import (
        DataOwnerHost,
        InProcessTransport,
        LeakageHaltError,
    )
    from syft_split.spec import module_to_spec, spec_state

    hosts = {n: DataOwnerHost(n) for n in NAMES}
    for h in hosts.values():
        h.add_dataset("train", torch.randn(256, 8), torch.randint(0, 2, (256,)))
    t = InProcessTransport(list(hosts.values()))
    blind = torch.zeros(16, 8)
    blind[0, 0] = 1.0
    pid = {}
    for n, w in (("a", torch.cat([torch.eye(8), -torch.eye(8)])), ("b", blind), ("c", blind)):
        m = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        with torch.no_grad():
            m[0].weight.copy_(w)
            m[0].bias.zero_()
        pid[n] = t.call(n, "propose", role="input", datasets=["train"], spec=module_to_spec(m),
                        optimizer={"name": "sgd", "lr": 0.1}, share_weights="peer",
                        **{f"state/{k}": v for k, v in spec_state(m).items()})["segment"]
    hosts["a"].approve(pid["a"])
    for n in "bc":
        hosts[n].approve(pid[n], leakage_bound={"relative": 0.5})
    for n in NAMES:
        for o in NAMES:
            if o != n:
                hosts[n].trust_peer(o, hosts[o].public_key())
    own = {n: {k: v.clone() for k, v in hosts[n].export_weights(pid[n]).items()} for n in "bc"}
    members, w = {"a": pid["a"], "b": pid["b"]}, {"a": 1.0, "b": 1.0}
    c = {n: t.call(n, "secagg_contribute", segment=pid[n], label="r", round=1, members=members,
                   weights=w) for n in "ab"}
    with pytest.raises(LeakageHaltError, match="loaded from peers: inversion ratio"):
        t.call("b", "secagg_aggregate", segment=pid["b"], round=1,
               **{"sealed/a": c["a"]["sealed/b"]})
    sealed = t.call("a", "seal", segment=pid["a"], peer="c", to_segment=pid["c"])
    with pytest.raises(LeakageHaltError, match="loaded from peers"):
        t.call("c", "unseal", segment=pid["c"], **sealed)
    for n in "bc":
        assert hosts[n].proposal(pid[n]).status == "halted"
        now = hosts[n].export_weights(pid[n])
        assert all(torch.equal(now[k], own[n][k]) for k in now)  # a's weights not kept
        with pytest.raises(LeakageHaltError):
            t.call(n, "forward", segment=pid[n], indices=torch.arange(4), train=False)


def test_a_data_owner_can_require_that_no_single_peer_reads_its_weights(peers) -> None:
    """Two members, or a member of negligible weight, let one trusted peer read a's weights
    out of the average (one malicious peer sufficed; found in review), and a relay hands them
    over whole. HostLimits.min_cohort=3 at a refuses all three; an even 3-member round runs."""
    from dataclasses import replace

    from syft_split import ProtocolError

    dep, session, segs = peers
    t, host_a = dep.transport, dep.owners["a"]
    host_a.limits = replace(host_a.limits, min_cohort=3)
    with pytest.raises(ProtocolError, match="at least 3 members"):
        t.call("a", "secagg_contribute", segment=segs["a"], label="node0", round=1,
               members={"a": segs["a"], "b": segs["b"]}, weights={"a": 1.0, "b": 1.0})
    with pytest.raises(ProtocolError, match="a tenth of the largest"):
        t.call("a", "secagg_contribute", segment=segs["a"], label="node0", round=1,
               members=segs, weights={"a": 1.0, "b": 1.0, "c": 0.01})
    with pytest.raises(AccessError, match="never relays"):
        t.call("a", "seal", segment=segs["a"], peer="b", to_segment=segs["b"])
    assert t.call("a", "secagg_round", segment=segs["a"])["round"] == 0  # nothing spent
    SecureAverage(session)(NAMES, [1.0, 1.0, 2.0])
    assert np.abs(_flat(dep, "a", segs["a"]) - _flat(dep, "b", segs["b"])).max() <= 1e-6

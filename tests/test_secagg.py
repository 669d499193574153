"""Secure aggregation: the pure arithmetic (syft_split.secagg) and the data owners' protocol
(syft_split.host.aggregation) on in-process hosts, including what a model owner that relays the
contributions may try: forge, replay, redirect, drop, or split the cohort's view of a round."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from syft_split import (
    AccessError,
    ProtocolError,
    TransportError,
    ValidationError,
    WireError,
    secagg,
    wire,
)
from syft_split.deploy import inprocess
from syft_split.schedules import SecureAverage, relay_weights, weighted_mean

NAMES = ["a", "b", "c"]


# ------------------------------------------------------------------ the arithmetic
def _keys(names: list[str]) -> dict[tuple[str, str], bytes]:
    g = np.random.default_rng(0)
    return {tuple(sorted((p, q))): g.bytes(32) for p in names for q in names if p < q}  # type: ignore[misc]


def _masked(vectors: dict[str, np.ndarray], fractions: dict[str, float], context: bytes
            ) -> dict[str, np.ndarray]:
    keys = _keys(list(vectors))
    out = {}
    for me, v in vectors.items():
        q = secagg.encode(v, fractions[me], len(vectors))
        pair = {p: keys[tuple(sorted((me, p)))] for p in vectors if p != me}  # type: ignore[index]
        out[me] = secagg.mask(q, me, pair, context)
    return out


def test_masks_cancel_and_the_sum_is_the_weighted_average() -> None:
    g = np.random.default_rng(1)
    vectors = {n: g.normal(size=1000) * 3 for n in NAMES}
    weights = {"a": 18.0, "b": 18.0, "c": 7.0}
    fractions = {n: w / sum(weights.values()) for n, w in weights.items()}
    masked = _masked(vectors, fractions, b"round 1")
    average = secagg.decode(secagg.total(masked.values()))
    want = sum(fractions[n] * vectors[n] for n in NAMES)
    assert np.abs(average - want).max() <= len(NAMES) * 2.0**-32
    for n in NAMES:  # one contribution alone is uniform noise, far from the scaled weights
        q = secagg.encode(vectors[n], fractions[n], 3).view(np.int64)
        y = masked[n].view(np.int64)
        assert np.abs(y.astype(np.float64)).mean() > 2.0**60
        assert not np.any(y == q)
        # the top bit of a uniform word is a fair coin
        assert 0.4 < float((masked[n] >> np.uint64(63)).mean()) < 0.6


def test_masks_bind_to_the_round_and_pair() -> None:
    key = b"k" * 32
    m1 = secagg.pair_mask(key, b"round 1", 64)
    assert np.array_equal(m1, secagg.pair_mask(key, b"round 1", 64))  # both ends agree
    assert not np.any(m1 == secagg.pair_mask(key, b"round 2", 64))
    assert not np.any(m1 == secagg.pair_mask(b"j" * 32, b"round 1", 64))
    # masks from another round do not cancel: the sum is garbage, not the average
    v = {n: np.ones(16) for n in NAMES}
    f = {n: 1 / 3 for n in NAMES}
    mixed = {**_masked(v, f, b"round 1"), "c": _masked(v, f, b"round 2")["c"]}
    assert np.abs(secagg.decode(secagg.total(mixed.values())) - 1).max() > 1e3


def test_encode_refuses_what_it_cannot_represent() -> None:
    with pytest.raises(ValidationError, match="too large"):
        secagg.encode(np.array([3e9]), 1.0, 2)
    with pytest.raises(ValidationError, match="not finite"):
        secagg.encode(np.array([np.nan]), 0.5, 2)
    with pytest.raises(ValidationError, match="fraction"):
        secagg.encode(np.array([1.0]), 1.5, 2)
    big = secagg.encode(np.array([-1e8, 1e8]), 1.0, 2)  # signed values round-trip
    assert np.array_equal(secagg.decode(big), np.array([-1e8, 1e8]))


# ---------------------------------------------------------- the protocol on hosts
def _segment() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.ReLU(), nn.Linear(6, 3))


def _weights(dep, segs) -> dict[str, dict[str, torch.Tensor]]:
    return {n: dep.owners[n].export_weights(s.segment_id) for n, s in segs.items()}


def _round(segs, rnd: int, w: dict[str, float], members: list[str] | None = None):
    members = members or list(segs)
    ids = {n: segs[n].segment_id for n in members}
    return {n: segs[n].secagg_contribute("node0", rnd, ids, {m: w[m] for m in members})
            for n in members}


def test_secure_average_equals_plain_average(three_peers) -> None:
    dep, session, segs = three_peers
    before = _weights(dep, segs)
    w = {"a": 8.0, "b": 8.0, "c": 4.0}
    assert len({float(b["1.weight"].sum()) for b in before.values()}) == 3  # they differ
    dep.transport.traffic.clear()
    SecureAverage(session)(NAMES, [w[n] for n in NAMES])
    want = weighted_mean([before[n] for n in NAMES], [w[n] for n in NAMES])
    for after in _weights(dep, segs).values():
        assert max(float((after[k] - want[k]).abs().max()) for k in want) <= 1e-6
    # what the data owners sent: sealed contributions, round numbers and steps, no weight value
    raw = [v for r in dep.transport.traffic.records if r.src != "model_owner" for v in r.fields]
    assert {f for f in raw if not f.startswith("sealed/")} <= {
        "round", "pending", "aggregated", "steps", "min_cohort"}  # round numbers, the policy


def _assert_unchanged(dep, segs, before) -> None:
    for n, w in _weights(dep, segs).items():
        assert all(torch.equal(w[k], before[n][k]) for k in w)


def test_missing_member_aborts_the_round_and_the_next_round_works(three_peers) -> None:
    dep, _, segs = three_peers
    before = _weights(dep, segs)
    w = {n: 1.0 for n in NAMES}
    sealed = _round(segs, 1, w)
    with pytest.raises(ProtocolError, match="aborts"):
        segs["a"].secagg_aggregate(1, {"b": sealed["b"]["a"]})  # c dropped out
    _assert_unchanged(dep, segs, before)
    # round 1 asked again exactly as before (a lost answer) gets the same contribution; asked
    # with another description it is refused: its masks never hide a second value
    _round(segs, 1, w)
    with pytest.raises(ProtocolError, match="another description"):
        _round(segs, 1, {n: 2.0 if n == "a" else 1.0 for n in NAMES})
    sealed = _round(segs, 2, w)
    for n in NAMES:
        segs[n].secagg_aggregate(2, {o: sealed[o][n] for o in NAMES if o != n})
    after = _weights(dep, segs)
    assert all(torch.allclose(after["a"][k], after["c"][k], atol=1e-7) for k in after["a"])


def test_a_member_that_fails_to_contribute_is_left_out_and_the_others_average(three_peers) -> None:
    """The round runs again among the survivors under a new round number (fresh masks)."""
    dep, session, segs = three_peers
    before = _weights(dep, segs)
    w = {"a": 8.0, "b": 4.0, "c": 4.0}
    calls: list[list[str]] = []

    def each(keys, fn):  # c is unreachable once the round number is known
        calls.append(list(keys))
        results, errors = {}, {}
        for k in keys:
            if k == "c" and len(calls) > 1:
                errors[k] = TransportError("c is down")
            else:
                results[k] = fn(k)
        return results, errors

    avg = SecureAverage(session)
    failed = avg(NAMES, [w[n] for n in NAMES], each=each)
    assert list(failed) == ["c"]
    # round number, contribute (c fails), then the survivors' contribute, check and aggregate
    assert calls == [NAMES, NAMES, ["a", "b"], ["a", "b"], ["a", "b"]]
    want = weighted_mean([before["a"], before["b"]], [w["a"], w["b"]])
    after = _weights(dep, segs)
    for n in ("a", "b"):
        assert max(float((after[n][k] - want[k]).abs().max()) for k in want) <= 1e-6
    _assert_unchanged(dep, {"c": segs["c"]}, {"c": before["c"]})
    assert segs["a"].secagg_round() == avg.round == segs["c"].secagg_round() + 2
    # with one survivor there is nothing to average: the round stops, nothing more is loaded
    mid = _weights(dep, segs)
    failed = avg(["a", "c"], [1.0, 1.0], each=each)
    assert list(failed) == ["c"] and calls[5:] == [["a", "c"]]
    _assert_unchanged(dep, segs, mid)


def test_a_loaded_round_is_served_again_only_as_it_was(three_peers) -> None:
    """A member that loaded round r serves the same contribution again (to finish r for a
    member that did not load it), only for exactly the same description; its weights stay."""
    dep, _, segs = three_peers
    w = {n: 1.0 for n in NAMES}
    sealed = _round(segs, 1, w)
    segs["a"].secagg_aggregate(1, {o: sealed[o]["a"] for o in NAMES if o != "a"})
    after_a = _weights(dep, {"a": segs["a"]})
    assert segs["a"].secagg_status() == {"round": 1, "pending": 0, "aggregated": 1, "min_cohort": 2}
    assert segs["b"].secagg_status() == {"round": 1, "pending": 1, "aggregated": 0, "min_cohort": 2}
    again = _round(segs, 1, w)  # a model owner finishing round 1
    # every sealed message opens to the same masked vector as before (fresh nonces)
    for n in NAMES:
        for o in NAMES:
            if o != n:
                assert _opened(dep, n, o, sealed[n][o]) == _opened(dep, n, o, again[n][o])
    with pytest.raises(ProtocolError, match="another description"):
        segs["a"].secagg_contribute("node0", 1, {n: segs[n].segment_id for n in NAMES},
                                    {n: 2.0 if n == "a" else 1.0 for n in NAMES})
    for n in ("b", "c"):
        segs[n].secagg_aggregate(1, {o: again[o][n] for o in NAMES if o != n})
    _assert_unchanged(dep, {"a": segs["a"]}, after_a)
    final = _weights(dep, segs)
    assert all(torch.equal(final["a"][k], final[n][k]) for n in ("b", "c") for k in final["a"])


def _opened(dep, sender: str, recipient: str, sealed: bytes) -> bytes:
    """The masked vector ``sender`` sealed for ``recipient`` (opened with the recipient's key)."""
    from nacl.public import Box, PrivateKey, PublicKey

    fam = dep.owners[recipient].families["weights"]
    box = Box(PrivateKey(fam.secret_key), PublicKey(fam.peers[sender]))
    return bytes(wire.decode(box.decrypt(sealed))["masked"])


def test_model_owner_cannot_forge_replay_or_redirect_contributions(three_peers) -> None:
    from nacl.public import Box, PrivateKey, PublicKey

    from syft_split import wire

    dep, _, segs = three_peers
    before = _weights(dep, segs)
    w = {n: 1.0 for n in NAMES}
    old = _round(segs, 1, w)
    sealed = _round(segs, 2, w)
    # replay: round 1's contributions into round 2
    with pytest.raises(ProtocolError, match="not for round 2"):
        segs["a"].secagg_aggregate(2, {"b": old["b"]["a"], "c": sealed["c"]["a"]})
    # redirect: the contribution b sealed for c, handed to a
    with pytest.raises(WireError, match="does not authenticate"):
        segs["a"].secagg_aggregate(2, {"b": sealed["b"]["c"], "c": sealed["c"]["a"]})
    # forge: the model owner's own key, claiming to be b, with a round-2 descriptor and
    # "masked" values chosen to install selection weights
    mallory = PrivateKey.generate()
    desc = {"v": 1, "label": "node0", "round": 2,
            "members": {n: segs[n].segment_id for n in NAMES}, "weights": w, "fingerprint": "x"}
    fake = wire.encode({"kind": "secagg", "sender": "b", "recipient": "a", "descriptor": desc,
                        "masked": b"\x00" * len(sealed["b"]["a"])})
    forged = bytes(Box(mallory, PublicKey(dep.owners["a"].public_key())).encrypt(fake))
    with pytest.raises(WireError, match="does not authenticate"):
        segs["a"].secagg_aggregate(2, {"b": forged, "c": sealed["c"]["a"]})
    _assert_unchanged(dep, segs, before)
    # the honest round still completes after every refused attempt
    for n in NAMES:
        segs[n].secagg_aggregate(2, {o: sealed[o][n] for o in NAMES if o != n})


def test_a_split_view_of_the_round_is_detected(three_peers) -> None:
    """The model owner tells a and b different averaging weights (its masks would not cancel):
    every member checks the descriptor in each contribution, so nothing is loaded."""
    dep, _, segs = three_peers
    before = _weights(dep, segs)
    ids = {n: s.segment_id for n, s in segs.items()}
    s_a = segs["a"].secagg_contribute("node0", 1, ids, {"a": 1.0, "b": 1.0, "c": 1.0})
    s_b = segs["b"].secagg_contribute("node0", 1, ids, {"a": 9.0, "b": 1.0, "c": 1.0})
    s_c = segs["c"].secagg_contribute("node0", 1, ids, {"a": 1.0, "b": 1.0, "c": 1.0})
    with pytest.raises(ProtocolError, match="not for round 1"):
        segs["a"].secagg_aggregate(1, {"b": s_b["a"], "c": s_c["a"]})
    with pytest.raises(ProtocolError, match="not for round 1"):
        segs["b"].secagg_aggregate(1, {"a": s_a["b"], "c": s_c["b"]})
    _assert_unchanged(dep, segs, before)


def test_cohort_checks_at_contribution(three_peers) -> None:
    _, session, segs = three_peers
    ids = {n: s.segment_id for n, s in segs.items()}
    w = {n: 1.0 for n in NAMES}
    with pytest.raises(AccessError, match="not a peer"):  # an outsider in the cohort
        segs["a"].secagg_contribute("node0", 1, {**ids, "mallory": "m/seg1"},
                                    {**w, "mallory": 1.0})
    with pytest.raises(ProtocolError, match="do not list a"):  # a's other segment, or none
        segs["a"].secagg_contribute("node0", 1, {**ids, "a": "a/seg99"}, w)
    with pytest.raises(ProtocolError, match=r"2\.\."):  # alone: the "average" is its weights
        segs["a"].secagg_contribute("node0", 1, {"a": ids["a"]}, {"a": 1.0})
    for bad in (-1.0, 1e13, 10**400):
        with pytest.raises(ProtocolError, match="a number in"):
            segs["a"].secagg_contribute("node0", 1, ids, {**w, "b": bad})
    for zero in ({**w, "b": 0.0, "c": 0.0}, {**w, "a": 0.0}):  # a copy, not an average
        with pytest.raises(ProtocolError, match=r"a number in \(0"):
            segs["a"].secagg_contribute("node0", 1, ids, zero)
    with pytest.raises(ProtocolError, match="at most 256 characters"):  # persisted with the
        segs["a"].secagg_contribute("node0", 1, {**ids, "b": "y" * 600_000}, w)  # round
    # none of these spent a round: round 1 is still available
    assert segs["a"].secagg_round() == 0
    sealed = _round(segs, 1, w)
    with pytest.raises(ProtocolError, match="trained since contributing"):
        loss, _ = session.loss("a", torch.arange(4), torch.zeros(4, dtype=torch.int64),
                               dataset="train")
        loss.backward()
        session.flush()
        segs["a"].secagg_aggregate(1, {o: sealed[o]["a"] for o in NAMES if o != "a"})


def test_relay_is_bound_to_segment_and_sequence(three_peers) -> None:
    from nacl.public import Box, PrivateKey, PublicKey

    from syft_split import wire

    dep, session, segs = three_peers
    first, sender = segs["a"].seal_for("b", segs["b"].segment_id)
    segs["b"].unseal(first, sender)
    before = _weights(dep, segs)
    with pytest.raises(ProtocolError, match="replay"):
        segs["b"].unseal(first, sender)
    for_b, _ = segs["a"].seal_for("b", segs["b"].segment_id)
    with pytest.raises(WireError, match="does not authenticate"):  # b's box, handed to c
        segs["c"].unseal(for_b, "a")
    with pytest.raises(AccessError, match="not a peer"):
        segs["b"].unseal(for_b, "model_owner")
    mallory = PrivateKey.generate()
    fake = wire.encode({"kind": "relay", "sender": "a", "recipient": "b",
                        "to_segment": segs["b"].segment_id, "seq": 99})
    with pytest.raises(WireError, match="does not authenticate"):
        segs["b"].unseal(bytes(Box(mallory, PublicKey(dep.owners["b"].public_key()))
                               .encrypt(fake)), "a")
    # sealed for another segment of b: refused by b's runtime that is not the target
    other, _ = segs["a"].seal_for("b", "b/seg-elsewhere")
    with pytest.raises(ProtocolError, match="not for"):
        segs["b"].unseal(other, "a")
    _assert_unchanged(dep, segs, before)
    segs["b"].unseal(for_b, "a")  # the genuine next one still loads
    relay_weights(session, "b", "c")


# ------------------------------------------------------------------ export to the model owner
def test_weight_export_is_its_own_approval_line() -> None:
    """Reading weights reveals training data: asking for it shows its own line in the review,
    and approving the segment does not grant it; ``release_weights`` (or the approval option
    of that name) does."""
    from syft_split import ConfigError
    from syft_split.spec import module_to_spec, spec_state

    dep = inprocess({"a": {"train": (torch.randn(8, 1, 4, 4), None)}})
    host = dep.owners["a"]
    seg = _segment()[:2]

    def propose(**fields) -> str:
        return str(dep.transport.call(
            "a", "propose", role="input", spec=module_to_spec(seg), datasets=["train"],
            optimizer={"name": "sgd", "lr": 0.1},
            **{f"state/{k}": v for k, v in spec_state(seg).items()}, **fields)["segment"])

    asked, plain, granted = propose(share_weights="model_owner"), propose(), propose()
    assert "REVEAL TRAINING DATA" in host.review(asked)
    assert "release_weights" in host.review(plain) and "REVEAL" not in host.review(plain)
    host.approve(asked)
    host.approve(plain)
    with pytest.raises(ConfigError, match="release_weights must be a bool"):
        host.approve(granted, release_weights="yes")
    host.approve(granted, release_weights=True)
    for pid in (asked, plain):
        with pytest.raises(AccessError, match="not released"):
            dep.transport.call("a", "export", segment=pid)
    got = dep.transport.call("a", "export", segment=granted)
    assert torch.equal(got["state/1.weight"], host.export_weights(granted)["1.weight"])
    host.release_weights(asked)
    assert "state/1.weight" in dep.transport.call("a", "export", segment=asked)


def test_a_check_loads_nothing_and_a_refusal_names_the_sender(three_peers) -> None:
    """``check``: every contribution is checked and nothing is loaded (the model owner asks
    every member first); a refused contribution names its sender as the error's ``peer``
    (a field of the answer, not read out of the message)."""
    dep, _, segs = three_peers
    before = _weights(dep, segs)
    sealed = _round(segs, 1, {n: 1.0 for n in NAMES})
    for n in NAMES:
        segs[n].secagg_aggregate(1, {o: sealed[o][n] for o in NAMES if o != n}, check=True)
    _assert_unchanged(dep, segs, before)
    bad = {"b": b"\x00" * len(sealed["b"]["a"]), "c": sealed["c"]["a"]}
    with pytest.raises(WireError, match="does not authenticate") as info:
        segs["a"].secagg_aggregate(1, bad, check=True)
    assert info.value.peer == "b"
    with pytest.raises(WireError) as info2:  # c's contribution for b, relayed to a
        segs["a"].secagg_aggregate(1, {"b": sealed["b"]["a"], "c": sealed["c"]["b"]})
    assert info2.value.peer == "c"
    with pytest.raises(ProtocolError, match="aborts") as info3:  # not about one peer: no peer
        segs["a"].secagg_aggregate(1, {"b": sealed["b"]["a"]}, check=True)
    assert info3.value.peer is None
    _assert_unchanged(dep, segs, before)
    for n in NAMES:
        segs[n].secagg_aggregate(1, {o: sealed[o][n] for o in NAMES if o != n})
    assert not torch.equal(_weights(dep, segs)["a"]["1.weight"], before["a"]["1.weight"])

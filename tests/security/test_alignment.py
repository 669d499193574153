"""A malicious model owner against a data owner's alignment ops (``psi_serve``, ``psi_request``,
``psi_finish``): crafted setups, oversized or repeated requests, reordered responses, long names,
absent datasets, and aligned rows restored onto another source. Each is refused with a clear
error and leaves the host as it was. Then a malicious data owner against the model owner's
``align_records``: setups claiming ids it does not hold, requests larger than it declared."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from syft_split import ConfigError, DataOwnerHost, wire
from syft_split.host import HostLimits
from syft_split.spec import module_to_spec, spec_state
from syft_split.transport.base import TransportWrapper

psi = pytest.importorskip("private_set_intersection.python")

MO = "mo@x"
N = 60
IDS = [f"p{i:02d}" for i in range(N)]
G = ["p03", "p07", "p11"]  # the ids the model owner holds: the true intersection


def _host(state_dir: Path | None = None, limits: HostLimits | None = None,
          ids: list[str] = IDS) -> DataOwnerHost:
    """A data owner whose feature of row ``r`` is ``r``: a dataset shows which rows it took."""
    host = DataOwnerHost("a", state_dir=state_dir, limits=limits)
    host.add_dataset("people", torch.tensor([[float(IDS.index(i))] for i in ids]),
                     torch.zeros(len(ids), dtype=torch.long), ids=list(ids))
    host.restore_state()
    host.allow_alignment("people", MO)
    return host


def _call(host: DataOwnerHost, req: dict[str, Any], user: str = MO) -> dict[str, Any]:
    return dict(wire.decode(host.handle(user, wire.encode(req))))


def _finish(host: DataOwnerHost, setup: bytes, response: bytes, as_name: str) -> dict[str, Any]:
    return _call(host, {"op": "psi_finish", "dataset": "people", "setup": setup,
                        "response": response, "as_name": as_name})


def _honest(host: DataOwnerHost, as_name: str, common: list[str] = G) -> dict[str, Any]:
    from syft_split.psi import PsiServer

    request = _call(host, {"op": "psi_request", "dataset": "people"})["request"]
    return _finish(host, *PsiServer(common).handle(request), as_name=as_name)


def _rows(host: DataOwnerHost, name: str) -> list[int]:
    return host.datasets[name].features.flatten().int().tolist()


# A crafted setup made openmined-psi abort the whole process (a CHECK on a zero modulus) or
# spin for hours: run in a subprocess so that a regression fails this test, not the run.
# "host": through a data owner's psi_finish (only the setup it would make itself passes);
# "library": PsiClient.intersection without that exact check (the model owner's side).
_CRAFTED = textwrap.dedent("""
    import json, torch
    import private_set_intersection.python as psi
    from syft_split import ConfigError, DataOwnerHost, wire
    from syft_split.psi import PsiClient, PsiServer
    host = DataOwnerHost("a")
    host.add_dataset("t", torch.randn(50, 3), ids=[f"r{i}" for i in range(50)])
    host.allow_alignment("t", "mo@x")
    call = lambda req: dict(wire.decode(host.handle("mo@x", wire.encode(req))))
    out = {"host": {}, "library": {}}
    for case in ("bloom_empty_bits", "gcs_zero_range", "bloom_2e31_hashes", "gcs_huge_div",
                 "raw_points", "none"):
        s = psi.ServerSetup()
        if case == "bloom_empty_bits":
            s.bloom_filter.num_hash_functions = 3; s.bloom_filter.bits = b""
        elif case == "gcs_zero_range":
            s.gcs.div = 5; s.gcs.hash_range = 0; s.gcs.bits = b"\\xff" * 8
        elif case == "bloom_2e31_hashes":
            s.bloom_filter.num_hash_functions = 2**31 - 1; s.bloom_filter.bits = b"\\xff" * 16
        elif case == "gcs_huge_div":
            s.gcs.div = 2**31 - 1; s.gcs.hash_range = 2**62; s.gcs.bits = b"\\x01" * 8
        elif case == "raw_points":
            s.raw.encrypted_elements.extend([b"\\x02" + b"\\xff" * 32] * 3)
        req = call({"op": "psi_request", "dataset": "t"})["request"]
        _, response = PsiServer(["r1", "r2"]).handle(req)
        out["host"][case] = call({"op": "psi_finish", "dataset": "t", "as_name": "x",
                                  "setup": s.SerializeToString(), "response": response})
        client = PsiClient(list(range(20)))
        _, response = PsiServer(list(range(5))).handle(client.request())
        try:
            out["library"][case] = client.intersection(s.SerializeToString(), response).tolist()
        except Exception as exc:
            out["library"][case] = f"{type(exc).__name__}: {exc}"
    out["datasets"] = sorted(host.datasets)
    req = call({"op": "psi_request", "dataset": "t"})["request"]
    setup, response = PsiServer(["r1", "r2"]).handle(req)
    out["honest"] = call({"op": "psi_finish", "dataset": "t", "setup": setup,
                          "response": response, "as_name": "x"})
    print(json.dumps(out))
""")


def test_a_crafted_psi_setup_is_refused_and_the_host_lives() -> None:
    done = subprocess.run([sys.executable, "-c", _CRAFTED], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]  # an abort is -6/134
    out = json.loads(done.stdout.strip().splitlines()[-1])
    for case, answer in out["host"].items():
        assert answer["error"] == "ProtocolError", (case, answer)
        assert "expected a 'gcs' PSI setup with hash_range=" in answer["message"]
    assert out["datasets"] == ["t"]  # nothing made by a refused setup
    assert out["honest"] == {"records": 2}  # and the host goes on serving
    library = out["library"]
    assert library["bloom_empty_bits"].startswith("ProtocolError: expected a Bloom filter")
    assert library["bloom_2e31_hashes"].startswith("ProtocolError: expected a Bloom filter")
    assert library["gcs_zero_range"].startswith("ProtocolError: expected a GCS setup with hash_r")
    assert library["gcs_huge_div"].startswith("ProtocolError: expected a GCS setup with 0 <= div")
    assert library["none"].startswith("ProtocolError: expected a PSI setup holding")
    assert library["raw_points"] == []  # well formed, matches nothing


def test_psi_serve_is_capped_and_psi_work_is_rate_limited() -> None:
    from syft_split.psi import PsiClient

    # psi_serve costs its request's elements plus the dataset's (60), counted before it runs
    host = _host(limits=HostLimits(max_psi_elements=8, max_psi_elements_per_minute=260))
    host.allow_alignment("people", "other@x")
    serve = {"op": "psi_serve", "dataset": "people"}
    big = _call(host, {**serve, "request": PsiClient([f"g{i}" for i in range(9)]).request()})
    assert big["error"] == "ValidationError" and "at most 8 elements" in big["message"]

    one = psi.Request()
    one.ParseFromString(PsiClient(["g"]).request())
    dup = psi.Request()
    dup.reveal_intersection = True
    dup.encrypted_elements.extend([one.encrypted_elements[0]] * 4)  # free for the MO to build
    repeated = _call(host, {**serve, "request": dup.SerializeToString()})
    assert repeated["error"] == "ValidationError" and "distinct" in repeated["message"]  # 64

    request = PsiClient(["p03", "zz", "p07", "q", "r"]).request()
    assert set(_call(host, {**serve, "request": request})) == {"setup", "response"}
    assert set(_call(host, {**serve, "request": request})) == {"setup", "response"}
    assert set(_call(host, {**serve, "request": request})) == {"setup", "response"}  # 259
    for op in ({**serve, "request": request}, {"op": "psi_request", "dataset": "people"}):
        refused = _call(host, op)
        assert refused["error"] == "ValidationError", refused
        assert "259 PSI elements" in refused["message"] and "allows 260" in refused["message"]
    assert set(_call(host, {**serve, "request": request}, user="other@x")) == {"setup",
                                                                                 "response"}


def test_a_reordered_response_cannot_pick_the_rows_kept() -> None:
    """The model owner blinds the data owner's request honestly but answers it shifted by one
    position, aiming at the rows before its ids (2, 6, 10). The request's secret order makes
    the rows kept random: never chosen by position, and never more than |G|."""
    host = _host()
    assert _honest(host, "honest") == {"records": 3}
    assert _rows(host, "honest") == [3, 7, 11]
    host.drop_aligned("honest")

    aimed, kept = 0, set()
    for trial in range(10):
        req = psi.Request()
        req.ParseFromString(_call(host, {"op": "psi_request", "dataset": "people"})["request"])
        server = psi.server.CreateWithNewKey(True)
        els = list(server.ProcessRequest(req).encrypted_elements)
        shifted = psi.Response()
        shifted.encrypted_elements.extend(els[1:] + els[:1])
        setup = server.CreateSetupMessage(1e-9, len(els), G, psi.DataStructure.GCS)
        got = _finish(host, setup.SerializeToString(), shifted.SerializeToString(), f"s{trial}")
        if "error" in got:  # the shift happened to match no row: nothing is made
            assert got["error"] == "ConfigError" and f"s{trial}" not in host.datasets
            continue
        rows = _rows(host, f"s{trial}")
        assert len(rows) <= len(G)
        aimed += rows == [2, 6, 10]
        kept.add(tuple(rows))
        host.drop_aligned(f"s{trial}")
    assert aimed <= 1 and len(kept) > 1  # without the secret order: 10 hits, one set of rows

    req = psi.Request()  # answering every position with one element that matches is refused
    req.ParseFromString(_call(host, {"op": "psi_request", "dataset": "people"})["request"])
    server = psi.server.CreateWithNewKey(True)
    els = list(server.ProcessRequest(req).encrypted_elements)
    same = psi.Response()
    same.encrypted_elements.extend([els[0]] * len(els))
    setup = server.CreateSetupMessage(1e-9, len(els), G, psi.DataStructure.GCS)
    got = _finish(host, setup.SerializeToString(), same.SerializeToString(), "dup")
    assert got["error"] == "ProtocolError" and "distinct" in got["message"]
    assert "dup" not in host.datasets


def test_bad_alignment_requests_get_clear_errors_and_change_nothing(tmp_path: Path) -> None:
    from syft_split.alignment import MAX_NAME_CHARS

    host = _host(tmp_path)
    for name in ("x" * (MAX_NAME_CHARS + 1), "x" * 600_000, "a\nb", "", 7):
        got = _honest(host, name)  # type: ignore[arg-type]
        assert got["error"] == "ConfigError" and "as_name" in got["message"], got
        assert len(got["message"]) < 300  # the name is not echoed in full
    assert sorted(host.datasets) == ["people"]
    assert _honest(host, "x" * MAX_NAME_CHARS) == {"records": 3}

    empty = _honest(host, "empty", common=["nobody"])
    assert empty["error"] == "ConfigError" and "no record" in empty["message"]
    assert "empty" not in host.datasets
    host.allow_alignment("people", "later@x")  # every op is saved: the state saves
    host.close()

    back = DataOwnerHost("a", state_dir=tmp_path)  # 'people' comes back without ids
    back.add_dataset("people", torch.zeros(N, 1))
    back.restore_state()
    for op in ({"op": "psi_request", "dataset": "people"},
               {"op": "psi_serve", "dataset": "people", "request": b"x"}):
        got = _call(back, op)
        assert got["error"] == "ConfigError" and "no record ids" in got["message"], got
    back.close()
    gone = DataOwnerHost("a", state_dir=tmp_path)  # or not at all
    gone.restore_state()
    got = _call(gone, {"op": "psi_request", "dataset": "people"})
    assert got["error"] == "ConfigError" and "is not here" in got["message"], got
    got = _call(gone, {"op": "psi_request", "dataset": ["people"]})
    assert got["error"] == "AccessError", got


def _propose_on(host: DataOwnerHost, dataset: str) -> str:
    m = nn.Linear(1, 2)
    req = {"op": "propose", "role": "input", "datasets": [dataset], "spec": module_to_spec(m),
           "optimizer": {"name": "sgd", "lr": 0.1},
           **{f"state/{k}": v for k, v in spec_state(m).items()}}
    pid = str(_call(host, req)["segment"])
    host.approve(pid)
    return pid


@pytest.mark.parametrize("source", ["reversed", "shorter"])
def test_aligned_rows_are_not_restored_onto_other_records(tmp_path: Path, source: str) -> None:
    host = _host(tmp_path)
    assert _honest(host, "people@aligned") == {"records": 3}
    pid = _propose_on(host, "people@aligned")
    host.close()

    ids = list(reversed(IDS)) if source == "reversed" else IDS[:5]
    back = _host(tmp_path, ids=ids)  # the same ids in another order, or fewer records
    assert "people@aligned" not in back.datasets
    assert back.proposal(pid).status == "halted"
    assert "aligned dataset 'people@aligned' was not restored" in back.proposal(pid).reason
    assert any(e.op == "restore" and "people@aligned" in e.outcome for e in back.audit)
    back.close()

    same = _host(tmp_path)  # forgotten: the source as it was does not bring it back
    assert "people@aligned" not in same.datasets
    assert _honest(same, "people@aligned") == {"records": 3}  # align again
    same.close()
    again = _host(tmp_path)  # and an unchanged source restores it
    assert _rows(again, "people@aligned") == [3, 7, 11]


def _restored(state_dir: Path) -> DataOwnerHost:
    back = DataOwnerHost("a", state_dir=state_dir)
    back.add_dataset("people", torch.tensor([[float(r)] for r in range(N)]),
                     torch.zeros(N, dtype=torch.long), ids=list(IDS))
    back.restore_state()
    return back


def test_a_revoked_permission_refuses_psi_and_stays_revoked(tmp_path: Path) -> None:
    """``revoke_alignment`` withdraws one (dataset, user): a request the user made cannot be
    finished, nothing else is served to it, and a crash right after does not bring it back.
    Other users' permissions stay; a name that matches nothing changes nothing."""
    host = _host(tmp_path)
    host.allow_alignment("people", "other@x")
    host.names["other@x"] = "Other"
    assert _honest(host, "mine") == {"records": 3}
    pending = _call(host, {"op": "psi_request", "dataset": "people"})["request"]
    for bad in ("nobody@x", "", None):
        with pytest.raises(ConfigError, match=r"user must be|nothing to revoke"):
            host.revoke_alignment("people", bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"allowed on it: \['mo@x', 'Other \(other@x\)'\]"):
        host.revoke_alignment("people", "nobody@x")
    assert host.revoke_alignment("people", MO) == {"dataset": "people", "user": MO,
                                                  "aligned": ["mine"]}
    back = _restored(tmp_path)  # a crash: the revocation was saved when it was made
    from syft_split.psi import PsiClient, PsiServer

    refused = [_finish(host, *PsiServer(G).handle(pending), as_name="late"),
               _call(host, {"op": "psi_request", "dataset": "people"}),
               _call(host, {"op": "psi_serve", "dataset": "people",
                            "request": PsiClient(["p03"]).request()})]
    assert [r.get("error") for r in refused] == ["AccessError"] * 3, refused
    assert "late" not in host.datasets and "mine" in host.datasets  # it made: stays
    assert "request" in _call(host, {"op": "psi_request", "dataset": "people"}, "other@x")
    assert [e.outcome for e in host.audit if e.op == "revoke"] == [
        "mo@x may no longer align 'people' (revoked by the data owner)"]
    assert [e.outcome for e in host.audit if e.op == "owner.revoke_alignment"][-1] == "ok"

    got = _call(back, {"op": "psi_request", "dataset": "people"})
    assert got["error"] == "AccessError", got
    assert "request" in _call(back, {"op": "psi_request", "dataset": "people"}, "other@x")
    assert back.revoke_alignment("people", "Other")["user"] == "other@x"  # by its name
    got = _call(back, {"op": "psi_request", "dataset": "people"}, "other@x")
    assert got["error"] == "AccessError", got


# ------------------------------------------- a malicious data owner against the model owner
class _Lying(TransportWrapper):
    """Data owner ``m`` as its own transport: ``edit[op](request, answer)`` rewrites what it
    answers to ``op`` (``answer`` is None when it answers without asking its host)."""

    def __init__(self, inner: Any, edit: dict[str, Any]) -> None:
        super().__init__(inner)
        self.edit, self.ops = edit, []

    def request(self, party: str, data: bytes) -> bytes:
        req = dict(wire.decode(data))
        if party != "m":
            return self.inner.request(party, data)
        self.ops.append(req["op"])
        if req["op"] not in self.edit:
            return self.inner.request(party, data)
        answer = None if req["op"] == "psi_request" else dict(
            wire.decode(self.inner.request(party, data)))
        return wire.encode(self.edit[req["op"]](req, answer))


def _vertical() -> Any:
    """``h`` holds the even ids 0..98, ``m`` the ids 0..9; the model owner labels 0..99."""
    from syft_split.deploy import inprocess

    dep = inprocess({"h": {"train": (torch.randn(50, 3), None, [str(2 * i) for i in range(50)])},
                     "m": {"train": (torch.randn(10, 3), None, [str(i) for i in range(10)])}},
                    user=MO)
    for p in ("h", "m"):
        dep.owners[p].allow_alignment("train", MO)
    return dep


LABELS = [str(i) for i in range(100)]


def _packed(request: bytes, ids: list[str], hash_range: int) -> tuple[bytes, bytes]:
    """An honest-looking GCS setup holding ``ids`` at ``hash_range``, and its response."""
    server = psi.server.CreateWithNewKey(True)
    req = psi.Request()
    req.ParseFromString(request)
    m = len(req.encrypted_elements)
    setup = server.CreateSetupMessage(max(m, len(ids)) * m / hash_range, m, ids,
                                      psi.DataStructure.GCS)
    setup.gcs.hash_range = hash_range
    return setup.SerializeToString(), server.ProcessRequest(req).SerializeToString()


@pytest.mark.parametrize("setup", ["all_ones_bloom", "more_ids_at_its_range", "larger_range"])
def test_a_data_owner_cannot_claim_ids_it_does_not_hold(setup: str) -> None:
    """``m`` (10 records declared) answers the narrowing with a setup claiming more ids, so
    that the common set, which it probes next, is the model owner's and ``h``'s: refused as
    m's failure before any data owner is asked for its request."""
    from syft_split import ProtocolError
    from syft_split.alignment import align_records
    from syft_split.psi import DEFAULT_FPR, _gcs_range

    # 60: more than the 10 records m declared, fewer than the 100 elements of the request
    guesses = [str(i) for i in range(60 if setup == "more_ids_at_its_range" else 300)]

    def serve(req: dict[str, Any], answer: dict[str, Any]) -> dict[str, Any]:
        if setup == "all_ones_bloom":
            s = psi.ServerSetup()
            s.bloom_filter.num_hash_functions = 1
            s.bloom_filter.bits = b"\xff" * 64
            return {**answer, "setup": s.SerializeToString()}
        n = 10 if setup == "more_ids_at_its_range" else 300  # 100 request elements
        ranged = _packed(req["request"], guesses, int(_gcs_range(100, max(100, n), DEFAULT_FPR)))
        return {"setup": ranged[0], "response": ranged[1]}

    dep = _vertical()
    lying = _Lying(dep.transport, {"psi_serve": serve})
    why = {"more_ids_at_its_range": "GCS setup of at most 64 bytes for a set of at most 10 ids"
           }.get(setup, "'gcs' PSI setup with hash_range=9999999999999 ")
    with pytest.raises(ProtocolError, match=r"data owner 'm' answered psi_serve on 'train' "
                                            r"\(10 records declared\): expected a " + why):
        align_records(lying, ["m", "h"], "train", LABELS)
    assert lying.ops == ["describe", "psi_serve"]  # no psi_request was answered
    assert "train@aligned" not in dep.owners["h"].datasets


def test_an_oversized_psi_request_of_a_data_owner_is_refused() -> None:
    """``m`` answers the narrowing honestly, then asks about 300 guessed ids (or declares more
    records than a host serves by default): refused as m's failure; ``m`` learns nothing of
    the common ids. An honest run on the same parties then aligns."""
    from syft_split import ConfigError, ValidationError
    from syft_split.alignment import align_records
    from syft_split.psi import PsiClient

    dep = _vertical()
    ask = {"psi_request": lambda req, _: {"request": PsiClient([str(i) for i in range(300)])
                                          .request()}}
    lying = _Lying(dep.transport, ask)
    with pytest.raises(ValidationError, match=r"data owner 'm' sent a PSI request of 300 "
                                              r"elements on 'train', more than the 10 records"):
        align_records(lying, ["m", "h"], "train", LABELS)
    assert "psi_finish" not in lying.ops

    def inflate(req: dict[str, Any], answer: dict[str, Any]) -> dict[str, Any]:
        answer["datasets"]["train"]["records"] = HostLimits().max_psi_elements + 1
        return answer

    lying = _Lying(dep.transport, {"describe": inflate, **ask})
    with pytest.raises(ConfigError, match=r"data owner 'm' declares 65537 records in 'train'; "
                                          r"the model owner aligns at most 65536"):
        align_records(lying, ["m", "h"], "train", LABELS)
    assert lying.ops == ["describe"]
    with pytest.raises(ConfigError, match=r"'h' declares 50 records .* at most 20 records"):
        align_records(dep.transport, ["m", "h"], "train", LABELS, max_psi_elements=20)

    rows = align_records(dep.transport, ["m", "h"], "train", LABELS)
    assert [LABELS[int(r)] for r in rows] == ["0", "2", "4", "6", "8"]
    assert dep.owners["m"].datasets["train@aligned"].ids == ["0", "2", "4", "6", "8"]


def test_a_data_owner_with_more_records_than_the_model_owner_aligns() -> None:
    """The strict check on the model owner's side accepts an honest host's setup for a set
    larger than its request (``h``: 50 ids against 20 labels) or smaller (``m``: 10)."""
    from syft_split.alignment import align_records

    dep = _vertical()
    labels = [str(i) for i in range(0, 40, 2)]
    rows = align_records(dep.transport, ["h", "m"], "train", labels)
    assert [labels[int(r)] for r in rows] == ["0", "2", "4", "6", "8"]
    assert sorted(dep.owners["h"].datasets["train@aligned"].ids) == ["0", "2", "4", "6", "8"]

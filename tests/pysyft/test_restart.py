"""A real (embedded) datasite restarted with its database and state: no new approval, no lost
step; under HE protection (embedded and a SIGKILLed HTTP server) it continues with fresh keys.
HTTP restarts of plain runs and a SIGSTOPped HTTP datasite: tests/test_chaos.py."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch

from syft_split import OptimizerSpec, SplitPlan, SplitSession, split_model
from syft_split.deploy import inprocess
from syft_split.models import digits_cnn
from syft_split.transport.pysyft import deployment, restart

pytestmark = pytest.mark.pysyft


def _data(seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(48, 1, 8, 8, generator=g), torch.randint(0, 10, (48,), generator=g)
    return {"train": (x[:40], y[:40]), "test": (x[40:], y[40:])}


def _session(parties: list[str], transport, **kwargs) -> SplitSession:
    torch.manual_seed(1)
    plan = SplitPlan.vanilla(split_model(digits_cnn(channels=4, hidden=16), ["pool1"]), parties)
    return SplitSession(plan, transport, optimizer=OptimizerSpec("adam", lr=1e-2), **kwargs)


def _steps(session: SplitSession, y: torch.Tensor, batches: list[torch.Tensor]) -> None:
    for idx in batches:
        session.zero_grad()
        loss, _ = session.loss("a", idx, y[idx])
        loss.backward()  # fused: the gradient stays held until the next forward
        session.step()


def test_embedded_datasite_restarts_with_its_state(tmp_path: Path) -> None:
    """A datasite crashes with a forward pending and a gradient held at the model owner; it
    comes back from its database and state directory: the segment is still approved, the
    gradient lands on the replayed forward, and the weights equal an uninterrupted run's."""
    data = {"a": _data(0)}
    y = data["a"]["train"][1]
    g = torch.Generator().manual_seed(5)
    batches = [torch.randperm(40, generator=g)[:16] for _ in range(4)]

    ref = inprocess(data)
    ref_session = _session(["a"], ref.transport)
    ref.approve_all(ref_session.propose())
    _steps(ref_session, y, batches)
    ref_session.flush()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dep = deployment(data, state_dir=tmp_path, name_prefix="t-restart")
    try:
        session = _session(["a"], dep.transport)
        dep.approve_all(session.propose())
        _steps(session, y, batches[:2])
        (sid,) = session.status()
        before = dep.owners["a"].audit()
        assert dep.transport.call("a", "status", segment=sid)["pending"] is True
        seconds = restart(dep, "a", crash=True)
        assert dep.transport.call("a", "status", segment=sid)["status"] == "approved"
        _steps(session, y, batches[2:])
        session.flush()
        got = dep.owners["a"].export_weights(sid)
        want = ref.owners["a"].export_weights(ref_session.remote[("a", 0)].segment_id)
        assert all(torch.equal(got[k], want[k]) for k in want)
        assert all(torch.equal(p, q) for p, q in zip(session.local[1].parameters(),
                                                      ref_session.local[1].parameters()))
        after = dep.owners["a"].audit()
        assert [e.op for e in after[: len(before)]] == [e.op for e in before]  # audit kept
        assert seconds < 60
    finally:
        dep.close()
    assert (tmp_path / "a" / "host" / "host.sspl").exists()  # close() keeps a persistent site
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.he
@pytest.mark.parametrize("level, http", [("A", False), ("B", False), ("A", True)])
def test_datasite_restart_under_he_continues_with_fresh_keys(tmp_path: Path, level: str,
                                                             http: bool) -> None:
    """A protected segment on a real datasite (embedded; or an HTTP server SIGKILLed) that
    crashes between steps comes back approved
    with fresh CKKS keys (the secret key is never on disk; level B: its share from the state
    directory), the model owner fetches the new public context, and the weights stay with an
    uninterrupted protected run's (CKKS noise; at level B a lost share would change the data
    owner's dL/dx = delta (W_s + A)^T and so its weights)."""
    from syft_split.he import protect

    data = {"a": _data(0)}
    y = data["a"]["train"][1]
    g = torch.Generator().manual_seed(5)
    batches = [torch.randperm(40, generator=g)[:16] for _ in range(4)]

    def he_session(transport) -> SplitSession:
        torch.manual_seed(1)
        plan = SplitPlan.vanilla(split_model(digits_cnn(channels=4, hidden=16), ["pool2"]), "a")
        with warnings.catch_warnings():  # level B: the encrypted layer trains with SGD
            warnings.simplefilter("ignore")
            plan = protect(plan, level=level, batch_size=16, lr=0.05)
            return SplitSession(plan, transport, optimizer=OptimizerSpec("adam", lr=1e-2))

    ref = inprocess(data)
    ref_session = he_session(ref.transport)
    ref.approve_all(ref_session.propose())
    _steps(ref_session, y, batches)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dep = deployment(data, state_dir=tmp_path, name_prefix=f"t-he-restart-{level}{http:d}",
                         http=http)
    try:
        session = he_session(dep.transport)
        dep.approve_all(session.propose())
        _steps(session, y, batches[:2])
        (sid,) = session.status()
        restart(dep, "a", crash=True)
        assert dep.transport.call("a", "status", segment=sid)["status"] == "approved"
        _steps(session, y, batches[2:])
        assert session.he is not None and session.he.rekeys == {"a": 1}
        assert dep.transport.call("a", "status", segment=sid)["steps"] == 4
        got = dep.owners["a"].export_weights(sid)
        want = ref.owners["a"].export_weights(ref_session.remote[("a", 0)].segment_id)
        assert all(torch.allclose(got[k], want[k], atol=1e-5) for k in want)
        for p, q in zip(session.local[1].parameters(), ref_session.local[1].parameters(),
                        strict=True):
            assert torch.allclose(p, q, atol=1e-5)
    finally:
        dep.close()
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_a_restored_datasite_withdraws_alignment_permissions_saved_for_e_mails(
        tmp_path: Path) -> None:
    """The datasite's restore withdraws what an older version allowed an e-mail (never moved
    to the account that has it now) and audits it for the data owner; the model owner's
    permission, saved for its account, holds across the crash."""
    from syft_split import ConfigError
    from syft_split.alignment import align_records
    from syft_split.datasite_serve import _ENTRIES

    ids = [f"id{i}" for i in range(6)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dep = deployment({"a": {"train": (torch.randn(6, 3), None, ids)}}, state_dir=tmp_path,
                         name_prefix="t-legacy")
    try:
        owner = dep.owners["a"]
        owner.allow_alignment("train", dep.transport.user)  # saved for its account's id
        entry = next(e for e in list(_ENTRIES.values()) if e.host.name == "a")
        with entry.lock:  # as an older version saved it
            entry.host.families["alignment"]._allowed.add(("train", "old@example.org"))
            entry.host.save_state()
        restart(dep, "a", crash=True)
        restored = [e.outcome for e in owner.audit() if e.op == "restore"]
        assert len(restored) == 1 and "grant again for old@example.org" in restored[0]
        with pytest.raises(ConfigError, match="nothing to revoke"):
            owner.revoke_alignment("train", "old@example.org")
        assert align_records(dep.transport, ["a"], "train", ids[:3]).tolist() == [0, 1, 2]
    finally:
        dep.close()
    shutil.rmtree(tmp_path, ignore_errors=True)

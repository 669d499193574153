"""What any datasite user's proposals, and an approved model owner's ``leakage`` calls, may
make the data owner's host do or keep (review R11): the dry run computes on no real records,
auxiliary heads per proposal are capped, a spec's JSON and a ``cat`` node's inputs are capped
and specs count against ``max_pending_bytes``, a pending proposal keeps one copy of its
weights, and ``leakage`` seconds per segment and hour are capped. In process, through
``host.handle``, with small limits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from syft_split import OptimizerSpec, wire
from syft_split.host.core import DataOwnerHost
from syft_split.host.records import HostLimits
from syft_split.spec import module_to_spec, spec_state

SGD = OptimizerSpec("sgd", lr=0.1).to_json()


def _call(host: DataOwnerHost, caller: str, op: str, **fields: Any) -> dict[str, Any]:
    out: dict[str, Any] = wire.decode(host.handle(caller, wire.encode({"op": op, **fields})))
    return out


def _host(state_dir: Path | None = None, **limits: Any) -> DataOwnerHost:
    host = DataOwnerHost("do", state_dir=state_dir, limits=HostLimits(**limits))
    g = torch.Generator().manual_seed(0)
    host.add_dataset("train", torch.randn(64, 8, generator=g),
                     torch.randint(0, 3, (64,), generator=g))
    if state_dir is not None:
        host.restore_state()
    return host


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {f"state/{k}": v for k, v in spec_state(module).items()}


def _propose(host: DataOwnerHost, module: nn.Module, caller: str = "mo") -> str:
    r = _call(host, caller, "propose", role="input", spec=module_to_spec(module),
              datasets=["train"], optimizer=SGD, **_state(module))
    assert "error" not in r, r
    return str(r["segment"])


class _LargestReal(TorchDispatchMode):
    """Records the most elements of any tensor an op makes off the meta device."""

    largest = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (list, tuple)) else [out]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self.largest = max(self.largest, t.numel())
        return out


def test_a_strangers_dry_run_computes_on_no_real_records() -> None:
    """F2: the dry run ran the module on two real zero records while the size check bounds
    ``max_batch`` (here 1): a 100 KB propose of one convolution on a chosen [32, 2048, 2048]
    input held the host 20 s at 3.3 GiB. Scaled down: its output on [4, 64, 64] is 16,384
    elements a record; no tensor the host makes may hold one record's worth (shapes come from
    the meta device), and the proposal still gets its output shape."""
    host = _host()
    conv = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1))
    mode = _LargestReal()
    with mode:
        r = _call(host, "stranger", "propose", role="middle", datasets=[], input_shape=[4, 64, 64],
                  max_batch=1, spec=module_to_spec(conv), optimizer=SGD, **_state(conv))
    assert r.get("output_shape") == [4, 64, 64], r
    assert 0 < mode.largest < 4 * 64 * 64  # the weights were loaded; no record was computed


def test_a_dry_run_on_the_meta_device_still_refuses_too_few_classes() -> None:
    """The class check reads the dry run's shape: a loss segment with fewer outputs than the
    labels' classes (3) is refused as before."""
    host = _host()
    head = nn.Sequential(nn.Linear(4, 2))
    r = _call(host, "mo", "propose", role="loss", datasets=["train"], input_shape=[4],
              loss="cross_entropy", spec=module_to_spec(head), optimizer=SGD, **_state(head))
    assert r["error"] == "ConfigError" and "as many outputs as its datasets" in r["message"]


def _head(pid: str, head: nn.Module) -> dict[str, Any]:
    return {"segment": pid, "loss": "cross_entropy", "spec": module_to_spec(head),
            "optimizer": SGD, **_state(head)}


def test_auxiliary_heads_per_proposal_are_capped_across_a_restart(tmp_path: Path) -> None:
    """F2: each ``propose_local_loss`` replaced the pending proposal's head and dry-ran it,
    counted against the rate cap only: 18 s a call, 30 calls a minute, for ever. Now at most
    MAX_HEADS_PER_PROPOSAL heads per proposal (replacements included), also after a restart;
    a refused one leaves the head before it in place."""
    from syft_split.host.latency import MAX_HEADS_PER_PROPOSAL

    host = _host(tmp_path, max_proposals_per_minute=100)
    pid = _propose(host, nn.Sequential(nn.Linear(8, 4)))
    for i in range(MAX_HEADS_PER_PROPOSAL):
        head = nn.Sequential(nn.Linear(4, 3 + i))
        assert "error" not in _call(host, "mo", "propose_local_loss", **_head(pid, head))
    r = _call(host, "mo", "propose_local_loss", **_head(pid, nn.Sequential(nn.Linear(4, 3))))
    assert r["error"] == "ValidationError", r
    assert f"accepts {MAX_HEADS_PER_PROPOSAL} per proposal" in r["message"]
    latency: Any = host.families["local_loss"]
    assert latency.heads[pid].module[0].out_features == 3 + MAX_HEADS_PER_PROPOSAL - 1
    host.close()

    back = _host(tmp_path, max_proposals_per_minute=100)
    r = _call(back, "mo", "propose_local_loss", **_head(pid, nn.Sequential(nn.Linear(4, 3))))
    assert r["error"] == "ValidationError" and "per proposal" in r["message"]
    other = _propose(back, nn.Sequential(nn.Linear(8, 4)))  # a count per proposal
    assert "error" not in _call(back, "mo", "propose_local_loss",
                                **_head(other, nn.Sequential(nn.Linear(4, 3))))
    back.close()


def _cat_spec(names: int, inputs: int, name_len: int = 64) -> dict[str, Any]:
    x = "x" * name_len
    nodes = [{"name": f"n{i}", "op": "cat", "args": {"dim": 1}, "inputs": [x] * inputs}
             for i in range(names)]
    nodes.append({"name": "out", "op": "cat", "args": {"dim": 1},
                  "inputs": [f"n{i}" for i in range(names)]})
    return {"input": x, "output": "out", "nodes": nodes}


def test_a_spec_longer_than_max_spec_bytes_is_refused_naming_its_size() -> None:
    """F4: specs are kept verbatim in host.sspl's JSON header (at most 64 MiB); ~1 MiB specs
    from 3 accounts made it unsavable. A spec's JSON is now capped at propose (64 KiB by
    default): 4 cat nodes of 250 inputs named by 64 characters (~67 KB) are refused, with
    the size, and nothing is kept."""
    host = _host()
    spec = _cat_spec(4, 250)
    r = _call(host, "stranger", "propose", role="middle", datasets=[], input_shape=[1],
              spec=spec, optimizer=SGD)
    assert r["error"] == "ConfigError", r
    assert "bytes of JSON" in r["message"] and "65536" in r["message"]
    assert "max_spec_bytes" in r["message"]
    assert host.proposals() == []
    small = _host(max_spec_bytes=1024)  # the data owner's own cap, heads and fl too
    r = _call(small, "stranger", "propose", role="middle", datasets=[], input_shape=[1],
              spec=_cat_spec(1, 20), optimizer=SGD)
    assert r["error"] == "ConfigError" and "accepts at most 1024" in r["message"]


def test_a_cat_node_takes_at_most_256_inputs() -> None:
    """F4: a ``cat`` node took any number of inputs (one name listed 14,500 times)."""
    host = _host()
    ok = _call(host, "stranger", "propose", role="middle", datasets=[], input_shape=[1],
               spec=_cat_spec(1, 256, name_len=1), optimizer=SGD)
    assert ok.get("output_shape") == [256], ok
    r = _call(host, "stranger", "propose", role="middle", datasets=[], input_shape=[1],
              spec=_cat_spec(1, 257, name_len=1), optimizer=SGD)
    assert r["error"] == "ConfigError" and "takes 1 to 256 inputs, got 257" in r["message"]


def test_spec_bytes_count_against_max_pending_bytes() -> None:
    """F4: a proposal without weights held nothing ``max_pending_bytes`` counted, whatever
    its spec. Its spec's JSON counts now: room for two such proposals, not three."""
    from syft_split.host.records import spec_bytes

    spec = _cat_spec(1, 200, name_len=1)
    cost = spec_bytes(spec)
    host = _host(max_pending_bytes=2 * cost + cost // 2)
    for _ in range(2):
        r = _call(host, "mo", "propose", role="middle", datasets=[], input_shape=[1], spec=spec,
                  optimizer=SGD)
        assert "error" not in r, r
    r = _call(host, "mo", "propose", role="middle", datasets=[], input_shape=[1], spec=spec,
              optimizer=SGD)
    assert r["error"] == "ValidationError" and "weights and specs" in r["message"]
    assert len(host.proposals("pending")) == 2


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def test_a_pending_proposal_keeps_one_copy_of_its_weights(tmp_path: Path) -> None:
    """F5: a pending proposal kept its weights twice (as sent, and in its built module) while
    ``max_pending_bytes`` counted one copy (6 pending: 240 MB counted, 533 MiB of memory). Its
    state is now its module's tensors, also after a restart; approval copies it, so training
    leaves the initial weights as proposed."""
    host = _host(tmp_path)
    model = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4))
    sent = {k: v.clone() for k, v in spec_state(model).items()}
    pid = _propose(host, model)
    p = host.proposal(pid)
    assert p.module is not None
    own = p.module.state_dict()
    assert set(p.state) == set(own)
    assert all(_same_storage(p.state[k], own[k]) for k in own)
    host.close()

    back = _host(tmp_path)
    p = back.proposal(pid)
    assert p.module is not None
    own = p.module.state_dict()
    assert all(_same_storage(p.state[k], own[k]) and torch.equal(p.state[k], sent[k])
               for k in own)
    back.approve(pid)
    rt = back.runtimes[pid]
    with torch.no_grad():  # what training does to the module's weights
        rt.module[0].weight.add_(1.0)
    assert all(torch.equal(p.state[k], sent[k]) for k in sent)
    back.close()


def test_leakage_seconds_are_capped_per_segment_and_hour() -> None:
    """F6: ``leakage`` had no rate cap: each 67-byte call ran up to ``review_budget_s``
    (~30 s) of attacks, back to back. The seconds it takes per segment are now capped per
    hour (``HostLimits.leakage_seconds_per_hour``): with a tiny allowance the first call
    runs (within what is left) and the next is refused, audited with its reason."""
    host = _host(review_budget_s=0.5, leakage_seconds_per_hour=1e-3)
    pid = _propose(host, nn.Sequential(nn.Linear(8, 4)))
    host.approve(pid)
    first = _call(host, "mo", "leakage", segment=pid)
    assert "error" not in first and first["records"] > 0, first
    r = _call(host, "mo", "leakage", segment=pid)
    assert r["error"] == "ValidationError", r
    assert "leakage_seconds_per_hour" in r["message"] and "in the last hour" in r["message"]
    last = host.audit[-1]
    assert last.op == "leakage" and "leakage_seconds_per_hour" in last.outcome
    other = _propose(host, nn.Sequential(nn.Linear(8, 4)))  # each segment has its own
    host.approve(other)
    assert "error" not in _call(host, "mo", "leakage", segment=other)

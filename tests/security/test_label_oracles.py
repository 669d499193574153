"""Labels must not reach a malicious model owner through error messages or refusals.

A loss computed at the data owner (U-shaped loss segment, local-loss auxiliary head, a locally
trained federated model) on a head with fewer outputs than classes fails with torch's
``IndexError: Target <label> is out of bounds.``: the message is the record's label. The host
refuses such heads at proposal, and no unexpected exception's text leaves (only its type).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from syft_split import OptimizerSpec, wire
from syft_split.host.core import DataOwnerHost
from syft_split.host.records import Dataset, HostLimits
from syft_split.spec import module_to_spec, spec_state

SGD = OptimizerSpec("sgd", lr=0.1).to_json()
N, K = 32, 10


def call(host: DataOwnerHost, op: str, **f: Any) -> dict[str, Any]:
    return wire.decode(host.handle("mo", wire.encode({"op": op, **f})))


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {f"state/{k}": v for k, v in spec_state(m).items()}


def _host() -> tuple[DataOwnerHost, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    host = DataOwnerHost("do", limits=HostLimits(max_records_per_minute=10_000))
    y = torch.randint(0, K, (N,), generator=g)
    y[0] = K - 1  # the largest class is present
    host.add_dataset("train", torch.randn(N, 8, generator=g), y)
    return host, y


def _propose_loss(host: DataOwnerHost, head: nn.Module) -> dict[str, Any]:
    return call(host, "propose", role="loss", spec=module_to_spec(head), datasets=["train"],
                optimizer=SGD, input_shape=[12], loss="cross_entropy", **_state(head))


@pytest.mark.parametrize("width", [1, K - 1])
def test_a_cross_entropy_head_narrower_than_the_classes_is_refused(width: int) -> None:
    host, _ = _host()
    r = _propose_loss(host, nn.Linear(12, width))
    assert r.get("error") == "ConfigError", r
    assert "as many outputs as its datasets have classes" in r["message"]
    assert host.proposals() == []
    # the auxiliary head of a local loss, and a locally trained (federated) model
    seg = nn.Linear(8, 4)
    sid = call(host, "propose", role="input", spec=module_to_spec(seg), datasets=["train"],
               optimizer=SGD, **_state(seg))["segment"]
    aux = nn.Linear(4, width)
    r = call(host, "propose_local_loss", segment=sid, spec=module_to_spec(aux),
             loss="cross_entropy", optimizer=SGD, **_state(aux))
    assert r.get("error") == "ConfigError", r
    assert "as many outputs" in r["message"]
    model = nn.Linear(8, width)
    r = call(host, "fl_propose", spec=module_to_spec(model), datasets=["train"],
             optimizer=SGD, loss="cross_entropy", **_state(model))
    assert r.get("error") == "ConfigError", r
    assert "as many outputs" in r["message"]
    # wide enough: accepted
    assert "error" not in _propose_loss(host, nn.Linear(12, K))
    assert "error" not in call(host, "propose_local_loss", segment=sid,
                               spec=module_to_spec(nn.Linear(4, K)), loss="cross_entropy",
                               optimizer=SGD, **_state(nn.Linear(4, K)))


def test_an_unexpected_errors_text_stays_in_the_audit_log() -> None:
    """The reviewer's attack (one-logit loss head, one record per call: 64/64 labels read
    from the error messages) cannot be proposed any more; an error the host did not foresee
    (here: the data owner later adds a class the approved head has no output for) still
    leaves as its type only, its text kept in the data owner's audit entry."""
    host, y = _host()
    head = nn.Linear(12, K)
    pid = _propose_loss(host, head)["segment"]
    host.approve(pid)
    y2 = y.clone()
    y2[5] = 37
    host.datasets["train"] = Dataset(host.datasets["train"].features, y2)
    r = call(host, "loss_step", segment=pid, x=torch.zeros(1, 12), indices=torch.tensor([5]),
             train=False)
    assert r["error"] == "RemoteError"
    assert "IndexError" in r["message"] and "audit log" in r["message"]
    assert "37" not in r["message"] and "Target" not in r["message"]
    assert "Target 37 is out of bounds" in host.audit[-1].outcome
    # the same record with a valid label answers
    r = call(host, "loss_step", segment=pid, x=torch.zeros(1, 12), indices=torch.tensor([4]),
             train=False)
    assert "error" not in r and r["count"] == 1


# ------------------------------------------------ randomized response: one draw per record
def _released_host(state_dir: Any = None, y: torch.Tensor | None = None
                   ) -> tuple[DataOwnerHost, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=g)
    y = torch.randint(0, K, (64,), generator=g) if y is None else y
    host = DataOwnerHost("do", state_dir=state_dir)
    host.add_dataset("train", x, y)
    host.add_dataset("other", x, y)
    return host, x, y


def _propose_released(host: DataOwnerHost, seg: nn.Module, **defences: float) -> str:
    r = call(host, "propose", role="input", spec=module_to_spec(seg), datasets=["train", "other"],
             optimizer=SGD, release_labels=True,
             defences={"label_epsilon": 1.0, "num_classes": K, **defences}, **_state(seg))
    return str(r["segment"])


def test_repeated_releases_give_each_record_the_same_noisy_label(tmp_path: Any) -> None:
    """The reviewer's attack: 200 evaluation forwards on the same indices, majority vote, read
    100% of the labels (epsilon 1, 10 classes; each release promises 23.2%). Each record is
    now randomized once: every release, evaluation or training, before and after a restart,
    gives the same noisy label, and the vote reads what one release reads."""
    host, _, y = _released_host(tmp_path / "do")
    torch.manual_seed(0)
    seg = nn.Linear(8, 4)
    pid = _propose_released(host, seg)
    host.approve(pid)
    idx = torch.arange(64)
    first = call(host, "forward", segment=pid, indices=idx, train=False)["labels"]
    for _ in range(20):
        again = call(host, "forward", segment=pid, indices=idx, train=False)["labels"]
        assert torch.equal(again, first)
    # another order, another batch split, a training forward: the same label per record
    perm = torch.randperm(64)
    r = call(host, "forward", segment=pid, indices=perm[:16], train=True)
    assert torch.equal(r["labels"], first[perm[:16]])
    call(host, "discard", segment=pid)
    wrong = float((first != y).float().mean())
    assert 0.5 < wrong < 0.99  # flip probability 0.768 at epsilon 1, 10 classes
    # another dataset's records are their own (same rows and labels, independent draws)
    other = call(host, "forward", segment=pid, indices=idx, train=False, dataset="other")
    assert not torch.equal(other["labels"], first)
    host.close()
    again_host, _, _ = _released_host(tmp_path / "do")
    assert again_host.restore_state()
    r = call(again_host, "forward", segment=pid, indices=idx, train=False)
    assert torch.equal(r["labels"], first)
    again_host.close()


def test_every_segment_and_every_aligned_copy_releases_the_same_noisy_label(
        tmp_path: Any) -> None:
    """The key is the data owner's, not each segment's, and an aligned dataset's record is
    named as in its source: two approved label-releasing segments, or a record released
    through an aligned copy of its dataset, give no second draw to vote over."""
    host, _, _ = _released_host(tmp_path / "do")
    torch.manual_seed(0)
    pids = [_propose_released(host, nn.Linear(8, 4)) for _ in range(2)]
    for pid in pids:
        host.approve(pid)
    idx = torch.arange(64)
    first, second = (call(host, "forward", segment=pid, indices=idx, train=False)["labels"]
                     for pid in pids)
    assert torch.equal(first, second)
    rows = torch.randperm(64)[:40]
    host.datasets["aligned"] = host.datasets["train"].subset(rows, "train")
    r = call(host, "propose", role="input", spec=module_to_spec(nn.Linear(8, 4)),
             datasets=["aligned"], optimizer=SGD, release_labels=True,
             defences={"label_epsilon": 1.0, "num_classes": K}, **_state(nn.Linear(8, 4)))
    host.approve(str(r["segment"]))
    via = call(host, "forward", segment=str(r["segment"]), indices=torch.arange(40),
               train=False)["labels"]
    assert torch.equal(via, first[rows])
    key = host.label_key
    host.close()
    again, _, _ = _released_host(tmp_path / "do")
    assert again.restore_state() and again.label_key == key  # kept with the host's state
    assert torch.equal(call(again, "forward", segment=pids[1], indices=idx,
                            train=False)["labels"], first)
    again.close()


def test_activation_noise_is_not_predictable() -> None:
    """Each segment's noise stream is seeded from secret randomness at approval (it was
    seeded 0: a model owner reproduced the noise exactly and subtracted it)."""
    host, x, _ = _released_host()
    torch.manual_seed(0)
    seg = nn.Linear(8, 4)
    pids = [_propose_released(host, seg, noise_sigma=1.0) for _ in range(2)]
    for pid in pids:
        host.approve(pid)
    idx = torch.arange(8)
    clean = seg(x[idx]).detach()
    noise = [call(host, "forward", segment=pid, indices=idx, train=False)["activation"] - clean
             for pid in pids]
    guess = torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))
    for n in noise:
        assert float((n - guess).abs().max()) > 0.5
        assert 0.5 < float(n.std()) < 1.6
    assert float((noise[0] - noise[1]).abs().max()) > 0.5  # each segment its own stream


def test_activation_noise_does_not_repeat_after_a_crash(tmp_path: Any) -> None:
    """Evaluation forwards are not saved: a restored noise stream replayed the draws released
    since the last save, and two releases with the same noise gave the model owner a
    noise-free difference (found in review). The stream starts afresh after a restore."""
    host, x, _ = _released_host(tmp_path / "do")
    torch.manual_seed(0)
    seg = nn.Linear(8, 4)
    pid = _propose_released(host, seg, noise_sigma=1.0)
    host.approve(pid)
    a, b = torch.arange(0, 8), torch.arange(8, 16)
    out_a = call(host, "forward", segment=pid, indices=a, train=False)["activation"]
    crashed, _, _ = _released_host(tmp_path / "do")  # no close(): a new process restores
    assert crashed.restore_state()
    out_b = call(crashed, "forward", segment=pid, indices=b, train=False)["activation"]
    with torch.no_grad():
        noise_a, noise_b = out_a - seg(x[a]), out_b - seg(x[b])
    assert float((noise_a - noise_b).abs().max()) > 0.5


# ------------------------------------------- what the review says a malicious MO can read
def test_the_review_says_what_a_malicious_model_owner_reads() -> None:
    """U-shaped: one training loss step then discard returns every label of the batch; local
    loss: the auxiliary loss is a label oracle; noise averages out over releases; NoPeek is
    cancelled by a scaled gradient. The review says each, and the record-rate cap (none by
    default) that bounds it."""
    host, _ = _host()
    pid = _propose_loss(host, nn.Linear(12, K))["segment"]
    text = host.review(pid)
    assert "labels and outputs stay here" not in text
    assert "reads EVERY LABEL a call touches" in text
    assert "at most 10000 records a minute" in text
    seg = nn.Linear(8, 4)
    sid = call(host, "propose", role="input", spec=module_to_spec(seg), datasets=["train"],
               optimizer=SGD, defences={"nopeek": 1.0, "noise_sigma": 0.5},
               **_state(seg))["segment"]
    aux = nn.Linear(4, K)
    call(host, "propose_local_loss", segment=sid, spec=module_to_spec(aux),
         loss="cross_entropy", optimizer=SGD, **_state(aux))
    text = host.review(sid)
    assert "a malicious one reads the labels" in text
    assert "semi-honest model owner only" in text
    assert "averaged down to sigma/sqrt(n)" in text
    uncapped = DataOwnerHost("do")  # the default: no cap, and the review says to set one
    uncapped.add_dataset("train", host.datasets["train"].features, host.datasets["train"].labels)
    pid = _propose_loss(uncapped, nn.Linear(12, K))["segment"]
    assert "NO CAP, set it" in uncapped.review(pid)

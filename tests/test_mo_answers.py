"""The model owner checks what data owners answer (syft_split.answers): a malicious data owner
(a transport that rewrites one party's answers) gets a ValidationError that names it and the
field, and the model owner's weights, optimizer state and checkpoint never see the value."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from syft_split import HostLimits, OptimizerSpec, SplitPlan, SplitSession, Trainer, deploy, wire
from syft_split.answers import MAX_ABS_VALUE
from syft_split.checkpoint import Checkpoint
from syft_split.errors import (
    ConfigError,
    DTypeError,
    NonFiniteError,
    ShapeError,
    TransportError,
    ValidationError,
    error_from_wire,
)
from syft_split.local_loss import LocalLoss
from syft_split.report import RunReport
from syft_split.topology import RELEASED
from syft_split.transport.base import Transport, TransportWrapper

Craft = Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]
B = 8  # batch


class Rewrite(TransportWrapper):
    """``party``'s answers to ``op`` replaced by ``craft(request, answer)``."""

    def __init__(self, inner: Transport, party: str, op: str, craft: Craft) -> None:
        super().__init__(inner)
        self.party, self.op, self.craft = party, op, craft
        self.hits = 0

    def request(self, party: str, data: bytes) -> bytes:
        raw = self.inner.request(party, data)
        if party != self.party or wire.decode(data).get("op") != self.op:
            return raw
        answer = wire.decode(raw)
        if "error" in answer:
            return raw
        self.hits += 1
        return wire.encode(self.craft(wire.decode(data), answer))


def _data(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 16, generator=g), torch.randint(0, 4, (n,), generator=g)


def _plan(kind: str) -> SplitPlan:
    torch.manual_seed(0)
    first, mid, last = nn.Sequential(nn.Linear(16, 8), nn.ReLU()), nn.Linear(8, 8), nn.Linear(8, 4)
    if kind == "vanilla":
        return SplitPlan.vanilla([first, nn.Sequential(mid, last)], ["m"], datasets=["train"])
    if kind == "released":
        return SplitPlan.vanilla([first, nn.Sequential(mid, last)], ["m"], datasets=["train"],
                                 labels=RELEASED)
    if kind == "u_shaped":
        return SplitPlan.u_shaped([first, mid, last], ["m"], datasets=["train"])
    assert kind == "multi_hop"  # m's records, h runs the middle segment
    return SplitPlan.multi_hop([first, mid, last], ["m"], ["h"], datasets=["train"])


def _session(kind: str, party: str = "m", op: str = "forward",
             craft: Craft = lambda req, r: r, **kwargs: Any) -> tuple[SplitSession, Rewrite]:
    parties: dict[str, Any] = {"m": {"train": _data()}}
    if kind == "multi_hop":
        parties["h"] = {}
    dep = deploy.inprocess(parties)
    transport = Rewrite(dep.transport, party, op, craft)
    session = SplitSession(_plan(kind), transport, optimizer=OptimizerSpec("adam", lr=1e-2),
                           fuse=kind != "multi_hop", **kwargs)
    dep.approve_all(session.propose())
    return session, transport


def _weights(s: SplitSession) -> dict[str, torch.Tensor]:
    return {f"{i}.{k}": v.clone() for i, m in s.local.items() for k, v in m.state_dict().items()}


def _step(s: SplitSession, kind: str) -> float:
    idx = torch.arange(B)
    labels = _data()[1][idx] if kind in ("vanilla", "multi_hop") else None
    s.zero_grad()
    loss, _ = s.loss("m", idx, labels, dataset="train")
    loss.backward()
    s.step()
    return float(loss.detach())


def _refused(kind: str, party: str, op: str, craft: Craft, field: str,
             cls: type[ValidationError] = ValidationError, *,
             evaluate: bool = False) -> None:
    """The crafted answer is refused (``cls``, naming ``party`` and ``field``) and the model
    owner's weights and optimizer are as before."""
    s, transport = _session(kind, party, op, craft)
    before = _weights(s)
    with pytest.raises(cls) as caught:
        if evaluate:
            s.evaluate_batch("m", torch.arange(B), dataset="train")
        else:
            _step(s, kind)
    assert transport.hits == 1
    assert caught.value.party == party
    assert f"{party}'s answer to {op!r}" in str(caught.value)
    assert repr(field) in str(caught.value)
    after = _weights(s)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not opt.state for opt in s.optimizers)  # never stepped


def _act(f: Callable[[torch.Tensor], Any]) -> Craft:
    return lambda req, r: {**r, "activation": f(r["activation"])}


@pytest.mark.parametrize("craft, cls", [
    (_act(lambda a: torch.full_like(a, float("nan"))), NonFiniteError),
    (_act(lambda a: torch.full_like(a, float("inf"))), NonFiniteError),
    (_act(lambda a: torch.full_like(a, 3e38)), ValidationError),
    (_act(lambda a: a * 1e6 + 2e6), ValidationError),  # past the data owners' own bound
    (_act(lambda a: a.double()), DTypeError),
    (_act(lambda a: a.half()), DTypeError),
    (_act(lambda a: a.long()), DTypeError),
    (_act(lambda a: a[:3]), ShapeError),
    (_act(lambda a: "abc"), ValidationError),
    (lambda req, r: {k: v for k, v in r.items() if k != "activation"}, ValidationError),
], ids=["nan", "inf", "3e38", "past-bound", "float64", "float16", "int64", "rows", "str",
        "missing"])
def test_bad_activations_are_refused(craft: Craft, cls: type[ValidationError]) -> None:
    _refused("vanilla", "m", "forward", craft, "activation", cls)


def _labels(f: Callable[[torch.Tensor], Any]) -> Craft:
    return lambda req, r: {**r, "labels": f(r["labels"])}


@pytest.mark.parametrize("craft, cls", [
    (_labels(lambda y: torch.full_like(y, 10**9)), ValidationError),
    (_labels(lambda y: torch.full_like(y, -5)), ValidationError),
    (_labels(lambda y: torch.cat([y, y[:3]])), ShapeError),
    (_labels(lambda y: torch.full((len(y), 4), float("nan"))), NonFiniteError),
    (_labels(lambda y: y.to(torch.int32)), DTypeError),
    (_labels(lambda y: "abc"), ValidationError),
], ids=["huge", "negative", "rows", "nan_soft", "int32", "str"])
def test_bad_released_labels_are_refused(craft: Craft, cls: type[ValidationError]) -> None:
    _refused("released", "m", "forward", craft, "labels", cls)


def _field(name: str, f: Callable[[Any], Any]) -> Craft:
    return lambda req, r: {**r, name: f(r.get(name))}


def _without(name: str) -> Craft:
    return lambda req, r: {k: v for k, v in r.items() if k != name}


@pytest.mark.parametrize("craft, field, cls", [
    (_field("count", lambda c: 0), "count", ValidationError),
    (_field("count", lambda c: c + 1), "count", ValidationError),
    (_field("count", lambda c: True), "count", ValidationError),
    (_without("count"), "count", ValidationError),
    (_field("correct", lambda c: 10**6), "correct", ValidationError),
    (_field("correct", lambda c: -1), "correct", ValidationError),
    (_field("loss_sum", lambda v: torch.tensor(float("nan"))), "loss_sum", ValidationError),
    (_field("loss_sum", lambda v: "nan"), "loss_sum", ValidationError),
    (_without("loss_sum"), "loss_sum", ValidationError),
    (_field("grad_input", lambda g: torch.full_like(g, float("nan"))), "grad_input",
     NonFiniteError),
    (_field("grad_input", lambda g: torch.full_like(g, 1e30)), "grad_input", ValidationError),
    (_field("grad_input", lambda g: g.expand(3, *g.shape).contiguous()), "grad_input",
     ShapeError),
    (_field("grad_input", lambda g: torch.tensor(1.0)), "grad_input", ShapeError),
    (_without("grad_input"), "grad_input", ValidationError),
], ids=["count0", "count+1", "count-bool", "no-count", "correct-huge", "correct-negative",
        "loss-tensor-nan", "loss-str", "no-loss", "grad-nan", "grad-1e30", "grad-extra-dims",
        "grad-scalar", "no-grad"])
def test_bad_loss_steps_are_refused(craft: Craft, field: str, cls: type[ValidationError]) -> None:
    _refused("u_shaped", "m", "loss_step", craft, field, cls)


@pytest.mark.parametrize("craft, field", [
    (_field("correct", lambda c: 10**6), "correct"),
    (_field("count", lambda c: 0), "count"),
    (_field("loss_sum", lambda v: "inf"), "loss_sum"),
], ids=["correct", "count", "loss"])
def test_bad_evaluation_answers_are_refused(craft: Craft, field: str) -> None:
    _refused("u_shaped", "m", "loss_step", craft, field, evaluate=True)


@pytest.mark.parametrize("craft, cls", [
    (_without("grad_input"), ValidationError),
    (_field("grad_input", lambda g: torch.zeros(3)), ShapeError),
    (_field("grad_input", lambda g: g.expand(2, *g.shape).contiguous()), ShapeError),
    (_field("grad_input", lambda g: g.double()), DTypeError),
    (_field("grad_input", lambda g: torch.full_like(g, float("nan"))), NonFiniteError),
], ids=["missing", "shape", "extra-dims", "float64", "nan"])
def test_bad_middle_gradients_are_refused(craft: Craft, cls: type[ValidationError]) -> None:
    _refused("multi_hop", "h", "backward", craft, "grad_input", cls)


@pytest.mark.parametrize("segment", [b"\x00" * 64, "x" * 257, "", "id\n", 7],
                         ids=["bytes", "long", "empty", "unprintable", "int"])
def test_a_bad_segment_id_is_refused(segment: Any) -> None:
    with pytest.raises(ValidationError) as caught:
        _session("vanilla", "m", "propose", _field("segment", lambda s: segment))
    assert caught.value.party == "m" and "'segment'" in str(caught.value)


@pytest.mark.parametrize("figures", [{"records": "nan"}, {"records": [1, 2]},
                                     {f"f{i}": 1.0 for i in range(65)}, {"x" * 65: 1.0},
                                     {"records": 10**30}],
                         ids=["str", "list", "many", "long-name", "huge-int"])
def test_bad_leakage_figures_are_refused(figures: dict[str, Any]) -> None:
    s, _ = _session("vanilla", "m", "leakage", lambda req, r: figures)
    with pytest.raises(ValidationError) as caught:
        s.measure_leakage("train")
    assert caught.value.party == "m" and "'leakage'" in str(caught.value)


@pytest.mark.parametrize("figures", [{"reason": "x" * 1001}, {"step": [1]}, {"step": None}],
                         ids=["long-text", "list", "null"])
def test_bad_watch_figures_are_refused(figures: dict[str, Any]) -> None:
    s, _ = _session("vanilla", "m", "watch", lambda req, r: figures)
    with pytest.raises(ValidationError) as caught:
        s.watch_status()
    assert caught.value.party == "m" and "'watch'" in str(caught.value)


@pytest.mark.parametrize("schedule", ["pipelined", "local_loss"])
@pytest.mark.parametrize("field, craft", [
    ("activation", lambda r: {**r, "activation": torch.full_like(r["activation"], float("nan"))}),
    ("labels", lambda r: {**r, "labels": torch.full_like(r["labels"], 10**9)}),
], ids=["nan-activation", "huge-labels"])
def test_latency_tolerant_schedules_check_answers_too(
        schedule: str, field: str, craft: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    local = schedule == "local_loss"
    dep = deploy.inprocess({"m": {"train": _data()}})
    transport = Rewrite(dep.transport, "m", "local_forward" if local else "pipe_forward",
                        lambda req, r: craft(r))
    torch.manual_seed(0)
    plan = SplitPlan.vanilla([nn.Sequential(nn.Linear(16, 8), nn.ReLU()), nn.Linear(8, 4)], ["m"],
                             datasets=["train"], labels=RELEASED,
                             local_loss=LocalLoss(nn.Linear(8, 4)) if local else None)
    s = SplitSession(plan, transport, optimizer=OptimizerSpec("adam", lr=1e-2))
    dep.approve_all(s.propose(), **({"local_loss": True} if local else {}))
    trainer = Trainer(s, batch_size=B, progress=False, test_dataset=None, watch=False,
                      measure_leakage=False, gradient_delay=0 if local else 1)
    before = _weights(s)
    with pytest.raises(ValidationError) as caught:
        trainer.train_epoch(1)
    assert caught.value.party == "m" and repr(field) in str(caught.value)
    assert all(torch.equal(before[k], v) for k, v in _weights(s).items())
    assert all(not opt.state for opt in s.optimizers)


def test_a_nan_activation_never_reaches_the_checkpoint(tmp_path: Path) -> None:
    """With a checkpoint after every step, the refused step writes nothing: the saved weights
    are the model owner's last good ones (the initial ones here)."""
    s, _ = _session("vanilla", "m", "forward", _act(lambda a: torch.full_like(a, float("nan"))))
    before = _weights(s)
    trainer = Trainer(s, batch_size=B, progress=False, test_dataset=None, watch=False,
                      measure_leakage=False, labels={"m": {"train": _data()[1]}})
    with pytest.raises(NonFiniteError):
        trainer.fit(1, verbose=False, checkpoint_dir=tmp_path)
    tree = Checkpoint(tmp_path).load()
    assert tree is not None
    saved = {f"{i}.{k}": v for i, sd in tree["local"].items() for k, v in sd.items()}
    assert saved.keys() == before.keys()
    assert all(torch.equal(saved[k], before[k]) for k in before)


@pytest.mark.parametrize("kind", ["vanilla", "released", "u_shaped", "multi_hop"])
def test_honest_answers_pass(kind: str) -> None:
    """Control: through the same (identity) rewrite, honest answers train and evaluate."""
    s, transport = _session(kind, "h" if kind == "multi_hop" else "m",
                            {"vanilla": "forward", "released": "forward", "u_shaped": "loss_step",
                             "multi_hop": "backward"}[kind])
    before = _weights(s)
    losses = [_step(s, kind) for _ in range(3)]
    assert transport.hits >= 3 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert any(not torch.equal(before[k], v) for k, v in _weights(s).items())
    labels = None if kind in ("released", "u_shaped") else _data()[1][:B]
    m = s.evaluate_batch("m", torch.arange(B), labels, dataset="train")
    assert m.count == B and 0 <= m.correct <= B


def test_the_bound_is_the_hosts_default_and_can_be_raised() -> None:
    assert MAX_ABS_VALUE == HostLimits().max_abs_value
    big = _act(lambda a: a + 2e6)  # a data owner that raised its own HostLimits.max_abs_value
    s, _ = _session("vanilla", "m", "forward", big, max_abs_value=1e7)
    assert s.remote[("m", 0)].max_abs_value == 1e7
    _step(s, "vanilla")  # accepted
    inf = _act(lambda a: torch.full_like(a, float("inf")))
    s, _ = _session("vanilla", "m", "forward", inf, max_abs_value=float("inf"))  # no bound
    with pytest.raises(NonFiniteError):
        _step(s, "vanilla")  # but finite
    for bad in (0, -1.0, True, float("nan"), "1e6"):
        with pytest.raises(ConfigError, match="max_abs_value"):
            SplitSession(_plan("vanilla"), deploy.inprocess({"m": {"train": _data()}}).transport,
                         max_abs_value=bad)


def test_a_peer_error_text_is_clipped() -> None:
    exc = error_from_wire("TransportError", "\U0001F600" * 100_000)
    assert isinstance(exc, TransportError) and 1000 <= len(str(exc)) < 1100
    assert len(str(error_from_wire("x" * 10_000, "boom"))) < 200  # an unknown class name


def test_skips_keep_clipped_errors_and_only_the_latest() -> None:
    """A data owner that answers every forward with a huge error text, skipped each epoch:
    the report (saved in every checkpoint) keeps each text clipped, and 100 skips at most."""
    dep = deploy.inprocess({p: {"train": _data()} for p in ("a", "m")})
    mal = Rewrite(dep.transport, "m", "forward", lambda req, r: {
        "error": "TransportError", "message": "\U0001F600" * 50_000})
    plan = SplitPlan.vanilla([nn.Linear(16, 8), nn.Linear(8, 4)], ["a", "m"], datasets=["train"])
    s = SplitSession(plan, mal)
    dep.approve_all(s.propose())
    trainer = Trainer(s, batch_size=B, progress=False, test_dataset=None, watch=False,
                      measure_leakage=False, on_unreachable="skip",
                      labels={p: {"train": _data()[1]} for p in ("a", "m")})
    trainer.fit(2, verbose=False)
    skips = trainer.report.extra["unreachable"]
    assert [u["party"] for u in skips] == ["m", "m"]
    assert all(len(u["error"]) < 1100 for u in skips)
    report = RunReport(config={})
    for k in range(150):
        report.note_unreachable("m", k, 0, TransportError("x" * 5000))
    kept = report.extra["unreachable"]
    assert len(kept) == 100 and kept[0]["epoch"] == 50 and kept[-1]["epoch"] == 149
    assert all(len(u["error"]) < 1100 for u in kept)


def test_answers_are_checked_without_copies() -> None:
    """The checked activation is the decoded tensor itself (no copy of a large tensor)."""
    seen: list[torch.Tensor] = []
    s, _ = _session("vanilla")
    seg = s.remote[("m", 0)]
    original = seg._answer

    def spy(op: str, response: dict[str, Any]) -> Any:
        seen.append(response["activation"])
        return original(op, response)

    seg._answer = spy  # type: ignore[method-assign]
    act = seg.forward(indices=torch.arange(B), dataset="train", train=False)
    assert act is seen[0] and act.shape == (B, 8)


HONEST_LABELS = {  # what torch's losses take, released by an honest data owner (review R9)
    "ce_uint8": (lambda y: y.to(torch.uint8), "cross_entropy", 4),
    "ce_soft": (lambda y: torch.softmax(torch.randn(len(y), 4), 1), "cross_entropy", 4),
    "mse_int64": (lambda y: torch.randint(0, 5, (len(y), 1)), "mse", 1),
    "mse_float16": (lambda y: torch.randn(len(y), 1).half(), "mse", 1),
    "bce_float16": (lambda y: torch.randint(0, 2, (len(y), 1)).half(), "bce_with_logits", 1),
}


@pytest.mark.parametrize("case", list(HONEST_LABELS))
def test_released_labels_of_every_dtype_the_losses_take_train(case: str) -> None:
    """uint8 class indices, class probabilities, integer or float16 regression and binary
    targets were refused as a data owner's bad answer; they train as they did before."""
    make, loss, out = HONEST_LABELS[case]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 16, generator=g)
    y = make(torch.randint(0, 4, (16,), generator=g))
    dep = deploy.inprocess({"m": {"train": (x, y)}})
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, out))
    plan = SplitPlan.vanilla([model[:2], model[2:]], ["m"], datasets=["train"],
                             labels=RELEASED, loss=loss)
    session = SplitSession(plan, dep.transport)
    dep.approve_all(session.propose())
    report = Trainer(session, batch_size=8, progress=False, test_dataset=None,
                     measure_leakage=False, watch=False).fit(1, verbose=False)
    assert report.steps == 2 and math.isfinite(report.epochs[-1].train_loss)


def test_integer_binary_targets_are_the_data_owners_failure() -> None:
    """bce_with_logits takes float targets only: released int64 0/1 labels made torch raise
    in the model owner's step, which stopped a SplitFed run (review R10); they are refused
    with the answer, naming the data owner."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 16, generator=g), torch.randint(0, 2, (16, 1), generator=g)
    dep = deploy.inprocess({"m": {"train": (x, y)}})
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 1))
    plan = SplitPlan.vanilla([model[:2], model[2:]], ["m"], datasets=["train"],
                             labels=RELEASED, loss="bce_with_logits")
    session = SplitSession(plan, dep.transport)
    dep.approve_all(session.propose())
    with pytest.raises(DTypeError, match="labels"):
        Trainer(session, batch_size=8, progress=False, test_dataset=None,
                measure_leakage=False, watch=False).fit(1, verbose=False)

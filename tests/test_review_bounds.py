"""The review, the watch and the ``leakage`` op run a proposed segment within what the data
owner's size check assumed: at most the proposal's ``max_batch`` records per forward, the
activations they keep bounded, and a failure reported as a syft_split error."""

from __future__ import annotations

import torch

from syft_split import HostLimits, OptimizerSpec, leakage
from syft_split.deploy import inprocess
from syft_split.leakage import leakage_suite
from syft_split.spec import module_from_spec, spec_state

_SPEC = {"layers": [{"type": "Linear", "args": {"in_features": 16, "out_features": 12}},
                    {"type": "ReLU", "args": {}}]}


def _propose(max_batch: int, limits: HostLimits | None = None) -> tuple:
    torch.manual_seed(0)
    x, y = torch.rand(400, 16), torch.randint(0, 3, (400,))
    dep = inprocess({"h": {"train": (x, y)}},
                    limits=limits or HostLimits(review_budget_s=2.0, watch_every=1))
    st = spec_state(module_from_spec(_SPEC))
    r = dep.transport.call("h", "propose", role="input", spec=_SPEC, datasets=["train"],
                           max_batch=max_batch, optimizer=OptimizerSpec("sgd").to_json(),
                           **{f"state/{k}": v for k, v in st.items()})
    return dep, dep.owners["h"], r["segment"]


def _record_rows(module: torch.nn.Module) -> list[int]:
    seen: list[int] = []
    module.register_forward_pre_hook(lambda _m, args: seen.append(int(args[0].shape[0])))
    return seen


def test_review_watch_and_leakage_op_run_at_most_max_batch_rows() -> None:
    dep, host, seg = _propose(max_batch=4)
    seen = _record_rows(host.proposals_by_id[seg].module)
    review = host.review(seg)
    assert "leakage measured here on 128 of your records" in review  # measured, not refused
    assert "white-box inversion" in review and "learned decoder" in review
    # the dCor shown is the bias-corrected estimator, said where it is shown
    assert "distance correlation, bias-corrected" in review and "V-statistic" in review
    assert "dCor (bias-corrected)" in review
    assert seen and max(seen) <= 4  # the suite and the watch's baseline, incl. white-box autograd
    host.approve(seg)
    runtime = host.runtimes[seg]
    seen_rt = _record_rows(runtime.module)
    out = dep.transport.call("h", "forward", segment=seg, dataset="train",
                             indices=torch.arange(4))
    dep.transport.call("h", "backward", segment=seg, grad=torch.zeros_like(out["activation"]))
    dep.transport.call("h", "watch", segment=seg)
    r = dep.transport.call("h", "leakage", segment=seg, budget_s=1.0)
    assert r["records"] == 128 and 0 <= r["inversion_ratio"]
    assert len(seen_rt) > 10 and max(seen_rt) <= 4  # the step, watch re-measures, leakage op
    assert runtime.extra["watch"].history[-1]["step"] == 1  # the watch measured after the step


def test_suite_keeps_activations_within_memory_bytes() -> None:
    torch.manual_seed(0)
    wide = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 4096))
    mock, held = torch.rand(200, 16), torch.rand(128, 16)
    r = leakage_suite(wide, mock, held, budget_s=2.0, max_batch=8, memory_bytes=16 * 4096 * 60)
    assert r["n_held_out"] + r["n_mock"] <= 60 and r["memory_cut"]
    assert r["attacks"]["decoder"]["augment"] == 0
    assert "NOTE: the segment's outputs are large" in "\n".join(leakage.review_lines(r))


def test_segment_too_wide_to_measure_is_a_warning_not_a_crash() -> None:
    """A raw RuntimeError inside the attacks (here: out of memory) is reported in the review as
    leakage not measured (a ConfigError), not raised."""
    _dep, host, seg = _propose(max_batch=4)
    import syft_split.leakage as lk

    orig = lk.leakage_suite

    def boom(*a: object, **k: object) -> dict:
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory")

    lk.leakage_suite = boom  # type: ignore[assignment]
    try:
        review = host.review(seg)
    finally:
        lk.leakage_suite = orig
    assert "WARNING: leakage could not be measured on this segment: the leakage review failed" \
        in review and "RuntimeError" in review

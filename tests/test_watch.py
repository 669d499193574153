"""The live watch: a hijacking model owner is halted within the stated delay, an honest one is
never halted; bounds on measured figures halt with the figure named; the history is JSON."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from syft_split.datasets import digits_parties
from syft_split.errors import ConfigError, LeakageHaltError, ShapeError
from syft_split.leakage import LeakageWatch, Release, WatchBound, label_alignment
from syft_split.leakage.hijack import FeatureSpaceHijack, HonestModelOwner, SwitchingModelOwner, drive
from syft_split.leakage.watch import label_alignments
from syft_split.models import digits_cnn
from syft_split.split import split_model

STEPS = 40  # every run below has this many steps (about two demo epochs of one hospital)
WINDOW, DETECT_EVERY = 5, 5  # the watch's defaults
DELAY = WINDOW + DETECT_EVERY - 1  # the stated delay: a hijack from step s halts by step s + DELAY


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    d = digits_parties(2, seed=0, mock_records=200)[0]
    assert d.mock is not None
    return d.mock, d.x_train, d.y_train, d.x_test[:64]


def _run(data, owner_kind: str, *, seed: int = 0, switch: int = 0, bound: WatchBound | None = None,  # type: ignore[no-untyped-def]
         release: Release | None = None, every: int = 10) -> tuple[LeakageWatch, int]:
    mock, x, y, probe = data
    torch.manual_seed(seed)
    seg, rest = split_model(digits_cnn(), cuts=["pool1"])
    watch = LeakageWatch(WatchBound(), probe=probe, mock=mock, every=every, window=WINDOW,
                         detect_every=DETECT_EVERY, release=release or Release(labels=True))
    watch.bound = bound or WatchBound.relative(watch.baseline(seg))
    owner: object = HonestModelOwner(rest)
    if owner_kind == "fsha":
        hijacker = FeatureSpaceHijack(mock, (16, 4, 4), seed=seed)
        hijacker.pretrain(100)
        owner = hijacker if switch == 0 else SwitchingModelOwner(HonestModelOwner(rest), hijacker, switch)
    steps = drive(seg, torch.optim.Adam(seg.parameters(), lr=1e-2), owner, x, y, STEPS, seed=seed,
                  on_step=lambda s, xb, z, g, yb: watch.after_step(seg, s, grad=g, labels=yb))
    return watch, steps


def test_label_alignment() -> None:
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    aligned = torch.nn.functional.one_hot(y, 3).float() * torch.arange(1.0, 7.0)[:, None]  # norms differ
    assert label_alignment(aligned, y) == pytest.approx(1.0)
    assert label_alignment(torch.ones(6, 4), y) == pytest.approx(0.0, abs=1e-6)  # one direction for all
    assert label_alignment(torch.zeros(6, 4), y) is None
    assert label_alignment(aligned, torch.arange(6)) is None  # no same-label pair
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(b, 3, 2, generator=gen) for b in (6, 6, 4, 6)]
    labels = [torch.randint(0, 3, (b,), generator=gen) for b in (6, 6, 4, 6)]
    grads[1][2] = 0.0  # a record with no gradient drops out
    single = [label_alignment(g, y) for g, y in zip(grads, labels)]
    assert label_alignments(grads, labels) == pytest.approx(single, abs=1e-6)
    assert label_alignments(grads[:2], labels[:2]) == pytest.approx(single[:2], abs=1e-6)
    brute = []
    for g, y in zip(grads, labels):
        keep = g.flatten(1).norm(dim=1) > 0
        u = torch.nn.functional.normalize(g.flatten(1)[keep], dim=1)
        c, yy = u @ u.T, y[keep]
        same = (yy[:, None] == yy[None, :]) & ~torch.eye(len(yy), dtype=torch.bool)
        brute.append(float(c[same].mean() - c[yy[:, None] != yy[None, :]].mean()))
    assert single == pytest.approx(brute, abs=1e-6)


def test_hijacker_is_halted_and_honest_run_is_not(data) -> None:  # type: ignore[no-untyped-def]
    honest, steps = _run(data, "honest")
    assert steps == STEPS and not honest.halted
    honest.check()  # does not raise
    measured = [e for e in honest.report()["history"] if "inversion_ratio" in e]
    assert [e["step"] for e in measured] == [0, 10, 20, 30, 40]
    assert min(e["label_alignment"] for e in measured[1:]) > 0.3

    hijacked, steps = _run(data, "fsha")
    assert hijacked.halted and hijacked.halted_at is not None and hijacked.halted_at <= DELAY
    assert steps == hijacked.halted_at  # training stopped at the halt
    assert "training hijack suspected" in (hijacked.reason or "")
    with pytest.raises(LeakageHaltError, match="label alignment"):
        hijacked.check()
    report = hijacked.report()
    assert json.loads(json.dumps(report)) == report
    assert report["halted_at_step"] == hijacked.halted_at and report["history"][-1]["halted"]


def test_detector_records_every_median_it_compares(data) -> None:  # type: ignore[no-untyped-def]
    """The lowest median is over every window the detector judged (about every detect_every
    steps), not only those the history shows at measure steps; the last one is kept too (an
    FSHA run's is the one that halted it). Both survive a restart."""
    mock, _, _, probe = data
    watch = LeakageWatch(WatchBound(), probe=probe, mock=mock, every=1000, window=WINDOW,
                         detect_every=DETECT_EVERY, hijack_threshold=-1.0,
                         release=Release(labels=True))
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    aligned = torch.nn.functional.one_hot(y, 3).float() * torch.arange(1.0, 7.0)[:, None]  # 1.0
    flat = torch.ones(6, 3)  # alignment 0.0
    grads = [aligned] * 5 + [flat] * 3 + [aligned] * 12  # one window dips to a median of 0
    for step, g in enumerate(grads, 1):
        assert not watch.after_step(nn.Identity(), step, grad=g, labels=y)
    assert watch.history == []  # never measured: the history shows no alignment at all
    assert watch.median_min == pytest.approx(0.0, abs=1e-6)
    assert watch.median_last == pytest.approx(1.0)
    assert watch.report()["hijack_detector"]["median_min"] == watch.median_min
    again = LeakageWatch(WatchBound(), probe=probe, mock=mock)
    again.load_state(watch.state())
    assert (again.median_min, again.median_last) == (watch.median_min, watch.median_last)
    hijacked, _ = _run(data, "fsha")
    assert hijacked.median_last is not None and f"{hijacked.median_last:.3f}" in (hijacked.reason or "")


def test_hijacker_that_first_plays_honest_is_halted(data) -> None:  # type: ignore[no-untyped-def]
    watch, steps = _run(data, "fsha", switch=17, seed=1)
    assert watch.halted and 17 < steps <= 17 + DELAY


@pytest.mark.parametrize(("bound", "figure"), [
    (WatchBound(inversion_ratio=0.9, hijack=False), "inversion ratio"),
    (WatchBound(ssim=0.5, hijack=False), "SSIM"),
    (WatchBound(dcor=0.5, hijack=False), r"dCor \(bias-corrected\)"),
])
def test_bound_halts_naming_the_figure(data, bound: WatchBound, figure: str) -> None:  # type: ignore[no-untyped-def]
    watch, steps = _run(data, "honest", bound=bound, every=3)
    assert watch.halted and watch.halted_at == steps == 3
    with pytest.raises(LeakageHaltError, match=figure):
        watch.check()
    n = len(watch.history)
    assert watch.after_step(nn.Identity(), 4) and len(watch.history) == n  # halted: nothing more runs


def test_detector_needs_released_labels(data) -> None:  # type: ignore[no-untyped-def]
    mock, _, _, probe = data
    assert not LeakageWatch(WatchBound(), probe=probe, mock=mock, release=Release()).hijack_applicable
    weak = Release(labels=True, label_epsilon=1.0, num_classes=10)
    assert not LeakageWatch(WatchBound(), probe=probe, mock=mock, release=weak).hijack_applicable
    strong = Release(labels=True, label_epsilon=4.0, num_classes=10)
    assert LeakageWatch(WatchBound(), probe=probe, mock=mock, release=strong).hijack_applicable
    watch, steps = _run(data, "fsha", release=Release(), bound=WatchBound(), every=20)
    assert not watch.halted and steps == STEPS  # no labels: only the leakage bound guards
    assert watch.report()["hijack_detector"]["applicable"] is False


def test_watch_measures_released_values(data) -> None:  # type: ignore[no-untyped-def]
    mock, _, _, probe = data
    torch.manual_seed(0)
    seg = split_model(digits_cnn(), cuts=["pool1"])[0]
    exact = LeakageWatch(WatchBound(), probe=probe, mock=mock).baseline(seg)
    noisy = LeakageWatch(WatchBound(), probe=probe, mock=mock, release=Release(noise_sigma=1.0)).baseline(seg)
    assert noisy["inversion_ratio"] > 2 * exact["inversion_ratio"]
    assert noisy["dcor"] < exact["dcor"]
    relative = WatchBound.relative(exact, factor=0.5)
    assert relative.inversion_ratio == pytest.approx(0.5 * exact["inversion_ratio"]) and relative.hijack


def test_watch_validates(data) -> None:  # type: ignore[no-untyped-def]
    mock, _, _, probe = data
    for bad in ({"every": 0}, {"window": 0}, {"detect_every": 0}, {"hijack_threshold": 2.0}):
        with pytest.raises(ConfigError):
            LeakageWatch(WatchBound(), probe=probe, mock=mock, **bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        LeakageWatch(None, probe=probe, mock=mock)  # type: ignore[arg-type]
    with pytest.raises(ShapeError):
        LeakageWatch(WatchBound(), probe=probe[:, :, :4], mock=mock)
    for bad_bound in ({"ssim": 1.5}, {"dcor": -0.1}, {"inversion_ratio": float("nan")}, {"hijack": 1}):
        with pytest.raises(ConfigError):
            WatchBound(**bad_bound)  # type: ignore[arg-type]


def test_watch_state_round_trips_and_a_bad_state_changes_nothing(data) -> None:  # type: ignore[no-untyped-def]
    """A watch goes on from its state (what a restarted data owner loads) exactly as the
    original does; a bad state is refused with ConfigError and the watch is left as it was."""
    mock, _, _, probe = data
    torch.manual_seed(0)
    seg = split_model(digits_cnn(), cuts=["pool1"])[0]

    def fresh() -> LeakageWatch:
        return LeakageWatch(WatchBound(), probe=probe, mock=mock, every=2,
                            release=Release(labels=True, noise_sigma=0.5))

    watch = fresh()
    watch.bound = WatchBound.relative(watch.baseline(seg), factor=0.5)
    g = torch.Generator().manual_seed(0)
    batch = [(torch.randn(8, 16, 4, 4, generator=g), torch.randint(0, 10, (8,), generator=g))
             for _ in range(4)]
    for step, (grad, y) in enumerate(batch[:3], 1):
        watch.after_step(seg, step, grad=grad, labels=y)
    back = fresh()
    back.load_state(watch.state())
    for w in (watch, back):
        w.after_step(seg, 4, grad=batch[3][0], labels=batch[3][1])
    got, want = back.report(), watch.report()
    assert got.pop("seconds") >= 0 and want.pop("seconds") >= 0
    strip = [{k: v for k, v in e.items() if k != "seconds"} for e in want.pop("history")]
    assert [{k: v for k, v in e.items() if k != "seconds"} for e in got.pop("history")] == strip
    assert got == want and back.bound == watch.bound and len(strip) == 3  # steps 0, 2, 4

    other = fresh()
    for bad in ({**watch.state(), "bound": {"dcor": 2.0}}, {**watch.state(), "every": 0},
                {**watch.state(), "gen": torch.zeros(3)}, {**watch.state(), "pending": [1]},
                {**watch.state(), "halted": "no"}, None):
        with pytest.raises(ConfigError, match="watch state"):
            other.load_state(bad)  # type: ignore[arg-type]
    assert other.history == [] and other.bound == WatchBound() and other.steps_seen == 0


def test_weights_that_make_the_figures_nan_are_past_every_bound() -> None:
    """A model owner's lr=1e30 blew the weights up: the figures were NaN, and `NaN < bound` is
    never true, so the watch never halted."""
    from syft_split import DataOwnerHost, wire
    from syft_split.host.records import HostLimits
    from syft_split.spec import module_to_spec, spec_state

    def call(**req: object) -> dict[str, object]:
        return dict(wire.decode(host.handle("mo@example.org", wire.encode(req))))

    host = DataOwnerHost("a", limits=HostLimits(watch_every=1))
    g = torch.Generator().manual_seed(0)
    host.add_dataset("train", torch.randn(64, 4, generator=g), torch.randint(0, 2, (64,), generator=g))
    m = nn.Sequential(nn.Linear(4, 3))
    pid = str(call(op="propose", role="input", datasets=["train"], spec=module_to_spec(m),
                   optimizer={"name": "sgd", "lr": 1e30},
                   **{f"state/{k}": v for k, v in spec_state(m).items()})["segment"])
    host.approve(pid, leakage_bound={"inversion_ratio": 0.99, "hijack": False})
    call(op="forward", segment=pid, indices=torch.arange(4), step=1)
    call(op="backward", segment=pid, grad=torch.full((4, 3), 1e6), step=2)
    watch = host.runtimes[pid].extra["watch"]
    assert watch.latest["inversion_ratio"] != watch.latest["inversion_ratio"]  # NaN
    assert host.proposals_by_id[pid].status == "halted"
    r = call(op="forward", segment=pid, indices=torch.arange(4), step=3)
    assert r["error"] == "LeakageHaltError", r


def test_the_history_kept_is_bounded(data) -> None:  # type: ignore[no-untyped-def]
    """Every measure went into the history, saved with the segment: ~190k steps of a watched
    segment made its state unsavable. The baseline and the newest MAX_HISTORY - 1 are kept;
    the state and the report say how many were dropped; an older, longer history loads."""
    from syft_split.leakage.watch import MAX_HISTORY

    mock, _, _, probe = data
    torch.manual_seed(0)
    seg = split_model(digits_cnn(), cuts=["pool1"])[0]
    watch = LeakageWatch(WatchBound(hijack=False), probe=probe, mock=mock, every=1)
    base = watch.baseline(seg)
    state = watch.state()
    state["history"] = [base] + [{**base, "step": s} for s in range(1, MAX_HISTORY + 50)]
    back = LeakageWatch(WatchBound(hijack=False), probe=probe, mock=mock, every=1)
    back.load_state(state)
    assert len(back.history) == MAX_HISTORY and back.history_dropped == 50
    back.after_step(seg, MAX_HISTORY + 50)
    assert len(back.history) == MAX_HISTORY and back.history_dropped == 51
    assert back.history[0]["step"] == 0 and back.history[-1]["step"] == MAX_HISTORY + 50
    assert back.report()["history_dropped"] == 51 and back.state()["history_dropped"] == 51

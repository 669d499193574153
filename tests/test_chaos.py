"""Two real HTTP datasites with their state on disk, shared by two tests:

- chaos: datasites are SIGKILLed and restarted three times and the model owner's process once,
  at random steps (once a datasite and the model owner together); the run completes with the
  weights of an uninterrupted run. Its summary goes to the test's tmp_path, and to
  bench/results/chaos.json when SYFT_SPLIT_RECORD=1 (``make chaos``). The same run
  HE-protected (level A; two epochs, not three), with the model owner's process SIGKILLed,
  then one datasite (at random steps): the resumed model owner fetches every data owner's
  public key again, the restarted datasite makes fresh keys, which the model owner fetches,
  and the run still ends where an uninterrupted protected run ends (CKKS noise apart).
- stall: a datasite is SIGSTOPped (a 150 s stall, cut short): its call fails with
  CallTimeoutError naming it within the timeout + 1 s, training goes on with the other one,
  and after SIGCONT its timed-out request is settled (applied once) and it trains again.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from syft_split import persist
from syft_split.checkpoint import Checkpoint
from syft_split.deploy import Deployment, inprocess
from syft_split.errors import CallTimeoutError
from syft_split.transport.base import CallPolicy
from syft_split.transport.pysyft import deployment

from .chaos_model_owner import PARTIES, chaos_data, chaos_epochs, chaos_session, chaos_trainer

pytestmark = pytest.mark.pysyft

SCRIPT = Path(__file__).with_name("chaos_model_owner.py")
RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results" / "chaos.json"
SEED = 2026
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Deployment, float]]:
    """Two persistent HTTP datasites (and the seconds their launch took)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        dep = deployment(chaos_data(), http=True, name_prefix="chaos",
                         state_dir=tmp_path_factory.mktemp("sites"))
    try:
        yield dep, time.perf_counter() - t0
    finally:
        dep.close()


def _reference(he: bool) -> dict[str, Any]:
    """The same run, uninterrupted, in process."""
    dep = inprocess(chaos_data())
    session = chaos_session(dep.transport, he=he)
    dep.approve_all(session.propose())
    report = chaos_trainer(session).fit(chaos_epochs(he), verbose=False)
    session.flush()
    segs = {f"{p}:{i}": seg.segment_id for (p, i), seg in session.remote.items()}
    return {
        "steps": report.steps,
        "local": {str(i): m.state_dict() for i, m in session.local.items()},
        "owners": {k: dep.owners[k.split(":")[0]].export_weights(sid) for k, sid in segs.items()},
        "owner_steps": {k: dep.owners[k.split(":")[0]].runtimes[sid].steps  # type: ignore[attr-defined]
                        for k, sid in segs.items()},
    }


class ModelOwner:
    """The model owner's process: started, SIGKILLed, started again (it resumes)."""

    def __init__(self, urls: dict[str, str], email: str, password: str, work: Path,
                 he: bool = False) -> None:
        self.args = [sys.executable, "-u", str(SCRIPT), *[f"--url={p}={u}" for p, u in urls.items()],
                     f"--email={email}", f"--password={password}",
                     f"--checkpoint={work / 'checkpoint'}", f"--out={work}",
                     *(["--he"] if he else [])]
        self.work = work
        self.checkpoint = Checkpoint(work / "checkpoint")
        self.starts = 0
        self.proc: subprocess.Popen[bytes] | None = None
        #: when each step was first seen done (from the test's clock)
        self.seen: dict[int, float] = {}
        self.started: dict[int, float] = {}
        self.start()

    def start(self) -> None:
        self.starts += 1
        self.started[self.starts] = time.time()
        log = open(self.work / f"model_owner.{self.starts}.log", "wb")
        env = {**os.environ, "TQDM_DISABLE": "1"}
        self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, env=env)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def startup(self, n: int) -> dict[str, float]:
        """Seconds from start ``n`` of the process to each mark it logged."""
        text = (self.work / f"model_owner.{n}.log").read_text(errors="replace")
        marks = re.findall(r"^(imported|connected|proposed|training) (?:at|from) ([0-9.]+)$",
                           text, re.M)
        return {k: round(float(t) - self.started[n], 2) for k, t in marks}

    def log_tail(self) -> str:
        return (self.work / f"model_owner.{self.starts}.log").read_text(errors="replace")[-3000:]

    def steps(self) -> int:
        """Training steps done, as its last checkpoint says (atomically replaced: never torn)."""
        tree = self.checkpoint.load() if self.checkpoint.exists() else None
        done = int(tree["report"]["steps"]) if tree is not None else 0
        self.seen.setdefault(done, time.perf_counter())
        return done

    def step_seconds(self, done: int) -> float:
        """How long step ``done`` took, as this test saw it (0.4 s when not seen)."""
        if done in self.seen and done - 1 in self.seen:
            return min(0.4, self.seen[done] - self.seen[done - 1])
        return 0.4

    def wait_steps(self, target: int, patience: float = 150.0) -> int:
        deadline = time.monotonic() + patience
        while (done := self.steps()) < target:
            if not self.alive():
                code = self.proc.returncode if self.proc else None
                raise AssertionError(f"the model owner exited ({code}):\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no progress past step {done}:\n{self.log_tail()}")
            time.sleep(0.1)
        return done


def _approve_when_proposed(dep: Any, mo: ModelOwner, patience: float = 120.0) -> None:
    deadline = time.monotonic() + patience
    pending: dict[str, list[Any]] = {}
    while len(pending) < len(PARTIES):
        for party in PARTIES:
            if party not in pending and (found := dep.owners[party].proposals("pending")):
                pending[party] = found
        if not mo.alive() or time.monotonic() > deadline:
            raise AssertionError(f"no proposals arrived:\n{mo.log_tail()}")
        time.sleep(1.0)  # each look is an admin call through the datasite: not too often
    for party, proposals in pending.items():
        for p in proposals:
            assert "Conv2d" in dep.owners[party].review(p.id)
            dep.owners[party].approve(p.id)


@pytest.mark.slow
@pytest.mark.parametrize("he", [False, True], ids=["plain", "he"])
def test_chaos_run_equals_uninterrupted_run(sites: tuple[Deployment, float],
                                            tmp_path: Path, he: bool) -> None:
    dep, launch_s = sites
    t_run = time.perf_counter()
    rng = random.Random(SEED + he)
    want = _reference(he)
    total = want["steps"]
    phases = {"reference_run": time.perf_counter() - t_run}
    # plain: three datasite crashes (each party at least once) and one model-owner crash, at
    # random distinct steps in random order; the model owner crashes together with a datasite.
    # HE: the model owner crashes, then one datasite, apart: each new key is then fetched on
    # its own (two more datasite restarts would show nothing new); after each crash the run
    # goes on until the process has called every party (round robin: one step each)
    kinds: list[list[tuple[str, str | None]]] = (
        [[("model_owner", None)], [("site", rng.choice(PARTIES))]] if he else
        [[("site", "a")], [("site", "b")], [("site", rng.choice(PARTIES)), ("model_owner", None)]])
    if not he:
        rng.shuffle(kinds)
    # in the first half of the run: a fast machine must not finish before the last crash
    at_steps = sorted(rng.sample(range(2, total // 2), len(kinds)))
    mo: ModelOwner | None = None
    events: list[dict[str, Any]] = []
    try:
        t: Any = dep.transport
        user = t.user_on("a")
        urls = {p: f"http://127.0.0.1:{t.datasites[p].port}" for p in PARTIES}
        t0 = time.perf_counter()
        t_start = time.time()
        mo = ModelOwner(urls, user, t.datasites["a"].passwords[user], tmp_path, he)
        _approve_when_proposed(dep, mo)
        phases["model_owner_start_to_proposals_approved"] = time.perf_counter() - t0
        mo.wait_steps(1)
        phases["approved_to_first_step"] = time.perf_counter() - t0 - sum(list(phases.values())[1:])
        for crashes, at in zip(kinds, at_steps):
            done = mo.wait_steps(at)
            time.sleep(rng.uniform(0.0, mo.step_seconds(done)))  # land anywhere inside a step
            before = mo.steps()
            assert before < total, f"the run ended before the crash planned at step {at}"
            t_kill = time.perf_counter()
            restart_s = 0.0
            for kind, party in crashes:
                if kind == "model_owner":  # SIGKILL; the new process starts meanwhile
                    mo.kill()
                    mo.start()
                else:
                    restart_s = t.datasites[party].restart(crash=True)
            mo.wait_steps(before + (len(PARTIES) if he else 1))
            events.append({"crashed": [k if p is None else f"datasite {p}" for k, p in crashes],
                           "at_step": before, "datasite_restart_s": round(restart_s, 2),
                           "recovery_s": round(time.perf_counter() - t_kill, 2)})
        assert mo.proc is not None
        t0 = time.perf_counter()
        assert mo.proc.wait(timeout=300) == 0, mo.log_tail()
        phases["last_event_to_exit"] = time.perf_counter() - t0
        final = persist.load(tmp_path / "final.sspl")

        # the same weights everywhere as the uninterrupted run
        diffs = [float((final["local"][k][n] - v).abs().max())
                 for k, state in want["local"].items() for n, v in state.items()]
        got_steps = {}
        for key, sid in final["segments"].items():
            got = dep.owners[key.split(":")[0]].export_weights(sid)
            diffs += [float((got[n] - v).abs().max()) for n, v in want["owners"][key].items()]
            got_steps[key] = final["owner_status"][key]["steps"]
        steps_lost = sum(want["owner_steps"].values()) - sum(got_steps.values())
        mo.wait_steps(total)
        crashed_at = {e["at_step"] for e in events}
        step_s = sorted(mo.seen[k + 1] - mo.seen[k] for k in range(1, total)
                        if k in mo.seen and k + 1 in mo.seen and k not in crashed_at)
        max_diff = max(diffs)
        flat = [k for crashes in kinds for k, _ in crashes]
        summary = {
            "description": "HTTP run over two PySyft datasites (vanilla split CNN, Adam, round "
                           "robin, fused steps); datasites SIGKILLed and restarted from their "
                           "state directories, the model owner's process SIGKILLed and resumed "
                           "from its checkpoint, at random steps",
            "seed": SEED,
            "crashes": {"datasite": flat.count("site"), "model_owner": flat.count("model_owner")},
            "events": events,
            "steps_total": total,
            "steps_lost": steps_lost,
            "max_abs_weight_diff": max_diff,
            "tolerance": TOLERANCE,
            "model_owner_starts": mo.starts,
            "model_owner_resumed": final["resumed"],
            "model_owner_retries_last_process": final["retries"],
            "step_s_median_without_crash": round(step_s[len(step_s) // 2], 3) if step_s else None,
            "datasite_launch_s": round(launch_s, 2),
            "wall_s_after_launch": round(time.perf_counter() - t_run, 2),
            "phases_s": {k: round(v, 2) for k, v in phases.items()},
            "model_owner_startup_s": {str(n): mo.startup(n) for n in mo.started},
            "machine": "2 shared cores, loaded by parallel jobs: seconds are indicative",
        }
        text = json.dumps(summary, indent=2) + "\n"
        (tmp_path / "chaos.json").write_text(text)
        # the plain run's summary is the recorded one (the protected one asserts the same
        # outcomes); only on request, so that `make test` leaves the tree clean
        if not he and os.environ.get("SYFT_SPLIT_RECORD") == "1":
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            RESULTS.write_text(text)
        assert flat.count("site") == (1 if he else 3) and mo.starts == 2
        assert steps_lost == 0, f"{steps_lost} steps lost in {len(flat)} crashes"
        if he:  # each model-owner process fetched every party's key once, and the running one
            # fetched it again after the party's datasite restarted with fresh keys
            for party in PARTIES:
                fetched = [e for e in dep.owners[party].audit() if e.op == "he_context"
                           and e.outcome == "ok" and e.time >= t_start]
                restarts = sum(1 for c in kinds for k, p in c if k == "site" and p == party)
                assert len(fetched) >= mo.starts + restarts, (party, len(fetched), restarts)
        assert max_diff <= TOLERANCE, f"weights differ by {max_diff}"
    finally:
        if mo is not None and mo.alive():
            mo.kill()


def test_stalled_datasite_times_out_and_training_goes_on(sites: tuple[Deployment, float]) -> None:
    dep, _ = sites
    t: Any = dep.transport
    timeout = 4.0  # short, but not so short that a loaded machine's ordinary call trips it
    t.policy = CallPolicy(timeout=60.0, retries=3)
    session = chaos_session(t)
    dep.approve_all(session.propose())
    t.policy = CallPolicy(timeout=timeout, retries=0)
    trainer = chaos_trainer(session)
    trainer.on_unreachable = "skip"
    pid = t.datasites["b"].pid
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.perf_counter()
        with pytest.raises(CallTimeoutError, match="b did not answer") as err:
            t.call("b", "describe")
        assert time.perf_counter() - t0 <= timeout + 1.0
        assert err.value.party == "b"
        report = trainer.fit(1, verbose=False)
    finally:
        os.kill(pid, signal.SIGCONT)
    [event] = report.extra["unreachable"]
    assert event["party"] == "b" and "CallTimeoutError" in event["error"]
    assert report.steps == 4  # a's batches; b's are reported, not silently lost
    seg_b = session.remote[("b", 0)]
    assert seg_b.unsettled is not None and seg_b.unsettled["op"] == "forward"
    report = trainer.fit(1, verbose=False)  # b is back: its request is settled, it trains
    assert report.extra["unreachable"] == [event] and report.steps == 4 + 8
    info = t.call("b", "status", segment=seg_b.segment_id)
    assert info["steps"] == 4 and info["last_step"] == seg_b.next_step - 1

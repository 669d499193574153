"""Benchmark: the cost of the data owner's guard, and of secure aggregation in SplitFed.

1. Step time with the host as it is now (one egress guard, op families, ingress bounds) vs the
   code path before the restructure (commit ``02db73c``: one ``host.py``). The old tree is
   extracted with ``git archive`` into a temporary folder (no worktree is registered) and both
   trees run the same script in child processes, alternating old/new ``--repeats`` times so
   both see the same machine load. Each child trains a vanilla split CNN (8x8 inputs, batch
   128, Conv-ReLU-MaxPool at the data owner, the rest at the model owner, SGD) through the
   in-process transport (serialised; no network noise) and reports the median step time and
   the median time spent inside the host per step (its audit). ``ratio_step`` and
   ``ratio_host`` are medians over the children of new / old; goal: ratio_step <= 1.05.
2. SplitFed averaging per round, 2 data owners: the old path (the model owner exports each
   data owner's weights, averages them and imports the average into each) vs secure
   aggregation now (each data owner seals pairwise-masked contributions for the other; each
   verifies and sums), for a 260-parameter and a 1M-parameter segment.

torch uses one intra-op thread. Numbers come from a shared 2-core machine whose load varies
(``load_avg_1min`` is recorded at the start); ratios of alternating runs are the meaningful
part. Writes ``bench/results/guard.json`` (``--quick``: ``guard_quick.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OLD_COMMIT = "02db73c"
BATCH = 128


# ------------------------------------------------------------------------ child side
def _child_step(steps: int) -> dict[str, float]:
    import torch
    import torch.nn.functional as F

    from syft_split import OptimizerSpec, SplitPlan, SplitSession, split_model
    from syft_split.deploy import inprocess
    from syft_split.models import digits_cnn

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(1024, 1, 8, 8, generator=g), torch.randint(0, 10, (1024,), generator=g)
    dep = inprocess({"h": {"train": (x, y)}})
    torch.manual_seed(0)
    plan = SplitPlan.vanilla(split_model(digits_cnn(), "pool1"), "h", datasets=["train"])
    session = SplitSession(plan, dep.transport, optimizer=OptimizerSpec("sgd", lr=0.05))
    dep.approve_all(session.propose())
    host: Any = dep.owners["h"]
    times, host_times = [], []
    for k in range(steps + 20):
        idx = torch.randint(0, 1024, (BATCH,), generator=g)
        n_audit = len(host.audit)
        t0 = time.perf_counter()
        session.zero_grad()
        loss = F.cross_entropy(session.forward("h", idx, dataset="train"), y[idx])
        loss.backward()
        session.step()
        dt = time.perf_counter() - t0
        if k >= 20:
            times.append(dt)
            host_times.append(sum(e.seconds for e in host.audit[n_audit:]))
    return {"step_s": statistics.median(times), "host_s": statistics.median(host_times)}


def _child_average(rounds: int, width: int) -> dict[str, float]:
    import torch
    from torch import nn

    from syft_split import SplitPlan, SplitSession, schedules
    from syft_split.deploy import inprocess

    secure = hasattr(schedules, "SecureAverage")
    g = torch.Generator().manual_seed(0)
    parties = {p: {"train": (torch.randn(64, 1, 8, 8, generator=g),
                             torch.randint(0, 10, (64,), generator=g))} for p in ("a", "b")}
    dep = inprocess(parties)
    torch.manual_seed(0)
    first = nn.Sequential(nn.Flatten(), nn.Linear(64, width))
    plan = SplitPlan.vanilla([first, nn.Linear(width, 10)], ["a", "b"], datasets=["train"],
                             share_weights="peer" if secure else "model_owner")
    session = SplitSession(plan, dep.transport)
    dep.approve_all(session.propose())
    if secure:
        dep.trust_each_other()
        average: Any = schedules.SecureAverage(session)
    else:
        def average(sources: list[str], weights: list[float]) -> None:
            schedules.average_segments(session, sources, weights)
    times = []
    for k in range(rounds + 2):
        t0 = time.perf_counter()
        average(["a", "b"], [32.0, 32.0])
        if k >= 2:
            times.append(time.perf_counter() - t0)
    params = sum(p.numel() for p in first.parameters())
    return {"round_s": statistics.median(times), "params": float(params)}


def child(args: argparse.Namespace) -> None:
    sys.path.insert(0, args.tree)
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("TQDM_DISABLE", "1")
    import syft_split

    assert Path(syft_split.__file__).resolve().is_relative_to(Path(args.tree).resolve())
    out = (_child_step(args.steps) if args.child == "step"
           else _child_average(args.rounds, args.width))
    print(json.dumps(out))


# ----------------------------------------------------------------------- parent side
def old_tree(dest: Path) -> Path:
    """The syft_split and he_layers packages of OLD_COMMIT, extracted with git archive."""
    raw = subprocess.run(["git", "-C", str(ROOT), "archive", OLD_COMMIT, "syft_split",
                          "he_layers"], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(raw)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def run_child(tree: Path, *extra: str) -> dict[str, float]:
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", PYTHONPATH=str(tree))
    res = subprocess.run([sys.executable, __file__, "--tree", str(tree), *extra], env=env,
                         check=True, capture_output=True, text=True, cwd=str(tree))
    return json.loads(res.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def alternate(old: Path, new: Path, repeats: int, *extra: str) -> dict[str, list[dict[str, float]]]:
    runs: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
    for k in range(repeats):
        order = [("old", old), ("new", new)] if k % 2 == 0 else [("new", new), ("old", old)]
        for name, tree in order:
            runs[name].append(run_child(tree, *extra))
    return runs


def med(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--child", choices=["step", "average"])
    parser.add_argument("--tree", default=str(ROOT))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--width", type=int, default=4)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    repeats, steps = (3, 60) if args.quick else (args.repeats, args.steps)
    result: dict[str, Any] = {"old_commit": OLD_COMMIT, "batch": BATCH, "torch_threads": 1,
                              "load_avg_1min": round(os.getloadavg()[0], 2),
                              "repeats": repeats, "steps_per_child": steps}
    with tempfile.TemporaryDirectory(prefix="syft-split-old-") as tmp:
        old = old_tree(Path(tmp))
        step = alternate(old, ROOT, repeats, "--child", "step", "--steps", str(steps))
        for side in ("old", "new"):
            result[f"step_s_{side}"] = med(step[side], "step_s")
            result[f"host_s_per_step_{side}"] = med(step[side], "host_s")
        result["ratio_step"] = result["step_s_new"] / result["step_s_old"]
        result["ratio_host"] = result["host_s_per_step_new"] / result["host_s_per_step_old"]
        result["ratio_step_goal"] = 1.05
        for label, width in (("small", 4), ("1m", 16384)):
            runs = alternate(old, ROOT, max(repeats // 2, 1), "--child", "average",
                             "--width", str(width), "--rounds", "3" if args.quick else "10")
            result[f"average_params_{label}"] = int(med(runs["new"], "params"))
            result[f"average_round_s_plain_{label}"] = med(runs["old"], "round_s")
            result[f"average_round_s_secagg_{label}"] = med(runs["new"], "round_s")
            result[f"ratio_secagg_vs_plain_{label}"] = (
                result[f"average_round_s_secagg_{label}"] / result[f"average_round_s_plain_{label}"])
    result = {k: round(v, 6) if isinstance(v, float) else v for k, v in sorted(result.items())}
    name = "guard_quick.json" if args.quick else "guard.json"
    out = ROOT / "bench" / "results" / name
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

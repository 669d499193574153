"""The model owner of the chaos test (tests/test_chaos.py), run as its own process.

    python tests/chaos_model_owner.py --url a=http://127.0.0.1:PORT --url b=... \\
        --email E --password P --checkpoint DIR --out DIR

It connects to the datasites, proposes (first start only: it waits until the data owners
approve) or re-attaches from its checkpoint, trains with ``fit(checkpoint_dir=..., resume=True)``
and writes its final weights to ``<out>/final.sspl``. The test SIGKILLs and restarts it.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from syft_split import OptimizerSpec, SplitPlan, SplitSession, Trainer, split_model
from syft_split.models import digits_cnn
from syft_split.transport.base import CallPolicy, Transport

PARTIES = ("a", "b")
EPOCHS = 3
#: the HE-protected run: fewer epochs (its steps cost ~10x a plain step; its crashes come early)
HE_EPOCHS = 2


def chaos_epochs(he: bool) -> int:
    """Epochs of the chaos run (plain or HE-protected)."""
    return HE_EPOCHS if he else EPOCHS
BATCH = 10
#: patient retries: a datasite being restarted is unreachable for ~10-20 s
POLICY = CallPolicy(timeout=60.0, retries=60, backoff=0.2, max_backoff=1.0)


def chaos_data() -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Each party's train/test records (the same in the test and in this process)."""
    out = {}
    for k, party in enumerate(PARTIES):
        g = torch.Generator().manual_seed(100 + k)
        x, y = torch.randn(48, 1, 8, 8, generator=g), torch.randint(0, 10, (48,), generator=g)
        out[party] = {"train": (x[:40], y[:40]), "test": (x[40:], y[40:])}
    return out


def chaos_session(transport: Transport, he: bool = False) -> SplitSession:
    """The chaos run's session; ``he``: its first model-owner layer (a Conv2d) encrypted,
    level A."""
    torch.manual_seed(7)
    plan = SplitPlan.vanilla(split_model(digits_cnn(channels=4, hidden=16), ["pool1"]),
                             list(PARTIES))
    if he:
        from syft_split.he import protect

        plan = protect(plan, level="A", batch_size=BATCH, input_shape=(4, 4, 4))
    return SplitSession(plan, transport, optimizer=OptimizerSpec("adam", lr=1e-2))


def chaos_trainer(session: SplitSession) -> Trainer:
    labels = {p: {ds: y for ds, (_x, y) in sets.items()} for p, sets in chaos_data().items()}
    return Trainer(session, batch_size=BATCH, labels=labels, seed=3, progress=False,
                   measure_leakage=False)


def main() -> None:
    from syft_split import persist
    from syft_split.checkpoint import Checkpoint
    from syft_split.transport.pysyft import connect

    ap = argparse.ArgumentParser()
    ap.add_argument("--url", action="append", required=True)
    ap.add_argument("--email", required=True)
    ap.add_argument("--password", required=True)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--he", action="store_true", help="HE-protected (level A)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # the same numerics as the test's reference run
    urls = dict(u.split("=", 1) for u in args.url)
    print(f"imported at {time.time():.2f}", flush=True)
    transport = connect(urls, args.email, args.password, policy=POLICY)
    print(f"connected at {time.time():.2f}", flush=True)
    session = chaos_session(transport, he=args.he)
    out = Path(args.out)
    if not Checkpoint(args.checkpoint).exists():
        ids = session.propose()
        (out / "proposals.json").write_text(json.dumps(ids))
        print(f"proposed at {time.time():.2f}", flush=True)
        while set(session.status().values()) != {"approved"}:
            time.sleep(0.5)
    print(f"training from {time.time():.2f}", flush=True)
    report = chaos_trainer(session).fit(chaos_epochs(args.he), verbose=False,
                                        checkpoint_dir=args.checkpoint, resume=True)
    session.flush()
    persist.save(out / "final.sspl", {
        "local": {str(i): m.state_dict() for i, m in session.local.items()},
        "segments": session.segment_ids(),
        "owner_status": {key: transport.call(key.split(":")[0], "status", segment=sid)
                         for key, sid in session.segment_ids().items()},
        "steps": report.steps, "resumed": report.extra.get("resumed", 0),
        "retries": transport.retries, "pid": os.getpid(),
    })


if __name__ == "__main__":
    main()

"""The data owner's side of the demo: a datasite holding a hospital's share of the digits,
approving the model owner's proposals. Plain PySyft plus syft-split's ``install`` and console.

Data owner (keeps running; Ctrl-C or SIGTERM lands the datasite and removes its data)::

    python tutorials/digits_datasite.py --party hospital_a --port 8081 \\
        --model-owner me@lab.org --model-owner-password SECRET

Model owner, in another terminal::

    make demo ARGS="--connect hospital_a=http://localhost:8081 --email me@lab.org --password SECRET"

What it does, step by step (each is a plain PySyft call unless named otherwise):

1. ``sy.orchestra.launch(name=party, port=port, reset=True)`` -- or, with ``--url``, log in
   to a datasite that already runs as its admin (``--admin-email``/``--admin-password``);
2. upload ``train`` and ``test`` as ``sy.Dataset`` objects, each with two ``sy.Asset``:
   ``features`` (records x 1 x 8 x 8, float32 in [0, 1]) and ``labels`` (int64 digits), with
   a mock of public digits: the data contract of the demo's plan;
3. ``syft_split.datasite.install(root, {"train": (features, labels), "test": (...)})`` and
   ``syft_split.contract.check_datasite`` against the demo's plan;
4. ``root.register(...)`` the model owner's account;
5. poll ``DatasiteConsole(root).proposals("pending")``: print each review, then approve it
   (``--approve auto``) or ask on the terminal (``--approve ask``, the default), with a
   direct channel for the steps (``--no-channel``: every step through PySyft).
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--party", default="hospital_a", help="the name the model owner uses for you")
    p.add_argument("--port", type=int, default=8081, help="port of the datasite to launch")
    p.add_argument("--url", default="", help="use this running datasite instead of launching one")
    p.add_argument("--admin-email", default="info@openmined.org")
    p.add_argument("--admin-password", default="changethis")
    p.add_argument("--model-owner", default="model-owner@example.org", help="its e-mail")
    p.add_argument("--model-owner-password", required=True)
    p.add_argument("--share", type=int, default=0, help="which share of the digits (0-based)")
    p.add_argument("--shares", type=int, default=2, help="how many hospitals share the digits")
    p.add_argument("--records", type=int, default=None, help="use only this many digits")
    p.add_argument("--approve", choices=["ask", "auto"], default="ask")
    p.add_argument("--leakage-bound", type=float, default=None,
                   help="halt a segment when the watch's inversion ratio falls below this")
    p.add_argument("--no-channel", action="store_true",
                   help="approve without a direct channel (every step through PySyft's API)")
    p.add_argument("--serve-for", type=float, default=None, help="seconds, then land (tests)")
    p.add_argument("--verbose", action="store_true", help="show PySyft's and uvicorn's output")
    return p.parse_args(argv)


def _approve(owner, pid: str, args: argparse.Namespace) -> None:  # type: ignore[no-untyped-def]
    print(owner.review(pid), flush=True)
    if args.approve == "ask":
        answer = input(f"approve {pid}? [y/N] ").strip().lower()
        if answer != "y":
            owner.reject(pid)
            print(f"rejected {pid}", flush=True)
            return
    options: dict = {"channel": not args.no_channel}
    if args.leakage_bound is not None:
        options["leakage_bound"] = {"inversion_ratio": args.leakage_bound}
    owner.approve(pid, **options)
    print(f"approved {pid}", flush=True)


def _stop(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # land the datasite on Ctrl-C and on SIGTERM alike


def main(argv: list[str] | None = None) -> None:
    args = _args(argv)
    import os

    # a process started in the background may inherit an ignored SIGINT: handle both signals,
    # or the uvicorn server process would outlive this script
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)

    os.environ.setdefault("TQDM_DISABLE", "1")  # PySyft's upload progress bars
    if args.verbose:
        os.environ["SYFT_SPLIT_VERBOSE"] = "1"
    import syft as sy

    from syft_split import SplitPlan, contract, split_model
    from syft_split.datasets import digits_parties
    from syft_split.datasite import DatasiteConsole, install
    from syft_split.logs import log_path, quiet
    from syft_split.models import digits_cnn
    from syft_split.topology import RELEASED

    server = None
    if args.url:  # 1. a datasite that already runs
        url = urlparse(args.url)
        root = sy.login(url=f"{url.scheme}://{url.hostname}", port=url.port,
                        email=args.admin_email, password=args.admin_password)
        address = args.url
    else:  # 1. launch one (its server output goes to a log file unless --verbose)
        with quiet(log_path(args.party), fds=True):
            server = sy.orchestra.launch(name=args.party, port=args.port, reset=True)
            root = server.login(email=args.admin_email, password=args.admin_password)
        address = f"http://localhost:{args.port}"
    try:
        # 2. the data: this hospital's share of scikit-learn's digits, public digits as mock
        share = digits_parties(args.shares, seed=0, mock_records=200, limit=args.records)[args.share]
        mock = share.mock.numpy()  # public digits that are in no hospital's share
        mock_labels = np.random.default_rng(0).integers(0, 10, len(mock))  # public: random
        for name, x, y in (("train", share.x_train, share.y_train),
                           ("test", share.x_test, share.y_test)):
            with quiet():
                root.upload_dataset(sy.Dataset(
                    name=name, description=f"8x8 digits of {args.party} ({name})",
                    asset_list=[sy.Asset(name="features", data=x.numpy(), mock=mock),
                                sy.Asset(name="labels", data=y.numpy(), mock=mock_labels)]))
        # 3. the plugin, and the demo plan's data contract
        install(root, {n: (root.datasets[n].assets["features"], root.datasets[n].assets["labels"])
                       for n in ("train", "test")}, host_name=args.party)
        owner = DatasiteConsole(root)
        plan = SplitPlan.vanilla(split_model(digits_cnn(), cuts=["pool1"]), [args.party],
                                 labels=RELEASED)
        problems = contract.check_datasite(plan, owner, party=args.party)
        if problems:
            raise SystemExit("this datasite does not fit the demo's plan:\n" + "\n".join(problems))
        # 4. the model owner's account
        with quiet():
            root.register(name="Model owner", email=args.model_owner,
                          password=args.model_owner_password,
                          password_verify=args.model_owner_password,
                          institution="syft-split demo", website="https://example.org")
        print(f"READY {args.party} at {address}: {len(share.y_train)} train and "
              f"{len(share.y_test)} test records; account {args.model_owner}", flush=True)
        # 5. review and approve what the model owner proposes
        deadline = None if args.serve_for is None else time.monotonic() + args.serve_for
        while deadline is None or time.monotonic() < deadline:
            for proposal in owner.proposals("pending"):
                _approve(owner, proposal.id, args)
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        if server is not None:  # a datasite this script launched: land it, remove its data
            with quiet(log_path(args.party)):
                server.land()
            shutil.rmtree(Path(tempfile.gettempdir(), "syft", str(root.id).replace("-", "")),
                          ignore_errors=True)
            print(f"landed {args.party}", flush=True)
        sys.stdout.flush()


if __name__ == "__main__":  # PySyft starts the server with multiprocessing: keep the guard
    multiprocessing.set_start_method("spawn", force=True)
    main()

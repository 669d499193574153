"""The model owner's checkpoints: what a new process needs to continue a run exactly.

:class:`Checkpoint` keeps one file, ``<dir>/model_owner.sspl`` (the wire format through
:mod:`syft_split.persist`: the model owner's own tensors and JSON, no pickle), replaced
atomically after every training step by :meth:`syft_split.Trainer.fit`. It holds:

- the model owner's segments (``state_dict``) and optimizers, the process's torch RNG state;
- every remote segment's id, next step id, held-back gradient / loss weight and a request
  whose delivery was unknown (:meth:`syft_split.remote.RemoteSegment.state`);
- the schedule position: epoch, batches done in it, the batch generator's state at the start
  of the epoch (the epoch's order is drawn again from it), running sums, per-client server
  copies (SplitFed v1), the report so far (steps, epochs, wall time, the cost ledger's FLOPs and
  peak memory, this run's bytes and calls, the rounds not averaged: a resumed run's report
  covers the crashed process's work up to its last checkpoint too);
- the run's configuration (plan, optimizer, batch size, seed, schedule, defences, datasets):
  a resume configured otherwise is refused, as it would silently train another run; the
  parties skipped for the rest of the epoch (``on_unreachable="skip"``);
- the relay under way (relay schedule): the checkpoint is written again, at the same position,
  once each shared segment's weights are sealed and before their ``unseal`` request leaves, so
  a new process sends those very bytes again under their step id (sealing again would give
  other bytes, which the data owner refuses under a step id it applied) and seals only the
  segments not sealed yet;
- the average relayed under way (SplitFed, a data owner without a batch in the round): it is
  relayed after the step trained, so it is not written at a new position but added to the
  checkpoint as last saved (:meth:`Checkpoint.note`), once the members loaded the average and
  once each copy is sealed, before its ``unseal`` request leaves: the round averaged and each
  sealed request by recipient and node.
  A new process runs that step again from the checkpoint (the data owners answer it from their
  records), does not average again (every member loaded the average) and sends those very
  requests again (:class:`syft_split.schedules.SecureAverage`);
- SplitFed's last secure-aggregation round (the rounds so far, learned from the data owners at
  the start of a run): a new process does not average again a round every member loaded after
  it (their round status, persisted with their state, says so), also when the model owner died
  after they loaded and before its next checkpoint write; no extra write per round.

``fit(resume=True, checkpoint_dir=...)`` in a new process re-attaches to the approved segments
by id (:meth:`syft_split.SplitSession.attach`) and continues at the next batch; every request
the crashed process may have sent carries a step id, so the data owners apply it once. The
latency-tolerant schedules (``gradient_delay=1``, local losses) send requests without step ids:
``fit`` refuses a checkpoint for them.

An HE-protected plan also keeps, at level B, the model owner's share W_s and its SGD velocity,
and ``<dir>/he_step_<party>.sspl``: the encrypted step in flight, written before its gradient
message leaves (:mod:`syft_split.he_state`), whose answer a new process can only take from the
data owner's record.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import persist
from .errors import ConfigError
from .report import EpochRecord

if TYPE_CHECKING:
    from .trainer import Trainer

__all__ = ["Checkpoint", "Position"]

FORMAT = 1
#: the key of SplitFed's relayed average under way (:meth:`Checkpoint.note`)
SPLITFED_RELAYS = "splitfed_relays"


class Position(dict):  # type: ignore[type-arg]
    """Where a run stands: ``epoch``, ``done`` (batches of it done), ``gen`` (batch generator
    state at the epoch's start), ``sums`` ([loss sum, correct, count]), ``round_sizes``."""


class Checkpoint:
    """One run's model-owner checkpoint in ``directory`` (see the module docstring)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / "model_owner.sspl"
        #: checkpoints written, and seconds spent writing them
        self.writes = 0
        self.seconds = 0.0
        #: the position last saved or restored (:meth:`journal` writes at it again)
        self.position: Position | None = None

    def exists(self) -> bool:
        return self.path.exists()

    def save(self, trainer: Trainer, position: Position) -> None:
        """Write the trainer's state at ``position`` (atomically)."""
        t0 = time.perf_counter()
        s = trainer.session
        copies = trainer._server_copies
        tree = {
            "format": FORMAT,
            "position": dict(position),
            "torch_rng": torch.get_rng_state(),
            "local": {str(i): m.state_dict() for i, m in s.local.items()},
            "optimizers": [o.state_dict() for o in s.optimizers],
            "segments": {f"{host}:{i}": seg.state() for (host, i), seg in s.remote.items()},
            "server_copies": None if copies is None else copies.states,
            "relay_last": trainer._relay_last,
            "relay": trainer._relay,
            "secagg_round": trainer._average.saved,
            "down": sorted(trainer.down),
            "run": _run(trainer),
            "he": s.he.state() if s.he is not None else None,
            "report": {"steps": trainer.report.steps,
                       "epochs": [asdict(e) for e in trainer.report.epochs],
                       "extra": {k: v for k, v in trainer.report.extra.items()
                                 if k in ("unreachable", "resumed")},
                       "not_averaged": list(trainer.report.not_averaged),
                       "not_averaged_dropped": trainer.report.not_averaged_dropped,
                       "wall_time_s": trainer.report.wall_time_s + trainer.fit_seconds(),
                       "ledger": trainer.ledger.totals(),
                       "traffic": {} if trainer.traffic is None else trainer.traffic.figures()},
        }
        persist.save(self.path, tree)
        self.position = Position({k: dict(v) if isinstance(v, dict) else v
                                  for k, v in position.items()})
        self.writes += 1
        self.seconds += time.perf_counter() - t0

    def journal(self, trainer: Trainer) -> None:
        """Write the trainer's state again at the last position, within a step: before a
        request that cannot be made again identically leaves (a relay's sealed weights), so
        that a new process sends that very request again."""
        if self.position is None:
            raise ConfigError("a checkpoint journal needs a saved or restored position")
        self.save(trainer, self.position)

    def note(self, key: str, value: Any) -> None:
        """Add ``value`` under ``key`` to the checkpoint as last saved (its state and position
        unchanged), before a request leaves that the step after that position, run again by a
        new process, must send as it was (SplitFed's relayed average: the trainer's state
        then already holds that step, and :meth:`journal` writing it at the last position would
        have a new process run the step again on top of it). The next :meth:`save` drops it."""
        tree = self.load()
        if tree is None:
            raise ConfigError(f"{self.path}: a checkpoint note needs a saved checkpoint")
        t0 = time.perf_counter()
        tree[key] = value
        persist.save(self.path, tree)
        self.writes += 1
        self.seconds += time.perf_counter() - t0

    def load(self) -> dict[str, Any] | None:
        """The saved state, or None if there is none yet."""
        if not self.exists():
            return None
        tree = persist.load(self.path)
        if not isinstance(tree, dict) or tree.get("format") != FORMAT:
            got = tree.get("format") if isinstance(tree, dict) else type(tree).__name__
            raise ConfigError(f"{self.path}: checkpoint format {got!r}, expected {FORMAT}")
        return tree

    def restore(self, trainer: Trainer, tree: dict[str, Any]) -> Position:
        """Put ``trainer`` (and its session) back where ``tree`` was saved; return the position.
        A session with no segments yet is re-attached to the checkpoint's segment ids."""
        s = trainer.session
        saved, now = tree.get("run"), _run(trainer)
        if saved is not None and saved != now:  # (older checkpoints have none)
            differ = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
            raise ConfigError(f"{self.path} was written by a run configured otherwise ({differ} "
                              "differ): resuming it would train another run than the one it "
                              "continues")
        segments = tree["segments"]
        if not s.remote:
            s.attach({k: v["segment_id"] for k, v in segments.items()}, states=segments)
        else:
            for (host, i), seg in s.remote.items():
                seg.load_state(segments[f"{host}:{i}"])
        for i, m in s.local.items():
            m.load_state_dict(tree["local"][str(i)])
        for opt, state in zip(s.optimizers, tree["optimizers"]):
            opt.load_state_dict(state)
        torch.set_rng_state(tree["torch_rng"])
        if tree.get("server_copies") is not None:
            from .server_copies import ServerCopies

            copies = ServerCopies(s, list(tree["server_copies"]))
            copies.states = {k: (list(v[0]), list(v[1]))
                             for k, v in tree["server_copies"].items()}
            trainer._server_copies = copies
        trainer._relay_last = tree.get("relay_last")
        trainer._relay = tree.get("relay")
        trainer._average.journaled = tree.get(SPLITFED_RELAYS)
        trainer._average.checkpointed = tree.get("secagg_round")
        trainer.down = set(tree.get("down", []))
        if s.he is not None:
            s.he.load_state(tree.get("he") or {})
        report = tree["report"]
        trainer.report.steps = int(report["steps"])
        trainer.report.epochs = [EpochRecord(**e) for e in report["epochs"]]
        trainer.report.extra.update(report.get("extra", {}))
        trainer.report.not_averaged = list(report.get("not_averaged", []))
        trainer.report.not_averaged_dropped = int(report.get("not_averaged_dropped", 0))
        # the crashed process's costs, as of this checkpoint: the report goes on from them
        trainer.report.wall_time_s = float(report.get("wall_time_s", 0.0))
        trainer.ledger.load_totals(report.get("ledger", {}))
        if trainer.traffic is not None:
            trainer.traffic.resume(dict(report.get("traffic", {})))
        self.position = Position(tree["position"])
        return Position(tree["position"])


#: what decides a run's batches and updates: a resume must be configured the same way
_RUN_KEYS = ("plan", "optimizer", "batch_size", "seed", "schedule", "defences",
             "share_weights", "encrypted")


def _run(trainer: Trainer) -> dict[str, Any]:
    """The trainer's configuration that a checkpoint holds to (as JSON would keep it)."""
    config = {k: trainer.report.config.get(k) for k in _RUN_KEYS}
    # (not on_unreachable: skipping a party that does not answer changes no batch of those
    # that do, and a resume may well want it after a crash)
    config.update(train_dataset=trainer.train_dataset, gradient_delay=trainer.gradient_delay)
    out: dict[str, Any] = json.loads(json.dumps(config, sort_keys=True, default=str))
    return out


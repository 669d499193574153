"""Multi-client schedules: how data owners' copies of a segment relate over training.

- ``round_robin``: batches interleave over data owners; each keeps its own segment weights.
- ``relay`` (Gupta & Raskar 2018): data owners train in turn on all their batches; the segment's
  weights pass to the next data owner sealed for it (the model owner relays ciphertext).
- ``splitfed_v1`` (Thapa et al. 2022): each round every data owner trains one batch "in
  parallel" against its own copy of the model owner's segments; after the round the data
  owners' segments are averaged by secure aggregation, and the model owner averages its copies
  (FedAvg, weighted by batch size; :mod:`syft_split.server_copies`).
- ``splitfed_v2``: as v1 but the model owner processes the data owners one after the other on
  a single copy of its segments; only the data owners' segments are averaged.

The data owners' weights move only between data owners (plans with ``share_weights="peer"``;
each data owner pins the others' public keys with ``trust_peer``): the model owner never writes
them and never reads them. Averaging is secure aggregation (:mod:`syft_split.secagg`,
:mod:`syft_split.host.aggregation`): each data owner seals a pairwise-masked, weighted contribution
for every other member; each checks every contribution it sums (pinned key, round, cohort,
weights, segment) and loads the average. The model owner relays ciphertext and learns no weight,
not even the average. A data owner that drops out before its contribution is out: the round
runs again among the others under a new round number (fresh masks); one that drops out after
the others have started loading stops the round there (see :class:`SecureAverage`). A round
a member's ``HostLimits.min_cohort`` refuses (or a relay it refuses) is not averaged (relayed):
its data owners keep their weights, which :attr:`SecureAverage.last` says; it is not a failure.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from . import secagg
from .contributions import blamed, contribution_faults
from .errors import (
    AverageRefusedError,
    CohortRefusedError,
    ConfigError,
    ProtocolError,
)
from .remote import RemoteSegment
from .server_copies import ServerCopies, weighted_mean
from .session import SplitSession

__all__ = ["SCHEDULES", "AverageOutcome", "SecureAverage", "ServerCopies", "average_segments",
           "cohort_refusal", "contribution_faults", "input_nodes", "relay_weights", "weighted_mean"]

T = TypeVar("T")

SCHEDULES = ("round_robin", "relay", "splitfed_v1", "splitfed_v2")


def input_nodes(session: SplitSession) -> list[int]:
    """Nodes every data owner runs a copy of (the ones whose weights are shared)."""
    from .topology import DATA_OWNER

    return [i for i, n in enumerate(session.plan.nodes) if n.owner == DATA_OWNER]


def _require_peer(session: SplitSession, via: str = "peer") -> None:
    if via != "peer":
        raise ConfigError(f"weights cannot move via {via!r}: the model owner never writes a data "
                          "owner's weights; they move only between data owners (via='peer', "
                          "plan share_weights='peer', trust_peer on each data owner)")
    if session.plan.share_weights != "peer":
        raise ConfigError("this schedule moves the data owners' weights between them, but the "
                          f"plan was approved with share_weights={session.plan.share_weights!r}; "
                          "use share_weights='peer'")


def relay_weights(session: SplitSession, src: str, dst: str, *, via: str = "peer",
                  journal: Callable[[int, int], None] | None = None,
                  sealed_before: dict[int, int] | None = None) -> None:
    """Move every shared segment's weights from data owner ``src`` to ``dst``, sealed for
    ``dst``'s segment (``dst`` checks the sender's pinned key, its segment and the sequence).

    Resumable (checkpoints): ``journal(node, step)`` runs once a node's weights are sealed and
    their ``unseal`` request is fixed in ``dst``'s segment state under step id ``step``, before
    it is sent. ``sealed_before`` (node -> step id) holds what a crashed process journaled:
    such a node is not sealed again (new bytes under a step id the data owner may have applied
    would be refused); its request, restored with the segment's state, is sent again as it was,
    unless it was settled. Only a request that was refused (nothing applied) is sealed anew."""
    _require_peer(session, via)
    for i in input_nodes(session):
        a, b = session._seg(src, i), session._seg(dst, i)
        step = (sealed_before or {}).get(i)
        if step is not None and (b.next_step > step or b.unsettled is not None):
            b.settle()
            continue
        sealed, sender = a.seal_for(dst, b.segment_id)
        b.unseal(sealed, sender, journal=_journal_node(journal, i, b))


def _journal_node(journal: Callable[[int, int], None] | None, node: int, seg: RemoteSegment
                  ) -> Callable[[], None] | None:
    """``journal`` for ``node``, told the step id of ``seg``'s request in flight."""
    if journal is None:
        return None
    return lambda: journal(node, seg.next_step)


@dataclass
class AverageOutcome:
    """What one :class:`SecureAverage` call did besides its failures: ``not_averaged`` says
    why its members kept their own weights (a data owner's ``HostLimits.min_cohort``; None:
    averaged, or nothing to average), ``not_relayed`` which data owners without a batch kept
    their own weights instead of receiving the average, and why."""

    sources: list[str] = field(default_factory=list)
    members: list[str] = field(default_factory=list)
    not_averaged: str | None = None
    not_relayed: dict[str, str] = field(default_factory=dict)

    def record(self) -> dict[str, Any] | None:
        """For the run report: the data owners that kept their own weights and why (None:
        nothing was left out)."""
        if self.not_averaged is not None:
            return {"kept": sorted(self.sources), "reason": self.not_averaged}
        if self.not_relayed:
            reasons = "; ".join(dict.fromkeys(self.not_relayed.values()))
            return {"kept": sorted(self.not_relayed), "reason": f"not relayed the average: "
                    f"{reasons}"}
        return None


def cohort_refusal(members: Sequence[str], weights: dict[str, float],
                   min_cohort: dict[str, int]) -> str | None:
    """Why a member would refuse this cohort under its ``HostLimits.min_cohort``
    (:func:`syft_split.secagg.cohort_rule`, which its host enforces), None if none would."""
    ws = [weights[m] for m in members]
    for m in members:
        why = secagg.cohort_rule(len(members), ws, min_cohort.get(m, 2))
        if why is not None:
            return f"{m} {why}; this round has {dict(zip(members, ws))}"
    return None


class SecureAverage:
    """Secure-aggregation rounds over a session's shared segments (the model owner relays).

    Round numbers increase across calls; the first call starts after the highest round any
    involved segment has seen (so a new session on old segments still uses fresh masks), and
    learns each data owner's ``HostLimits.min_cohort``. A round some member would refuse under
    it (too few members, a weight under a tenth of the largest) is not started: its members
    keep their own weights, which :attr:`last` says (:class:`AverageOutcome`); a data owner
    whose policy changed since and refuses anyway (:class:`~syft_split.errors.
    CohortRefusedError`) has the round abandoned the same way, nothing loaded anywhere. Such
    a refusal is never a failure: no data owner is dropped for it."""

    def __init__(self, session: SplitSession) -> None:
        self.session = session
        self.round: int | None = None
        #: each data owner's HostLimits.min_cohort, from its first status
        self.min_cohort: dict[str, int] = {}
        #: what the last call did (averaged or not, relayed or not)
        self.last = AverageOutcome()
        #: what a crashed process journaled of the call that runs again first (from a checkpoint:
        #: the ``journal`` record of :meth:`__call__`); that call takes it
        self.journaled: dict[str, Any] | None = None
        #: the last round as of the checkpoint a new process resumes from (:attr:`saved`): a
        #: node's round every member loaded after it is not run again by the first call
        self.checkpointed: int | None = None

    @property
    def saved(self) -> int | None:
        """The round number a checkpoint keeps: the last round started (None: not known yet,
        see :meth:`start`)."""
        return self.round if self.round is not None else self.checkpointed

    def start(self, sources: Sequence[str], run: Each | None = None
              ) -> tuple[dict[str, list[dict[str, int]]], dict[str, BaseException]]:
        """Learn every data owner's round status (the last round each shared node contributed
        to, has in flight and loaded; its ``min_cohort``) and where the rounds start; the first
        call does it (a run with checkpoints at its start, so that its first checkpoint holds
        :attr:`saved`). Returns the status and the failures."""
        nodes = input_nodes(self.session)
        status, failed = (run or _one_after_the_other)(list(sources), lambda s: [
            self.session._seg(s, i).secagg_status() for i in nodes])
        if not failed:
            self.round = _first_round(status) - 1
            self.min_cohort.update({s: max(st.get("min_cohort", 2) for st in sts)
                                    for s, sts in status.items() if sts})
        return status, failed

    def __call__(self, sources: Sequence[str], weights: Sequence[float], *,
                 each: Each | None = None,
                 journal: Callable[[dict[str, Any]], None] | None = None
                 ) -> dict[str, BaseException]:
        """Replace each source's copy of every shared segment by their weighted average (a
        source with weight 0 is not a member of the rounds, which data owners refuse: it
        receives the average, relayed sealed from a member that relays; with one source of
        positive weight that is a relay of its weights). A cohort a member's
        ``HostLimits.min_cohort`` refuses is not averaged, and a source no member may relay to
        keeps its weights: see :attr:`last`.

        ``each(keys, fn) -> (results, errors)`` runs one phase's calls (contribute, then
        aggregate) for every data owner, e.g. concurrently (:func:`syft_split.rounds.run_each`),
        and the failures are returned. Each shared node is averaged in its own round. A failed
        *contribute* loads nothing of that node anywhere: its round runs again among the members
        that did not fail, under the next round number (new masks; no contribution of the
        aborted round was delivered to anyone), as long as two members with a positive total
        weight remain that every member's ``min_cohort`` allows; the nodes after it are averaged
        among those members (nodes averaged before it already included the member that failed).
        A bad contribution fails its sender as a failed contribute does: the model owner
        refuses an answer that is not one ``bytes`` contribution per other member, of one
        length, and every member checks everything it is relayed before anyone loads
        (``secagg_check``): then every member has computed the average, so a refusal there
        leaves the round unaveraged, never run again (a second average without one member
        would show that member's weights), and leaves out whom
        :func:`~syft_split.contributions.blamed` names. A failed
        *aggregate* stops the
        averaging (the others have loaded). Without ``each`` the calls run one after the other
        and a failure raises (nothing loaded, if it is one of these).

        Resumable (checkpoints): ``journal(record)`` keeps ``record`` with the checkpoint once
        the average is loaded and before each copy of it relayed to a source of weight 0 leaves:
        the round averaged, its members, the relaying member and every ``unseal`` request
        sealed so far (the step id and the sealed bytes, by recipient and node). A new process
        whose first call is this one again (:attr:`journaled`: that record) does not average
        again (the members hold the average; a second one is not exact in fixed point) and
        sends those very requests again (a new seal is other bytes, which a data owner refuses
        under a step id it applied): the data owners apply each once, and only the relays not
        journaled are sealed. Nor does a new process average again a shared node whose round
        every member loaded after the checkpoint (:attr:`checkpointed`; their round status
        says so) although nothing was journaled: the model owner died before its next
        checkpoint. A round only some members loaded is finished under its own number."""
        _require_peer(self.session)
        if len(sources) != len(weights):
            raise ConfigError(f"{len(sources)} sources but {len(weights)} weights")
        w = {s: float(x) for s, x in zip(sources, weights)}
        members = [s for s in dict.fromkeys(sources) if w[s] > 0]
        out = self.last = AverageOutcome(list(dict.fromkeys(sources)), members)
        if len(set(sources)) < 2:
            return {}  # the average of one copy is that copy
        run = each or _one_after_the_other
        nodes = input_nodes(self.session)
        loaded: set[int] = set()  # nodes every member loaded after the checkpoint
        if self.round is None:
            status, failed = self.start(sources, run)
            if failed:
                return failed
            loaded = _loaded(status, members, self.checkpointed)
        assert self.round is not None  # (set by start)
        dropped: dict[str, BaseException] = {}
        if not members:
            raise ConfigError(f"averaging weights {weights} are all 0")
        resumed = self._resumed(members)  # averaged before a crash, relayed in part
        average = len(members) > 1 and resumed is None and len(loaded) < len(nodes)
        if average:
            out.not_averaged = None if loaded else cohort_refusal(members, w, self.min_cohort)
            if out.not_averaged is not None:
                return dropped  # no round started: no masks spent, nothing loaded
            self.round += 1
        for k, i in enumerate(nodes if average else []):
            while k not in loaded:
                failed, loading, refused = self._node(i, members, w, run)
                if failed and each is None:  # one after the other: a failure raises
                    raise next(iter(failed.values()))
                dropped.update(failed)
                if refused is not None:  # abandoned before anyone loaded: nothing loaded
                    out.not_averaged = refused + ("" if k == 0 else f" (nodes {nodes[:k]} "
                                                  "were averaged before)")
                    return dropped  # (the next round number is a fresh one)
                if not failed:
                    break
                members = [s for s in members if s not in failed]
                out.members = list(members)
                if loading or len(members) < 2:
                    return dropped
                out.not_averaged = cohort_refusal(members, w, self.min_cohort)
                if out.not_averaged is not None:
                    out.not_averaged = f"after {sorted(failed)} failed: {out.not_averaged}"
                    return dropped
                self.round += 1  # the survivors again, under fresh masks
        zero = [s for s in dict.fromkeys(sources) if w[s] <= 0]  # no batch: gets the average
        if zero:
            dropped.update(self._relay(members, zero, run, journal, resumed))
        return dropped

    def _resumed(self, members: list[str]) -> dict[str, Any] | None:
        """The :attr:`journaled` record if it is this call's (same members; when averaged, the
        round every member loaded last), else None; either way it is taken."""
        record, self.journaled = self.journaled, None
        if record is None or record.get("members") != members or (
                len(members) > 1 and record.get("round") != self.round):
            return None
        return record

    def _relay(self, members: list[str], zero: list[str], run: Each,
               journal: Callable[[dict[str, Any]], None] | None = None,
               resumed: dict[str, Any] | None = None) -> dict[str, BaseException]:
        """Relay the average (every member holds it) to each of ``zero``, from a member whose
        ``min_cohort`` allows relaying its weights (below 3); without one, or refused by it,
        they keep their own weights (in :attr:`last`). ``journal``, ``resumed``: see
        :meth:`__call__`."""
        src = next((m for m in members if self.min_cohort.get(m, 2) < 3), None)
        if src is None:
            why = (f"no member relays its weights ({', '.join(members)}: HostLimits.min_cohort "
                   ">= 3)")
            self.last.not_relayed.update({s: why for s in zero})
            return {}
        record = resumed if resumed is not None and resumed.get("from") == src else {
            "round": self.round, "members": list(members), "from": src, "sealed": {}}
        if journal is not None and record is not resumed:  # averaged: not to be run again
            journal(record)
        done, failed = run(zero, lambda s: _refused(self._relay_one, src, s, record, journal))
        for s, result in done.items():
            if isinstance(result, CohortRefusedError):
                self.last.not_relayed[s] = f"{type(result).__name__}: {result}"
        return failed

    def _relay_one(self, src: str, dst: str, record: dict[str, Any],
                   journal: Callable[[dict[str, Any]], None] | None) -> None:
        """Relay every shared node from ``src`` to ``dst``: a node ``record`` holds (journaled
        before a crash) by its very ``unseal`` request, under its step id; any other sealed
        anew and, with ``journal``, added to ``record`` and journaled before it leaves."""
        for i in input_nodes(self.session):
            a, b = self.session._seg(src, i), self.session._seg(dst, i)
            sent = record["sealed"].get(dst, {}).get(i)
            if sent is not None:
                b.flush()
                b.settle()
                if b.next_step != sent["step"]:
                    raise ProtocolError(
                        f"the checkpoint journaled the relay to {dst}'s segment {b.segment_id} "
                        f"under step {sent['step']}, but it is at step {b.next_step}: the "
                        "checkpoint is not this run's")
                b.unseal(sent["sealed"], sent["sender"])  # applied once (or from the record)
                continue
            sealed, sender = a.seal_for(dst, b.segment_id)
            note = None if journal is None else functools.partial(
                _journal_relay, journal, record, dst, i, b, sealed, sender)
            b.unseal(sealed, sender, journal=note)

    def _node(self, i: int, sources: Sequence[str], w: dict[str, float], run: Each
              ) -> tuple[dict[str, BaseException], bool, str | None]:
        """One round of node ``i``'s copies: every member contributes; the answers are
        checked (:func:`contribution_faults`: a bad one fails its sender); every member checks
        every contribution it is relayed, loading nothing (a refusal naming a peer fails that
        peer, :func:`~syft_split.contributions.blamed`; any refusal leaves the round
        unaveraged), then aggregates.
        Returns the failures, whether they happened while loading (aggregate), and why the
        round was abandoned if a member refused its cohort or the average (then nobody
        aggregates)."""
        segs = {s: self.session._seg(s, i) for s in sources}
        members = {seg.party: seg.segment_id for seg in segs.values()}
        rnd = self.round
        assert rnd is not None
        sealed, failed = run(list(segs), lambda s: _refused(
            segs[s].secagg_contribute, f"node{i}", rnd, members,
            {segs[o].party: w[o] for o in segs}))
        refused = {s: r for s, r in sealed.items() if isinstance(r, CohortRefusedError)}
        if refused:
            return failed, False, "; ".join(f"{type(r).__name__}: {r}" for r in refused.values())
        if failed:
            return failed, False, None
        party = {s: seg.party for s, seg in segs.items()}
        failed = contribution_faults({party[s]: sealed[s] for s in segs}, rnd)
        if failed:  # a bad answer is its sender's failure (by source)
            return {s: failed[party[s]] for s in segs if party[s] in failed}, False, None

        def relayed(s: str) -> dict[str, bytes]:
            return {party[o]: sealed[o][party[s]] for o in segs if o != s}

        # every member checks every contribution before anyone loads: a refusal aborts the
        # round (nothing loaded anywhere), charged to the peer it names
        _, failed = run(list(segs), lambda s: segs[s].secagg_aggregate(rnd, relayed(s),
                                                                       check=True))
        if failed:  # members have computed this round's average: it is never run again
            # (a second average without one member would show that member's weights)
            average = {s: e for s, e in failed.items() if isinstance(e, AverageRefusedError)}
            blame = blamed({s: e for s, e in failed.items() if s not in average}, party, rnd)
            why = "; ".join(f"{party[s]}: {type(e).__name__}: {e}" for s, e in failed.items())
            return blame, False, f"refused while checking round {rnd} (not run again): {why}"
        _, failed = run(list(segs), lambda s: segs[s].secagg_aggregate(rnd, relayed(s)))
        return failed, True, None


def _journal_relay(journal: Callable[[dict[str, Any]], None], record: dict[str, Any], dst: str,
                   node: int, seg: RemoteSegment, sealed: bytes, sender: str) -> None:
    """Journal ``record`` with ``node``'s ``unseal`` request to ``dst`` (under ``seg``'s step id
    in flight), then keep it in ``record``; if ``journal`` raises, ``record`` is unchanged."""
    entry = {"step": seg.next_step, "sealed": sealed, "sender": sender}
    by_dst = {**record["sealed"], dst: {**record["sealed"].get(dst, {}), node: entry}}
    journal({**record, "sealed": by_dst})
    record["sealed"] = by_dst


def _refused(fn: Callable[..., T], *args: Any) -> T | CohortRefusedError:
    """``fn(*args)``, or the :class:`CohortRefusedError` it raised (a policy, not a failure:
    returned, so that no phase runner counts it as one)."""
    try:
        return fn(*args)
    except CohortRefusedError as exc:
        return exc


def _first_round(status: dict[str, list[dict[str, int]]]) -> int:
    """The round a new :class:`SecureAverage` starts with: after the highest round any member
    has seen, unless that round was interrupted while members were loading it (some loaded it,
    some still hold it in flight: a model owner died between their ``secagg_aggregate`` calls).
    Then that round is finished first, under its own number and description (the members that
    loaded it serve the same contribution again; those that did not load it now)."""
    seen = [st for sts in status.values() for st in sts]
    last = max(st["round"] for st in seen)
    loading = (any(st["pending"] == last for st in seen)
               and any(st["aggregated"] == last for st in seen))
    return last if loading and last > 0 else last + 1


def _loaded(status: dict[str, list[dict[str, int]]], members: Sequence[str],
            after: int | None) -> set[int]:
    """The nodes (by position) whose round after round ``after`` (the checkpoint's) every
    member loaded, none having one in flight: a model owner died after they loaded and before
    its next checkpoint. A second average is not exact in fixed point: those are not run again
    (with checkpoints a call runs one round, so that round is the call's)."""
    if after is None or len(members) < 2:
        return set()
    return {k for k in range(len(status[members[0]]))
            if len({status[m][k]["aggregated"] for m in members}) == 1
            and all(status[m][k]["pending"] == 0 for m in members)
            and status[members[0]][k]["aggregated"] > after}


#: runs ``fn(key)`` for every key; returns (results, errors) by key
Each = Callable[[list[str], Callable[[str], Any]], tuple[dict[str, Any], dict[str, BaseException]]]


def _one_after_the_other(keys: list[str], fn: Callable[[str], Any]
                         ) -> tuple[dict[str, Any], dict[str, BaseException]]:
    return {k: fn(k) for k in keys}, {}


def average_segments(session: SplitSession, sources: Sequence[str],
                     weights: Sequence[float]) -> None:
    """FedAvg the data owners' copies of every shared segment by secure aggregation (one round;
    for many rounds keep one :class:`SecureAverage`)."""
    SecureAverage(session)(sources, weights)

"""What the model owner refuses of a secure-aggregation round before relaying or averaging
anything (:class:`syft_split.schedules.SecureAverage`): members' contributions that are not
what a round needs (:func:`contribution_faults`), and whom the members' refusals while
checking leave out (:func:`blamed`)."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from .errors import AverageRefusedError, ValidationError

__all__ = ["blamed", "contribution_faults"]


def contribution_faults(sealed: dict[str, dict[str, Any]], rnd: int
                        ) -> dict[str, BaseException]:
    """The members whose ``secagg_contribute`` answer (``sealed``: member -> its answer, by
    recipient) the model owner refuses before relaying anything, and why: every answer must
    hold exactly one non-empty ``bytes`` contribution for every other member, all of one
    length up to the JSON length of the sender's and the recipient's names (they are in the
    sealed text), that length the same as a strict majority of the members' when one has
    it. What the model owner cannot see (a corrupted contribution of the right length) its
    recipient refuses, naming the sender (:class:`~syft_split.schedules.SecureAverage`)."""
    faults: dict[str, BaseException] = {}
    norm: dict[str, int] = {}
    for s, answer in sealed.items():
        want = sorted(o for o in sealed if o != s)
        got = sorted(answer) if isinstance(answer, dict) else []
        if got != want:
            faults[s] = ValidationError(f"{s}'s contribution to round {rnd} must be sealed for "
                                        f"each of {want}, got {got[:8]}")
            continue
        sizes = {len(v) - len(json.dumps(s)) - len(json.dumps(o)) if isinstance(v, bytes)
                 and v else -1 for o, v in answer.items()}
        if -1 in sizes or len(sizes) != 1:
            faults[s] = ValidationError(f"{s}'s contribution to round {rnd} must be one "
                                        "non-empty bytes value of one length per recipient")
            continue
        norm[s] = sizes.pop()
    if norm:
        common, n = Counter(norm.values()).most_common(1)[0]
        if 2 * n > len(sealed):
            faults.update({s: ValidationError(
                f"{s}'s contribution to round {rnd} has another length than the others'")
                for s, v in norm.items() if v != common})
    return faults


def blamed(failed: dict[str, BaseException], party: dict[str, str], rnd: int
            ) -> dict[str, BaseException]:
    """Whom the check phase's refusals leave out (by source). A member refusing a peer's
    contribution names it (its error's ``peer``, a structured field). An honest member names
    only a member that sent it something bad, so every accusation has a guilty end, but the
    model owner cannot tell which: a member accused by a strict majority of the others is left
    out alone; otherwise the accused and its accusers all are (a liar leaves with the member
    it names; one bad contribution to a single member costs that member too). Any other
    refusal is the member's own; a refused average (:class:`AverageRefusedError`) is
    nobody's."""
    source = {p: s for s, p in party.items()}
    accusers: dict[str, list[str]] = {}
    out: dict[str, BaseException] = {}
    for s, exc in failed.items():
        peer = getattr(exc, "peer", None)
        if isinstance(peer, str) and peer in source and peer != party[s]:
            accusers.setdefault(peer, []).append(party[s])
        elif not isinstance(exc, AverageRefusedError):
            out[s] = exc
    others = len(party) - 1
    for peer, by in accusers.items():
        err = out[source[peer]] = ValidationError(
            f"{', '.join(by)} refused {peer}'s contribution to round {rnd}")
        err.peer = peer
        if 2 * len(by) <= others:  # no majority: the accusers leave too
            for p in by:
                out.setdefault(source[p], ValidationError(
                    f"{p} refused {peer}'s contribution to round {rnd} without a majority of "
                    "the members doing so: the model owner cannot tell which of them lies"))
    return out

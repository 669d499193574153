"""What a data owner's host holds: datasets, proposals, approved runtimes, audit entries, limits."""

from __future__ import annotations

import hashlib
import itertools
import json
import secrets
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..spec import OptimizerSpec

__all__ = ["Dataset", "Proposal", "Runtime", "StepRecord", "AuditEntry", "HostLimits", "ROLES", "SHARING",
           "STEPS_KEPT", "clip", "spec_bytes", "spec_digest", "state_bytes"]

#: what a segment does at the data owner: reads its records (``input``), transforms an incoming
#: activation (``middle``, e.g. a relay party), or ends in a loss on labels held here (``loss``).
ROLES = ("input", "middle", "loss")
#: how a segment's weights may move: not at all, read by the model owner (explicitly approved:
#: it reveals training data), or between data owners only (sealed, or securely aggregated).
SHARING = ("none", "model_owner", "peer")


@dataclass
class Dataset:
    """Private features (and optionally labels, record ids and a public mock) a data owner
    holds, by record index. ``mock`` is synthetic/public data of the same shape (PySyft's mock
    asset), used only for leakage measurement."""

    features: torch.Tensor
    labels: torch.Tensor | None = None
    ids: list[str | int] | None = None
    mock: torch.Tensor | None = None
    #: where its records come from when it was taken from another dataset (an aligned
    #: dataset): that dataset's name and the row of each record there
    origin: tuple[str, list[int]] | None = None

    def __post_init__(self) -> None:
        if self.features.dim() < 2 or self.features.shape[0] == 0:
            raise ConfigError(f"features must be (records, ...), got {tuple(self.features.shape)}")
        if self.labels is not None and self.labels.shape[0] != self.features.shape[0]:
            raise ConfigError(
                f"labels have {self.labels.shape[0]} records, features {self.features.shape[0]}"
            )
        if self.ids is not None and len(self.ids) != self.features.shape[0]:
            raise ConfigError(f"ids have {len(self.ids)} records, features {self.features.shape[0]}")
        if self.mock is not None and tuple(self.mock.shape[1:]) != tuple(self.features.shape[1:]):
            raise ConfigError(f"mock rows {tuple(self.mock.shape[1:])} differ from the features' "
                              f"{tuple(self.features.shape[1:])}")

    def public_metadata(self) -> dict[str, Any]:
        """What any caller may know: sizes, shapes, dtypes; never values."""
        return {
            "records": int(self.features.shape[0]),
            "feature_shape": list(self.features.shape[1:]),
            "feature_dtype": str(self.features.dtype).removeprefix("torch."),
            "has_labels": self.labels is not None,
            "has_ids": self.ids is not None,
        }

    def subset(self, rows: torch.Tensor, name: str) -> Dataset:
        """The records at ``rows`` of this dataset (called ``name``), in that order."""
        ids = None if self.ids is None else [self.ids[int(r)] for r in rows]
        src, at = self.origin if self.origin is not None else (name, None)
        origin = (src, [int(r) if at is None else at[int(r)] for r in rows])
        return Dataset(self.features[rows], None if self.labels is None else self.labels[rows],
                       ids, self.mock, origin)

    def record_names(self, name: str, idx: torch.Tensor) -> list[str]:
        """A stable name for each record at ``idx`` of this dataset (called ``name``): the
        same record has the same name in every dataset that holds it (a record of an
        aligned dataset is named as in the dataset it was taken from)."""
        if self.origin is None:
            return [f"{name}/{int(i)}" for i in idx]
        src, rows = self.origin
        return [f"{src}/{rows[int(i)]}" for i in idx]


@dataclass(frozen=True)
class HostLimits:
    """What a data owner accepts at all, checked before anything is built or run.

    ``max_parameters`` / ``max_width`` / ``max_layers`` / ``max_activation_bytes``: a proposal
    larger than this is refused from its spec alone. ``max_activation_bytes`` bounds, over the
    proposal's ``max_batch`` records (float32), both the values alive at once in a forward
    without grad (attention score matrices included) and what a training forward keeps until
    its gradient returns (the input and every layer's output). It does not bound the
    optimizer's state or parameter gradients (``max_parameters`` bounds those).
    ``max_step_flops``: a proposal whose training step over ``max_batch`` records computes
    more (three times its forward's FLOPs, counted on the meta device) is refused; this bounds
    each step, the review's and the watch's forwards (``max_batch`` records at a time) and the
    time a step holds the host. The default, 1e12, is some 10-60 s of one CPU core.
    ``max_proposals_per_minute`` / ``max_pending``: per user; ``max_pending_bytes``: the initial
    weights and spec JSON a user's pending proposals hold at once, auxiliary heads (local
    loss) included (the host keeps them until the data owner decides; a rejected proposal's
    are dropped). ``max_spec_bytes``: a proposed spec (segment, federated model, auxiliary
    head) whose compact JSON is longer is refused before it is parsed (specs are kept in
    ``host.sspl``'s header, which holds at most 64 MiB).
    ``max_abs_value``: no released activation or gradient, and no incoming gradient, may
    exceed it in magnitude.
    ``max_records_per_minute``: records a segment may release per minute (None: no cap).
    ``review_budget_s``: seconds the review's attack suite may spend on one proposal, and
    the model owner's ``leakage`` op on one call (it may ask for less);
    ``leakage_seconds_per_hour``: the seconds the ``leakage`` op may run on one segment in
    any hour (a call past it is refused; each call holds the host, so back-to-back calls
    would keep the console waiting);
    ``watch_every``: the live leakage watch re-measures an input segment every so many steps.
    ``min_local_batch``: a locally trained (federated) model's gradient (``fl_gradient``) and
    every local step of ``fl_train`` cover at least this many records (1: no minimum).
    ``max_local_records``: the records one ``fl_train`` call may process (``epochs`` x the
    dataset's records; its local steps are at most as many): one call holds the host, and the
    data owner's console waits behind it, for at most that much local training (100,000
    records at batch 1 is some 30 s for a small CNN on one core; a halt stops it at its next
    local step); more epochs take more calls.
    ``he_min_share_bound``: level B's share A must be uniform in at least +-this (a tiny bound
    hides little of dW). ``he_min_grad_mask``: level B masks the weight gradient the model
    owner receives with the share's change over lr (within +-2 share_bound / lr);
    ``share_bound / lr`` must be at least this (a large agreed lr shrinks the mask).
    ``he_min_flood_margin``: the flooding noise of returned decryptions,
    2^-flood_bits, must lie at least this many bits above the encoding unit 2^-scale_bits
    (the CKKS noise, which depends on the secret key, sits a few bits above that unit).
    ``max_psi_elements``: a ``psi_serve`` request holds at most this many elements (and a
    ``"gcs"`` setup at the default fpr overflows past ~96 000 anyway).
    ``max_psi_elements_per_minute``: per user, the PSI elements the alignment ops may blind
    or unblind here in a minute (each costs ~40 us of the host): ``psi_serve`` counts its
    request's and the dataset's, ``psi_request`` and ``psi_finish`` the dataset's. One
    alignment of N records with a model owner of M labels costs M + 3N.
    ``min_cohort``: the fewest members of a secure-aggregation round this data owner takes
    part in. With 2 (the default) one trusted peer learns this data owner's weights (from a
    two-member average, or a relay). From 3 no single peer does: every member's averaging
    weight must be at least a tenth of the largest (a member of negligible weight hides
    nothing), and this data owner's weights are never relayed (``seal`` is refused).
    """

    max_request_bytes: int = 64 * 1024 * 1024
    max_batch: int = 4096
    max_parameters: int = 20_000_000
    max_width: int = 65_536
    max_layers: int = 256
    max_activation_bytes: int = 1 << 30
    max_step_flops: float = 1e12
    max_proposals_per_minute: int = 30
    max_pending: int = 32
    max_pending_bytes: int = 256 * 1024 * 1024
    max_spec_bytes: int = 64 * 1024
    max_abs_value: float = 1e6
    max_records_per_minute: int | None = None
    review_budget_s: float = 30.0
    leakage_seconds_per_hour: float = 300.0
    watch_every: int = 25
    min_local_batch: int = 1
    max_local_records: int = 100_000
    he_min_share_bound: float = 1.0
    he_min_grad_mask: float = 1.0
    he_min_flood_margin: int = 10
    max_psi_elements: int = 65_536
    max_psi_elements_per_minute: int = 1_048_576
    min_cohort: int = 2

    def __post_init__(self) -> None:
        for name in ("max_request_bytes", "max_batch", "max_parameters", "max_width",
                     "max_layers", "max_activation_bytes", "max_proposals_per_minute", "max_pending",
                     "max_pending_bytes", "max_spec_bytes", "min_local_batch", "max_psi_elements",
                     "max_psi_elements_per_minute", "min_cohort", "max_local_records"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"HostLimits.{name} must be a positive int, got {value!r}")
        if self.min_cohort < 2:
            raise ConfigError(f"HostLimits.min_cohort must be at least 2, got {self.min_cohort}")
        for name in ("max_abs_value", "max_step_flops", "leakage_seconds_per_hour"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ConfigError(f"HostLimits.{name} must be > 0, got {value!r}")


@dataclass
class Proposal:
    """A segment a model owner asked to run here, as the data owner reviews it."""

    id: str
    driver: str
    role: str
    spec: dict[str, Any]
    state: dict[str, torch.Tensor]
    optimizer: OptimizerSpec
    datasets: list[str]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    max_batch: int
    loss: str | None = None
    release_labels: bool = False
    share_weights: str = "none"
    defences: dict[str, float] = field(default_factory=dict)
    he: dict[str, Any] | None = None
    status: str = "pending"
    #: why an approved segment stopped (set when status becomes "halted"), and who stopped it
    #: ("owner", or "watch": the data owner's leakage watch)
    reason: str = ""
    halted_by: str = ""
    module: nn.Module | None = field(default=None, repr=False)
    #: the sha256 of the spec's JSON, kept once a rejected proposal's spec and weights are not
    spec_digest: str = ""
    #: the model owner's token of the ``propose`` request that made it: the same request sent
    #: again (a retry after a lost answer or a failed save) gets this proposal back
    token: str = ""
    #: the sha256 of that request but its token (a resend must be the same request)
    request_digest: str = ""

    def forget(self) -> None:
        """Drop what a rejected proposal no longer needs: its spec, initial weights, module
        and encryption agreement (kept: id, driver, shapes, status, reason and the spec's
        digest)."""
        if self.spec:
            self.spec_digest = spec_digest(self.spec)
        self.spec, self.state, self.module, self.he = {}, {}, None, None


def spec_digest(spec: Any) -> str:
    """The sha256 of ``spec``'s canonical JSON."""
    text = json.dumps(spec, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def spec_bytes(spec: Any) -> int:
    """The bytes of ``spec``'s compact JSON (what a proposal's spec costs the host: it is
    kept, and saved in ``host.sspl``'s header, until the data owner decides)."""
    if not spec:
        return 0
    return len(json.dumps(spec, separators=(",", ":"), default=str).encode())


def state_bytes(state: dict[str, Any]) -> int:
    """The bytes the tensors of ``state`` hold."""
    return sum(v.numel() * v.element_size() for v in state.values()
               if isinstance(v, torch.Tensor))


@dataclass(frozen=True)
class AuditEntry:
    """One call the host answered: who, which op, on what, how big, how long, outcome.
    ``caller`` is who called as the data owner reads it (a datasite user's e-mail); ``user``,
    when set, the principal the host checked (``syft-user:<PySyft user id>``): two accounts
    that went by one e-mail differ there."""

    time: float
    caller: str
    op: str
    segment: str | None
    shapes: dict[str, list[int]]
    bytes_in: int
    bytes_out: int
    seconds: float
    outcome: str
    user: str = ""

    def clipped(self) -> AuditEntry:
        """This entry with every text a caller chose cut to a bounded length: the caller,
        op, segment and shape names to :data:`AUDIT_TEXT` characters, at most
        :data:`AUDIT_SHAPES` shapes, the outcome to :data:`AUDIT_OUTCOME` (a refused call with
        a 1 MiB op name costs the log a few hundred bytes, not megabytes)."""
        shapes = {clip(str(k), AUDIT_TEXT): [int(n) for n in v[:8]]
                  for k, v in itertools.islice(self.shapes.items(), AUDIT_SHAPES)}
        segment = None if self.segment is None else clip(self.segment, AUDIT_TEXT)
        return replace(self, caller=clip(self.caller, AUDIT_TEXT), op=clip(self.op, AUDIT_TEXT),
                       user=clip(self.user, AUDIT_TEXT),
                       segment=segment, shapes=shapes,
                       outcome=clip(self.outcome, AUDIT_OUTCOME))


#: the most characters an audit entry keeps of a caller, op, segment or shape name
AUDIT_TEXT = 200
#: ... of an outcome (error messages list the known ops: longer than the names)
AUDIT_OUTCOME = 1000
#: the most tensor shapes an audit entry keeps
AUDIT_SHAPES = 16


def clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, saying how long it was."""
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} chars)"


@dataclass(frozen=True)
class StepRecord:
    """The last step a segment applied: its id, op, request digest and the response sent.

    A request carrying the same step id again (a retry after a lost response) is answered with
    ``response`` and never applied twice."""

    step: int
    op: str
    digest: str
    response: bytes


#: applied steps a segment remembers (with their responses: memory, and the snapshot's size).
#: A model owner resuming from its per-step checkpoint re-sends at most the changing requests
#: of the step it was in: forward and backward (unfused), plus a weight import (SplitFed, relay)
STEPS_KEPT = 4


#: ``Runtime.extra`` key of the randomized-response key (hex): the host's (one per data owner,
#: saved with its state), so each record's noisy label is the same on every release by every
#: segment
LABEL_KEY = "label_key"


def _fresh_rng_state() -> torch.Tensor:
    return torch.Generator().manual_seed(0).get_state()


@dataclass
class Runtime:
    """An approved segment as it runs: its module, optimizer, and the step in flight."""

    proposal: Proposal
    module: nn.Module
    optimizer: torch.optim.Optimizer | None
    pending_input: torch.Tensor | None = None
    pending_output: torch.Tensor | None = None
    pending_penalty: torch.Tensor | None = None
    #: a loss segment's parameter gradients, waiting for the model owner's loss weight
    pending_loss_grads: bool = False
    steps: int = 0
    rng: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))
    last_penalty: float | None = None
    he: Any = None
    #: what the HE client kept at the last save (level B's share), until a restart rebuilds it
    he_saved: dict[str, Any] | None = None
    #: free slots for op families (e.g. the leakage watch) keyed by family name; plain values
    #: are saved in the segment's file, a family saves the rest (``OpFamily.segment_state``)
    extra: dict[str, Any] = field(default_factory=dict)
    #: the last :data:`STEPS_KEPT` applied steps, oldest first (exactly-once: a step sent again
    #: is answered from its record)
    records: list[StepRecord] = field(default_factory=list)
    #: what the pending forward ran on (``dataset`` + ``indices``, or ``x``) and the RNG state it
    #: started from: a restarted host re-runs it to rebuild the pending step exactly
    pending_source: dict[str, Any] | None = None
    #: the torch RNG stream of this segment's own forwards (dropout), kept across restarts
    torch_rng: torch.Tensor = field(default_factory=_fresh_rng_state)

    @property
    def id(self) -> str:
        return self.proposal.id

    @property
    def last_step(self) -> int:
        """The id of the last step applied (0: none yet)."""
        return self.records[-1].step if self.records else 0

    def remember(self, record: StepRecord) -> None:
        """Keep ``record`` (and the :data:`STEPS_KEPT` - 1 before it)."""
        self.records.append(record)
        del self.records[:-STEPS_KEPT]

    def fresh_secrets(self, label_key: str) -> None:
        """Secret randomness the model owner must not predict, at approval and at every
        restore: the release-noise stream (activation noise) starts afresh (restored, it
        would replay draws released since the last save: two releases with the same noise
        give a noise-free difference; nothing needs it reproducible, replayed steps answer
        from their record), and the randomized response uses the host's ``label_key`` (one
        per data owner: each record's noisy label is fixed by it, whichever segment releases
        it)."""
        self.rng.manual_seed(secrets.randbits(63))
        if self.proposal.release_labels and self.proposal.defences.get("label_epsilon", 0) > 0:
            # a segment saved with a key of its own (state from before the host kept one)
            # keeps it: a new key would give each of its records a second draw
            self.extra.setdefault(LABEL_KEY, label_key)

    def clear_pending(self) -> None:
        """Forget the step in flight (nothing applied); an encrypted segment's HE client
        forgets it too (nothing of it is decrypted any more)."""
        self.pending_input = self.pending_output = self.pending_penalty = None
        self.pending_source = None
        if self.pending_loss_grads and self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        self.pending_loss_grads = False
        if self.he is not None:
            self.he.cancel()

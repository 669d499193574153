"""The data contract: what a data owner's datasets must look like for a plan.

A :class:`~syft_split.topology.SplitPlan` reads the datasets named in ``plan.datasets``
(``["train", "test"]`` by default) at every party that runs an input segment. For each such
party and dataset the contract asks for:

- **features**: one row per record, in the shape the plan's input segment accepts (e.g.
  ``(1, 8, 8)`` for a ``Conv2d(1, ...)`` first layer, ``(64,)`` for a ``Linear(64, ...)``);
  a floating dtype (the host hands floating features to the segment as float32);
- **labels**, one per record, when the plan needs them at the data owner: released with each
  batch (``labels=RELEASED``) or used by a loss the data owner computes (U-shaped plans);
- for vertical plans, rows aligned across the parties (row ``j`` is the same record
  everywhere): ``align_records`` builds each ``"<name>@aligned"`` dataset from the record ids
  of ``"<name>"`` by PSI;
- a **mock** asset of the same shape (recommended): public look-alike data the leakage
  review and the live watch train their attacks on. Without one, private records stand in.

Nothing here sends anything: :func:`check` compares a plan with the public metadata a
datasite's ``describe`` returns (sizes, shapes, dtypes, whether labels and ids exist; never
values) and lists every problem with what to change, so that both sides can run it before
any proposal::

    print(contract.explain(plan))                       # what the datasets must look like
    contract.check_datasite(plan, DatasiteConsole(admin_client))   # the data owner: [] = fits
    contract.check_parties(plan, transport)             # the model owner, through ``describe``

A ``describe`` answer is a data owner's word: before anything is run on it, the model owner
checks it against the schema a host answers (:func:`check_describe`: a malformed value is a
:class:`ConfigError` naming the party and the field), and the features of ``max_batch``
records against ``SplitPlan.max_feature_bytes`` (a larger shape is a problem of the contract,
never allocated for the dry run).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard

import torch
from torch import nn

from .errors import ConfigError, shown
from .topology import DATA_OWNER, MODEL_OWNER, RELEASED, SplitPlan

__all__ = ["DatasetRequirement", "requirements", "explain", "check", "check_datasite",
           "check_parties", "check_describe", "require"]

_ALIGNED = "@aligned"
#: the most dimensions a record's features may declare (the wire's bound on a tensor's)
_MAX_FEATURE_DIMS = 8
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclass(frozen=True)
class DatasetRequirement:
    """One dataset a party must hold for a plan (see the module docstring)."""

    party: str
    name: str
    #: which input segments read it (node indices of the plan)
    nodes: tuple[int, ...]
    #: what the first layer of the input segment accepts, in words (e.g. "(1, H, W)")
    features: str
    labels: bool
    ids: bool
    #: built by ``align_records`` from the dataset named without "@aligned"
    aligned: bool = False


def _feature_hint(module: nn.Module) -> str:
    """The feature shape per record the first layer of ``module`` accepts, in words."""
    layers = [m for m in module.modules() if not isinstance(m, _CONTAINERS)
              and not list(m.children())]
    first = layers[0] if layers else None
    if isinstance(first, nn.Flatten):
        nxt = next((m for m in layers[1:] if isinstance(m, nn.Linear)), None)
        if nxt is not None:
            return f"any shape with {nxt.in_features} values per record (flattened)"
    if isinstance(first, nn.Linear):
        return f"({first.in_features},)"
    convs = {nn.Conv1d: "(C, L)", nn.Conv2d: "(C, H, W)", nn.Conv3d: "(C, D, H, W)"}
    for cls, shape in convs.items():
        if isinstance(first, cls):
            return shape.replace("C", str(first.in_channels), 1)
    norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)
    if isinstance(first, norms):
        size = getattr(first, "num_features", None) or list(getattr(first, "normalized_shape", []))
        return f"what {type(first).__name__}({size}) accepts"
    name = type(first).__name__ if first is not None else "the segment"
    return f"what {name} accepts"


def _input_parties(plan: SplitPlan, i: int) -> list[str]:
    owner = plan.nodes[i].owner
    return list(plan.data_owners) if owner == DATA_OWNER else [owner]


def _labels_needed(plan: SplitPlan) -> bool:
    return any(t.labels in (RELEASED, DATA_OWNER) for t in plan.tasks)


def requirements(plan: SplitPlan) -> list[DatasetRequirement]:
    """Every dataset every party must hold for ``plan``, one entry per (party, dataset)."""
    by_key: dict[tuple[str, str], DatasetRequirement] = {}
    inputs = [i for i, n in enumerate(plan.nodes) if not n.inputs and n.owner != MODEL_OWNER]
    labels = _labels_needed(plan)
    for i in inputs:
        shape = _feature_hint(plan.nodes[i].module)
        for party in _input_parties(plan, i):
            for name in plan.datasets:
                key = (party, name)
                old = by_key.get(key)
                nodes = (*old.nodes, i) if old else (i,)
                by_key[key] = DatasetRequirement(
                    party, name, nodes, shape, labels=labels and not plan.is_vertical,
                    ids=plan.is_vertical, aligned=name.endswith(_ALIGNED))
    return list(by_key.values())


def explain(plan: SplitPlan) -> str:
    """The contract of ``plan`` in words: what each data owner's datasets must look like."""
    reqs = requirements(plan)
    lines = ["Data contract of this plan (what each data owner's datasite must hold):"]
    parties = list(dict.fromkeys(r.party for r in reqs))
    for party in parties:
        mine = [r for r in reqs if r.party == party]
        r0 = mine[0]
        names = ", ".join(repr(r.name) for r in mine)
        lines.append(f"  {party}: dataset{'s' * (len(mine) > 1)} {names}, each with")
        lines.append(f"    - features: one row per record, shape {r0.features}, a floating "
                     "dtype (the segment computes in float32)")
        if r0.labels:
            task = plan.tasks[0]
            kind = ("integer class ids" if task.loss == "cross_entropy"
                    else "float targets")
            how = ("released to the model owner with each batch" if plan.release_labels
                   else "kept here: the data owner computes the loss")
            lines.append(f"    - labels: one per record ({kind} for {task.loss}), {how}")
        else:
            lines.append("    - labels: not needed here (the model owner holds them)")
        if r0.ids:
            aligned = sorted({r.name.removesuffix(_ALIGNED) for r in mine if r.aligned})
            if aligned:
                lines.append(f"    - record ids (strings or ints, one per record) on {aligned}: "
                             "align_records(...) builds the '@aligned' datasets from them by PSI")
            else:
                lines.append("    - rows aligned with the other parties' (row j: the same "
                             "record everywhere), e.g. by align_records(...) on record ids")
        lines.append("    - a mock asset of the same shape (recommended: the leakage review and "
                     "watch train their attacks on it; without one, private records stand in)")
    example = ", ".join(f'"{n}": (features, labels)' if reqs and reqs[0].labels
                        else f'"{n}": features' for n in dict.fromkeys(
                            r.name.removesuffix(_ALIGNED) for r in reqs))
    lines.append(f"  installed with syft_split.datasite.install(admin_client, {{{example}}})"
                 " (uploaded sy.Asset objects, private data + mock)")
    return "\n".join(lines)


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _checked_dataset(party: str, name: Any, meta: Any) -> dict[str, Any]:
    """One dataset's entry of ``party``'s ``describe`` answer, checked (see
    :func:`check_describe`)."""
    if not isinstance(name, str) or not 0 < len(name) <= 256:
        raise ConfigError(f"{party}: its describe answer names a dataset {shown(name)}; "
                          "expected a string of 1..256 characters")
    where = f"{party}: its describe answer, datasets[{shown(name)}]"
    if not isinstance(meta, Mapping):
        raise ConfigError(f"{where} is {shown(meta)}; expected a dict with records, "
                          "feature_shape, feature_dtype, has_labels, has_ids")
    records = meta.get("records")
    if not _is_int(records) or records < 0:
        raise ConfigError(f"{where}.records is {shown(records)}; expected an int >= 0")
    shape = meta.get("feature_shape")
    if (not isinstance(shape, (list, tuple)) or len(shape) > _MAX_FEATURE_DIMS
            or not all(_is_int(d) and d > 0 for d in shape)):
        raise ConfigError(f"{where}.feature_shape is {shown(shape)}; expected a list of at most "
                          f"{_MAX_FEATURE_DIMS} positive ints (one record's shape)")
    dtype = meta.get("feature_dtype")
    if not isinstance(dtype, str) or not 0 < len(dtype) <= 64:
        raise ConfigError(f"{where}.feature_dtype is {shown(dtype)}; expected a dtype name "
                          "such as 'float32'")
    for flag in ("has_labels", "has_ids"):
        if not isinstance(meta.get(flag, False), bool):
            raise ConfigError(f"{where}.{flag} is {shown(meta.get(flag))}; expected a bool")
    return {**meta, "feature_shape": list(shape)}


def check_describe(party: str, answer: Any) -> dict[str, dict[str, Any]]:
    """The datasets of ``party``'s ``describe`` answer (the whole answer, or its
    ``"datasets"`` part), checked against what a data owner's host answers: a dict of dataset
    name -> ``records`` (an int >= 0), ``feature_shape`` (a list of at most 8 positive ints),
    ``feature_dtype`` (a name), ``has_labels`` / ``has_ids`` (bools). Anything else raises
    :class:`ConfigError` naming the party and the field; nothing is computed from it before."""
    datasets = answer.get("datasets") if isinstance(answer, Mapping) and "datasets" in answer \
        else answer
    if not isinstance(datasets, Mapping):
        raise ConfigError(f"{party}: its describe answer has datasets = {shown(datasets)}; "
                          "expected a dict of dataset name -> metadata")
    return {name: _checked_dataset(party, name, meta) for name, meta in datasets.items()}


def _feature_bytes(plan: SplitPlan, shape: tuple[int, ...]) -> int:
    """Bytes of the features of ``max_batch`` records (float32; at least the dry run's 2)."""
    return math.prod(shape) * max(plan.max_batch, 2) * 4


def _dry_run(plan: SplitPlan, node: int, meta: Mapping[str, Any]) -> str | None:
    """None if the input segment runs on zeros shaped like the dataset, else torch's reason."""
    shape = list(meta["feature_shape"])
    module = plan.nodes[node].module
    was = module.training
    module.eval()
    try:
        with torch.no_grad():
            module(torch.zeros((2, *shape)))  # float32, as the host hands them over
    except Exception as exc:  # any failure of the user's module is the answer
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    finally:
        module.train(was)
    return None


def _problems_of(plan: SplitPlan, party: str, datasets: Mapping[str, Any],
                 reqs: list[DatasetRequirement]) -> list[str]:
    problems: list[str] = []
    have = sorted(datasets)
    shapes: dict[str, tuple[int, ...]] = {}
    for r in reqs:
        meta = datasets.get(r.name)
        if not isinstance(meta, Mapping):
            base = r.name.removesuffix(_ALIGNED)
            if r.aligned and base in datasets:
                ids = datasets[base].get("has_ids")
                problems.append(f"{party}: no dataset {r.name!r} yet: the model owner builds it "
                                f"with align_records(transport, parties, {base!r}) (PSI on the "
                                f"record ids of {base!r}; the data owner allows it first with "
                                f"allow_alignment({base!r}, user))" + ("" if ids else
                                f"; but {base!r} has no record ids: install it as "
                                "{'features': ..., 'ids': ...}"))
                continue
            fix = ("the data owner adds it: install(admin_client, {..., "
                   f"{r.name.removesuffix(_ALIGNED)!r}: assets}}), or the model owner reads only "
                   f"what exists: SplitPlan(..., datasets={have or ['...']})")
            if r.name == "test":
                fix += " and Trainer(..., test_dataset=None)"
            problems.append(f"{party}: no dataset {r.name!r} (it has {have}); this plan reads "
                            f"{list(plan.datasets)}: {fix}")
            continue
        shape = tuple(meta["feature_shape"])
        shapes[r.name] = shape
        dtype = meta["feature_dtype"]
        if meta["records"] < 1:
            problems.append(f"{party}: dataset {r.name!r} holds no records")
        if r.labels and not meta.get("has_labels"):
            why = ("releases each batch's labels (labels=RELEASED)" if plan.release_labels
                   else "computes the loss at the data owner (U-shaped)")
            problems.append(f"{party}: dataset {r.name!r} has no labels, but this plan {why}: "
                            "upload a labels asset and install it as (features, labels)")
        if not dtype.startswith("float"):
            problems.append(f"{party}: dataset {r.name!r} has {dtype} features; the data owner's "
                            "segments compute in float32: upload floating features (e.g. "
                            "x.astype(numpy.float32))")
            continue
        nbytes = _feature_bytes(plan, shape)
        if nbytes > plan.max_feature_bytes:  # before anything is allocated for the dry run
            problems.append(f"{party}: dataset {r.name!r} has features {shape} per record: "
                            f"{max(plan.max_batch, 2)} records of them are {nbytes} bytes "
                            f"(float32), more than the model owner's bound "
                            f"{plan.max_feature_bytes} (SplitPlan(..., max_feature_bytes=...)): "
                            "set a smaller max_batch, or a larger bound for records that large")
            continue
        for node in r.nodes:
            refused = _dry_run(plan, node, meta)
            if refused is not None:
                seg = plan.nodes[node].name or f"segment {node}"
                problems.append(f"{party}: dataset {r.name!r} has features {shape} {dtype} per "
                                f"record, which input segment {node} ({seg}) does not accept "
                                f"(expected {r.features}): {refused}")
    if len(set(shapes.values())) > 1:
        problems.append(f"{party}: datasets {sorted(shapes)} have different feature shapes "
                        f"{shapes}; one input segment reads all of them")
    return problems


def check(plan: SplitPlan, metadata: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Every way the parties' datasets fail ``plan``'s contract (empty: they fit).

    ``metadata`` maps a party to what its datasite's ``describe`` returned (the whole answer
    or its ``"datasets"`` part). Parties the plan reads data from but absent here are
    reported as problems too. An answer that is not what a host answers raises
    :class:`ConfigError` (:func:`check_describe`).
    """
    return _check(plan, metadata, missing_ok=False)


def _check(plan: SplitPlan, metadata: Mapping[str, Mapping[str, Any]], *,
           missing_ok: bool) -> list[str]:
    problems: list[str] = []
    reqs = requirements(plan)
    checked = {p: check_describe(p, m) for p, m in metadata.items()}
    for party in dict.fromkeys(r.party for r in reqs):
        if party not in checked:
            if not missing_ok:
                problems.append(f"{party}: no metadata (describe) for this party")
            continue
        problems += _problems_of(plan, party, checked[party],
                                 [r for r in reqs if r.party == party])
    if plan.is_vertical:  # row j must be the same record at every party
        for name in plan.datasets:
            counts = {p: m[name]["records"] for p, m in checked.items() if name in m}
            if len(set(counts.values())) > 1:
                problems.append(f"dataset {name!r} holds different numbers of records per party "
                                f"{counts}: a vertical plan needs the same records, aligned "
                                "(align_records)")
    return problems


def check_datasite(plan: SplitPlan, site: Any, *, party: str | None = None) -> list[str]:
    """The data owner's check before any proposal: does its datasite fit ``plan``?

    ``site``: a :class:`~syft_split.datasite.DatasiteConsole`, a
    :class:`~syft_split.host.DataOwnerHost`, or a ``describe`` answer. ``party``: the name
    the plan gives this data owner (default: the host's name, or the plan's only data
    party). Returns every problem (empty: it fits).
    """
    meta: Any = site
    if hasattr(site, "describe") and callable(site.describe):
        meta = site.describe()
    elif hasattr(site, "owner") and callable(site.owner):
        meta = site.owner("describe")
    if not isinstance(meta, Mapping):
        raise ConfigError(f"expected a DatasiteConsole, a DataOwnerHost or a describe() answer, "
                          f"got {type(site).__name__}")
    reqs = requirements(plan)
    names = list(dict.fromkeys(r.party for r in reqs))
    if party is None:
        host = meta.get("host")
        party = host if host in names else (names[0] if len(names) == 1 else None)
    if party is None or party not in names:
        raise ConfigError(f"which party of the plan is this datasite? pass party= one of {names}")
    me = str(party)
    return _problems_of(plan, me, check_describe(me, meta), [r for r in reqs if r.party == me])


def check_parties(plan: SplitPlan, transport: Any) -> list[str]:
    """The model owner's check before proposing: ``describe`` every party the plan reads data
    from, through ``transport``, and :func:`check` the answers."""
    parties = dict.fromkeys(r.party for r in requirements(plan))
    return check(plan, {p: transport.call(p, "describe") for p in parties})


def require(plan: SplitPlan, metadata: Mapping[str, Mapping[str, Any]]) -> None:
    """:func:`check`, raising one :class:`ConfigError` that lists every problem of the
    parties in ``metadata`` and ends with the contract (:func:`explain`)."""
    problems = _check(plan, metadata, missing_ok=True)
    if problems:
        raise ConfigError("the datasets do not fit this plan:\n  - " + "\n  - ".join(problems)
                          + "\n" + explain(plan))

"""Refusals that cost the data owner nothing and tell the model owner nothing (found in
review): what a refused request leaves behind, what its message says, and what it may make
the host allocate before anyone approved anything. In process, through ``host.handle``."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from syft_split import OptimizerSpec, wire
from syft_split.host.core import DataOwnerHost
from syft_split.host.records import HostLimits
from syft_split.spec import module_to_spec, spec_state

from .conftest import TEXT_REVIEW_S

SGD = OptimizerSpec("sgd", lr=1.0).to_json()


def _call(host: DataOwnerHost, caller: str, op: str, **fields: Any) -> dict[str, Any]:
    out: dict[str, Any] = wire.decode(host.handle(caller, wire.encode({"op": op, **fields})))
    return out


def _propose(host: DataOwnerHost, module: nn.Module, caller: str = "mo", **fields: Any) -> str:
    state = {f"state/{k}": v for k, v in spec_state(module).items()}
    r = _call(host, caller, "propose", role="input", spec=module_to_spec(module),
              datasets=["train"], optimizer=SGD, **state, **fields)
    assert "error" not in r, r
    return str(r["segment"])


def _host(labels: torch.Tensor | None = None, **limits: Any) -> DataOwnerHost:
    torch.manual_seed(0)
    limits.setdefault("review_budget_s", TEXT_REVIEW_S)
    host = DataOwnerHost("do", limits=HostLimits(**limits))
    y = torch.randint(0, 3, (64,)) if labels is None else labels
    host.add_dataset("train", torch.randn(64, 8), y)
    return host


def test_a_refused_forward_leaves_nothing_pending() -> None:
    """NoPeek needs two rows: a forward of one record is refused, and no gradient can then
    land on a step that never answered (it stepped the weights without the NoPeek term)."""
    host = _host()
    pid = _propose(host, nn.Sequential(nn.Linear(8, 4)), defences={"nopeek": 5.0})
    host.approve(pid)
    rt = host.runtimes[pid]
    w0 = rt.module[0].weight.detach().clone()
    assert _call(host, "mo", "forward", segment=pid, indices=torch.tensor([3]))["error"]
    assert rt.pending_output is None and rt.pending_source is None
    assert _call(host, "mo", "backward", segment=pid, grad=torch.full((1, 4), 100.0))["error"]
    assert torch.equal(w0, rt.module[0].weight) and rt.steps == 0


def test_label_noise_needs_every_label_among_the_classes_and_never_names_one() -> None:
    """Randomized response with ``num_classes`` below the real labels: refused at proposal; and
    the defence's own error never carries label values (it could leave the data owner)."""
    from syft_split.defences import randomized_response
    from syft_split.errors import ValidationError

    host = _host(labels=torch.randint(0, 10, (64,)))
    module = nn.Sequential(nn.Linear(8, 4))
    state = {f"state/{k}": v for k, v in spec_state(module).items()}
    r = _call(host, "mo", "propose", role="input", spec=module_to_spec(module),
              datasets=["train"], optimizer=SGD, release_labels=True,
              defences={"label_epsilon": 1.0, "num_classes": 2}, **state)
    assert r["error"] == "ConfigError" and "outside [0, num_classes)" in r["message"]
    with pytest.raises(ValidationError) as err:
        randomized_response(torch.tensor([7]), num_classes=2, epsilon=1.0)
    assert "7" not in str(err.value)


def test_loss_steps_count_against_the_record_rate() -> None:
    """A loss segment's input gradient carries its records' labels: ``loss_step`` counts
    toward ``max_records_per_minute`` like a forward."""
    host = _host(max_records_per_minute=10)
    head = nn.Sequential(nn.Linear(4, 3))
    state = {f"state/{k}": v for k, v in spec_state(head).items()}
    r = _call(host, "mo", "propose", role="loss", spec=module_to_spec(head), datasets=["train"],
              optimizer=SGD, input_shape=[4], loss="cross_entropy", **state)
    pid = str(r["segment"])
    host.approve(pid)

    def step(rows: int) -> dict[str, Any]:
        return _call(host, "mo", "loss_step", segment=pid, x=torch.randn(rows, 4),
                     indices=torch.arange(rows), train=False)

    assert "error" not in step(8)
    r = step(8)
    assert r["error"] == "EgressError" and "would release 16 records" in r["message"]


def test_refused_proposals_count_against_the_rate_and_heads_are_sized() -> None:
    """Building and dry-running a proposed module is the work the per-user rate bounds, so a
    refused attempt counts; an auxiliary head is sized on its input like a segment (a
    zero-parameter head of concatenations is refused before anything is allocated)."""
    host = _host(max_proposals_per_minute=3, max_activation_bytes=1 << 20)
    bad = {"role": "input", "spec": module_to_spec(nn.Sequential(nn.Linear(5, 4))),
           "datasets": ["train"], "optimizer": SGD}
    for _ in range(3):
        assert _call(host, "mallory", "propose", **bad)["error"] == "ConfigError"
    r = _call(host, "mallory", "propose", **bad)
    assert r["error"] == "ValidationError" and "in the last minute" in r["message"]

    pid = _propose(host, nn.Sequential(nn.Linear(8, 4)), max_batch=1)
    head = {"input": "z", "nodes": [  # a cat node takes at most 256 inputs
        {"name": "a", "op": "cat", "args": {"dim": 1}, "inputs": ["z"] * 256},
        {"name": "b", "op": "cat", "args": {"dim": 1}, "inputs": ["a"] * 256},
        {"name": "c", "op": "cat", "args": {"dim": 1}, "inputs": ["b"] * 2}], "output": "c"}
    r = _call(host, "mo", "propose_local_loss", segment=pid, loss="cross_entropy", spec=head,
              optimizer=SGD)
    assert r["error"] == "ConfigError" and "bytes per step" in r["message"]


def test_attention_heads_are_sized_before_the_dry_run() -> None:
    """A middle proposal of one attention layer with as many heads as features: its outputs
    are small (0.5 MiB per record) but its per-head scores take 128 MiB per record while it
    runs. They count against ``max_activation_bytes`` (here 64 MiB), so the proposal is
    refused from its spec before the host builds or dry-runs anything."""
    from syft_split.spec import module_from_spec

    length, embed = 512, 64
    spec = {"input": "x", "output": "o", "nodes": [
        {"name": "att", "op": "MultiheadAttention", "inputs": ["x", "x", "x"],
         "args": {"embed_dim": embed, "num_heads": embed, "batch_first": True}},
        {"name": "o", "op": "getitem", "args": {"index": 0}, "inputs": ["att"]}]}
    state = {f"state/{k}": v for k, v in spec_state(module_from_spec(spec)).items()}
    host = _host(max_activation_bytes=64 << 20)
    r = _call(host, "mallory", "propose", role="middle", spec=spec, datasets=[],
              input_shape=[length, embed], max_batch=1, optimizer=SGD, **state)
    assert r["error"] == "ConfigError" and "bytes per step" in r["message"], r
    assert 2 * 4 * embed * length**2 <= int(r["message"].split(" take ")[1].split()[0])


def test_a_value_quadratic_in_the_batch_is_refused_at_proposal() -> None:
    """A graph whose (B*16)^2 outer product is averaged back to (B, 8): 8.5 MiB per step at
    4096 records if sized at one batch and scaled, 16 GiB in fact. Refused at proposal."""
    from syft_split.spec import module_from_spec

    def node(name: str, op: str, inputs: list[str], **args: Any) -> dict[str, Any]:
        return {"name": name, "op": op, "args": args, "inputs": inputs}

    spec = {"input": "x", "output": "fc", "nodes": [
        node("s", "size", ["x"], dim=0), node("col", "reshape", ["x"], shape=[-1, 1]),
        node("row", "reshape", ["x"], shape=[1, -1]), node("m", "add", ["col", "row"]),
        node("r", "mean", ["m"], dim=1), node("o", "reshape", ["r"], shape=["s", -1]),
        node("fc", "Linear", ["o"], in_features=16, out_features=8)]}
    state = {f"state/{k}": v for k, v in spec_state(module_from_spec(spec)).items()}
    r = _call(_host(), "mallory", "propose", role="middle", spec=spec, datasets=[],
              input_shape=[16], optimizer=SGD, **state)
    assert r["error"] == "ConfigError" and "node 'm' (add)" in r["message"], r
    assert "not proportional to the records" in r["message"]


def test_proposed_weights_are_bounded_like_every_other_weight() -> None:
    """A segment proposal's weights go through the same check as a federated model's or an
    auxiliary head's: finite, and within ``HostLimits.max_abs_value``. A finite 3e38 weight
    (or one just past the bound) is refused and no proposal is made."""
    host = _host(max_abs_value=100.0)
    module = nn.Sequential(nn.Linear(8, 2))
    for value in (3e38, 101.0):
        state = {f"state/{k}": v for k, v in spec_state(module).items()}
        state["state/0.weight"] = torch.full((2, 8), value)
        r = _call(host, "mallory", "propose", role="input", spec=module_to_spec(module),
                  datasets=["train"], optimizer=SGD, **state)
        assert r["error"] == "ValidationError" and "exceeds the data owner's bound 100" in r["message"]
    assert not host.proposals_by_id
    _propose(host, module)  # the same segment with its own weights is accepted


def test_what_a_training_step_keeps_is_bounded() -> None:
    """200 Tanh layers on 4096 features: one value is 16 MiB at 1024 records, but a training
    forward keeps all 201 until the gradient returns (3.2 GiB). Refused under the default
    1 GiB; the same chain with a batch that fits is accepted."""
    spec = {"layers": [{"type": "Tanh"} for _ in range(200)]}
    host = _host()
    r = _call(host, "mallory", "propose", role="middle", spec=spec, datasets=[],
              input_shape=[4096], max_batch=1024, optimizer=SGD)
    assert r["error"] == "ConfigError" and "keeps 3372220416 bytes" in r["message"], r
    assert not host.proposals_by_id
    r = _call(host, "mallory", "propose", role="middle", spec=spec, datasets=[],
              input_shape=[4096], max_batch=256, optimizer=SGD)
    assert "error" not in r, r


def test_what_a_training_step_computes_is_bounded() -> None:
    """Compute was unbounded: a chain of large convolutions within every size bound held the
    host (and its lock) for hours per step. A step's FLOPs (3 x the forward's, over max_batch
    records, counted from shapes alone) are bounded by ``HostLimits.max_step_flops``; the same
    spec with a batch that fits is accepted."""
    module = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1))
    host = _host(max_step_flops=1e7)
    per_record = 2 * 8 * 8 * 9 * 8 * 8  # 2 x C_out x C_in x k^2 x H x W (bias not counted)
    state = {f"state/{k}": v for k, v in spec_state(module).items()}
    fields = {"role": "middle", "spec": module_to_spec(module), "datasets": [],
              "input_shape": [8, 8, 8], "optimizer": SGD, **state}
    r = _call(host, "mallory", "propose", max_batch=64, **fields)
    assert r["error"] == "ConfigError" and "accepts 1e+07 FLOPs" in r["message"], r
    counted = float(r["message"].split("computes about ")[1].split(" FLOPs")[0])
    assert 3 * per_record * 64 <= counted <= 1.05 * 3 * per_record * 64  # + elementwise work
    assert not host.proposals_by_id
    r = _call(host, "mallory", "propose", max_batch=32, **fields)  # 7.1e6 FLOPs
    assert "error" not in r, r
    # pooling has no matrix product: four stride-1 96 x 96 windows counted nothing (a 64-record
    # step held the host for minutes); a window's work counts (output x window)
    pools = nn.Sequential(*[nn.MaxPool2d(9, stride=1, padding=4) for _ in range(4)])
    r = _call(host, "mallory", "propose", role="middle", spec=module_to_spec(pools),
              datasets=[], input_shape=[8, 8, 8], optimizer=SGD, max_batch=64)
    assert r["error"] == "ConfigError" and "FLOPs" in r["message"], r


def test_a_duplicate_record_id_is_said_to_the_owner_not_to_the_model_owner() -> None:
    """Duplicate ids: ``allow_alignment`` refuses on the data owner's console; a message that
    can reach the model owner names rows, never the id."""
    from syft_split.errors import ValidationError
    from syft_split.psi import canonical_ids

    host = DataOwnerHost("do")
    host.add_dataset("people", torch.randn(4, 2), ids=["a", "SSN-1", "b", "SSN-1"])
    with pytest.raises(ValidationError, match="duplicate id at rows 1 and 3"):
        host.allow_alignment("people", "mo@example.org")
    with pytest.raises(ValidationError) as err:
        canonical_ids(["a", "SSN-1", "SSN-1"])
    assert "SSN" not in str(err.value)


@pytest.mark.he
def test_an_encryption_agreement_is_bounded_before_anything_is_built() -> None:
    """The agreement is the model owner's choice: its batch within the segment's max_batch and
    its matrices within the host's limits, refused at proposal (its review used to allocate
    d_in x d_out arrays per candidate layout: 1.8 GB for d_out=131072)."""
    host = _host(max_parameters=1_000_000)
    module = nn.Sequential(nn.Linear(8, 16))
    state = {f"state/{k}": v for k, v in spec_state(module).items()}

    def propose(**he: Any) -> dict[str, Any]:
        agreement = {"level": "A", "lr": None, "batch_size": 8, "d_in": 16, "d_out": 4,
                     "bias": True, "params": {}, "options": {}, **he}
        return _call(host, "mo", "propose", role="input", spec=module_to_spec(module),
                     datasets=["train"], optimizer=SGD, max_batch=8, he=agreement, **state)

    assert "error" not in propose()
    r = propose(batch_size=64)
    assert r["error"] == "ConfigError" and "exceeds this segment's max_batch 8" in r["message"]
    r = propose(d_out=131072)
    assert r["error"] == "ConfigError" and "d_in x d_out" in r["message"]


@pytest.mark.he
def test_only_plain_torch_affine_layers_can_be_encrypted() -> None:
    """A layer that is more than its weight and bias (a subclass, parametrizations such as
    weight_norm, forward hooks) would run as the plain affine map: refused by explain()."""
    import warnings

    from he_layers import explain_unprotectable

    class Scaled(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    from torch.nn.utils.parametrizations import weight_norm

    assert explain_unprotectable(nn.Linear(48, 32)) == []
    assert "subclasses" in explain_unprotectable(Scaled(48, 32))[0]
    assert "parametrizations" in explain_unprotectable(weight_norm(nn.Linear(48, 32)))[0]
    hooked = nn.Linear(48, 32)
    hooked.register_forward_hook(lambda m, i, o: o * 2)
    assert "hooks" in explain_unprotectable(hooked)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        old = torch.nn.utils.weight_norm(nn.Linear(48, 32))
    assert "hooks" in explain_unprotectable(old)[0]


@pytest.mark.he
def test_weakened_security_options_are_refused_below_the_floors_and_flagged_above() -> None:
    """Level B's share_bound and the flooding bits are the model owner's choice: below the data
    owner's floors (HostLimits) the proposal is refused; a data owner that lowers its floors
    still reads in the review what the weaker option gives away."""
    module = nn.Sequential(nn.Linear(8, 16))
    state = {f"state/{k}": v for k, v in spec_state(module).items()}

    def propose(host: DataOwnerHost, **options: Any) -> dict[str, Any]:
        agreement = {"level": "B", "lr": 0.05, "batch_size": 8, "d_in": 16, "d_out": 4,
                     "bias": True, "params": {}, "options": options}
        return _call(host, "mo", "propose", role="input", spec=module_to_spec(module),
                     datasets=["train"], optimizer=SGD, max_batch=8, he=agreement, **state)

    host = _host()
    assert "WARNING: security option" not in host.review(str(propose(host)["segment"]))
    # more noise than the default (fewer flood bits) is not weaker (the leakage review's own
    # warnings apply to encrypted segments too: this linear one is flagged as invertible)
    text = host.review(str(propose(host, flood_bits=10)["segment"]))
    assert "WARNING: security option" not in text and "invertible linear map" in text
    before = len(host.proposals())
    for options, words in (({"share_bound": 1e-12}, "share_bound 1e-12"),
                           ({"flood_bits": 34}, "6 bits above")):
        r = propose(host, **options)
        assert r["error"] == "ConfigError" and words in str(r["message"]), r
    assert len(host.proposals()) == before  # refused before anything was kept

    lax = _host(he_min_share_bound=0.0, he_min_grad_mask=0.0, he_min_flood_margin=4)
    text = lax.review(str(propose(lax, share_bound=1e-12)["segment"]))
    assert "WARNING: security option share_bound=1e-12" in text and "reveals x" in text
    text = lax.review(str(propose(lax, flood_bits=34)["segment"]))
    assert "WARNING: security option flood_bits=34" in text and "hide less" in text


def _he_propose(host: DataOwnerHost, level: str = "A", lr: float | None = None,
                **options: Any) -> dict[str, Any]:
    module = nn.Sequential(nn.Linear(8, 16))
    state = {f"state/{k}": v for k, v in spec_state(module).items()}
    agreement = {"level": level, "lr": lr, "batch_size": 8, "d_in": 16, "d_out": 4,
                 "bias": True, "params": {}, "options": options}
    return _call(host, "mo", "propose", role="input", spec=module_to_spec(module),
                 datasets=["train"], optimizer=SGD, max_batch=8, he=agreement, **state)


@pytest.mark.he
def test_level_b_masks_the_weight_gradient_within_a_floor_whatever_lr() -> None:
    """Level B hides dW under the share's change over lr: the model owner's lr shrank the mask
    (lr=1e5 gave dW to 4e-5 relative) while only share_bound had a floor. share_bound / lr is
    held to ``HostLimits.he_min_grad_mask``; the review states the mask."""
    host = _host()
    before = len(host.proposals())
    r = _he_propose(host, "B", lr=100.0)
    assert r["error"] == "ConfigError" and "share_bound / lr = 0.01" in r["message"], r
    assert len(host.proposals()) == before
    text = host.review(str(_he_propose(host, "B", lr=0.05)["segment"]))
    assert "within +-40 (2 share_bound / lr, lr=0.05)" in text


@pytest.mark.he
def test_encryption_agreement_fields_of_the_wrong_type_are_clear_refusals() -> None:
    """Strings and None where numbers belong escaped as raw TypeErrors (RemoteError)."""
    host = _host()
    for level, lr, options in (("A", None, {"x_bound": "64"}), ("B", 0.05, {"share_bound": "1"}),
                               ("B", "0.1", {}), ("A", None, {"mask_bits": "12"}),
                               ("A", None, {"flood_bits": None}), ("A", None, {"x_bound": True})):
        r = _he_propose(host, level, lr, **options)
        assert r["error"] == "ConfigError", (options, lr, r)


@pytest.mark.he
def test_an_encryption_agreement_whose_step_cannot_cross_the_wire_is_refused() -> None:
    """An agreement within the matrix limits whose messages exceed what the host sends or
    accepts was approved, and then every forward encrypted for nothing: refused at proposal."""
    r = _he_propose(_host(max_request_bytes=200_000))  # this layer's step: 368384 bytes in
    assert r["error"] == "ConfigError" and "would arrive as 368384 bytes" in r["message"], r
    assert "error" not in _he_propose(_host(max_request_bytes=400_000))


@pytest.mark.he
def test_a_small_x_bound_is_flagged_in_the_review() -> None:
    """The model owner chooses x_bound; a refused forward tells it an activation exceeded it."""
    host = _host()
    assert "WARNING: x_bound" not in host.review(str(_he_propose(host)["segment"]))
    text = host.review(str(_he_propose(host, x_bound=1e-6)["segment"]))
    assert "WARNING: x_bound=1e-06 is below the default 64" in text

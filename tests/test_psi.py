"""PSI record alignment: k parties end on exactly the common records, in one order, over bytes."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
import torch

from syft_split import psi
from syft_split.errors import (
    ConfigError,
    EmptyBatchError,
    ProtocolError,
    ValidationError,
    WireError,
)
from syft_split.psi import PsiClient, PsiServer, align, canonical_ids, id_sort_key

pytest.importorskip("private_set_intersection.python")


def _shuffled(values: list[int | str], seed: int) -> list[int | str]:
    out = list(values)
    random.Random(seed).shuffle(out)
    return out


@pytest.fixture
def parties() -> dict[str, list[int | str]]:
    # common to all three: 30..59 ; pairwise-only overlaps exist (a∩b has 10..29, b∩c has 60..69)
    return {
        "bank": _shuffled(list(range(0, 60)), 1),
        "hospital": _shuffled([str(i) for i in range(10, 70)], 2),  # same records, as strings
        "lab": _shuffled(list(range(30, 90)) + ["x-17", "y-3"], 3),
    }


def test_all_is_pinned() -> None:
    assert set(psi.__all__) == {
        "DEFAULT_FPR", "DataStructure", "PsiClient", "PsiServer", "align", "canonical_ids", "id_sort_key",
        "request_elements",
    }


def test_two_party_roles_speak_bytes() -> None:
    client = PsiClient(["c", "a", "zz", "b"])
    server = PsiServer(["b", "q", "a", "c"])
    request = client.request()
    setup, response = server.handle(request)
    assert all(type(m) is bytes for m in (request, setup, response))
    rows = client.intersection(setup, response)
    assert rows.dtype == torch.int64
    assert rows.tolist() == [1, 3, 0]  # a, b, c: sorted by id, rows into the client's ids
    # the lower-level calls give the same answer
    assert client.intersection(server.setup(len(client)), server.respond(request)).tolist() == [1, 3, 0]


@pytest.mark.parametrize("data_structure", ["gcs", "raw"])
def test_three_parties_align_on_the_intersection_only(
    parties: dict[str, list[int | str]], data_structure: str
) -> None:
    rows = align(parties, data_structure=data_structure)  # type: ignore[arg-type]
    assert list(rows) == list(parties)
    aligned = {name: [str(parties[name][i]) for i in r.tolist()] for name, r in rows.items()}
    expected = [str(i) for i in range(30, 60)]  # numeric order, though the ids are shuffled
    for name, ids in aligned.items():
        assert ids == expected, name
        assert rows[name].dtype == torch.int64


def test_any_leader_gives_the_same_alignment(parties: dict[str, list[int | str]]) -> None:
    first = align(parties)
    for leader in parties:
        again = align(parties, leader=leader)
        assert {k: v.tolist() for k, v in again.items()} == {k: v.tolist() for k, v in first.items()}


def test_others_only_see_padded_requests(
    parties: dict[str, list[int | str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Round i of the narrowing shows party i |leader| elements, not |leader ∩ P1 ∩ ...|."""
    from private_set_intersection.python import Request

    sizes: list[int] = []
    real_handle = PsiServer.handle

    def spy(self: PsiServer, request: bytes) -> tuple[bytes, bytes]:
        msg = Request()
        msg.ParseFromString(request)
        sizes.append(len(msg.encrypted_elements))
        return real_handle(self, request)

    monkeypatch.setattr(PsiServer, "handle", spy)
    align(parties, leader="bank")
    # narrowing (leader = client, padded to |bank| = 60), then distribution (others = clients)
    assert sizes == [60, 60, len(parties["hospital"]), len(parties["lab"])]


def test_pad_must_cover_the_ids() -> None:
    with pytest.raises(ConfigError, match="pad_to"):
        PsiClient([1, 2, 3], pad_to=2)


@pytest.mark.parametrize("ids", [[1, 2, 1], ["a", "b", "a"], [5, "5"]])
def test_duplicate_ids_are_rejected(ids: list[int | str]) -> None:
    with pytest.raises(ValidationError, match="duplicate id"):
        canonical_ids(ids)
    with pytest.raises(ValidationError, match="party 'lab': duplicate id"):
        align({"bank": [1, 2, 3], "lab": ids})


@pytest.mark.parametrize("bad", [[1.5], [True], [None], [b"raw"]])
def test_ids_must_be_str_or_int(bad: list[object]) -> None:
    with pytest.raises(ValidationError, match="str or int"):
        canonical_ids(bad)  # type: ignore[arg-type]


def test_empty_and_disjoint_sets() -> None:
    with pytest.raises(EmptyBatchError):
        PsiServer([])
    with pytest.raises(EmptyBatchError, match="party 'b'"):
        align({"a": [1], "b": []})
    with pytest.raises(ConfigError, match="no record is common"):
        align({"a": [1, 2], "b": [3, 4], "c": [1, 2]})
    with pytest.raises(ConfigError, match="at least two parties"):
        align({"a": [1, 2]})
    with pytest.raises(ConfigError, match="leader"):
        align({"a": [1], "b": [1]}, leader="z")


def test_tensor_ids_and_sort_key() -> None:
    assert canonical_ids(torch.tensor([3, 1, 2])) == ["3", "1", "2"]
    with pytest.raises(ValidationError):
        canonical_ids(torch.tensor([1.0]))
    assert sorted(["10", "9", "b", "-1", "a", "07"], key=id_sort_key) == ["-1", "9", "10", "07", "a", "b"]


def test_bad_bytes_raise_wire_errors() -> None:
    client, server = PsiClient([1, 2, 3]), PsiServer([2, 3, 4])
    with pytest.raises(WireError):
        server.respond(b"\xff\x00garbage")
    with pytest.raises(WireError):
        server.respond("not bytes")  # type: ignore[arg-type]
    _, response = server.handle(client.request())
    with pytest.raises(WireError):
        client.intersection(b"\xff\x00garbage", response)
    other = PsiClient([7, 8])
    with pytest.raises(ProtocolError, match="elements"):
        client.intersection(*server.handle(other.request()))


def test_bad_parameters() -> None:
    for fpr in (0.0, 1.0, float("nan"), -1e-3):
        with pytest.raises(ConfigError, match="fpr"):
            PsiServer([1], fpr=fpr)
    with pytest.raises(ConfigError, match="data_structure"):
        PsiServer([1], data_structure="hash")  # type: ignore[arg-type]


def test_modules_import_neither_syft_nor_tenseal() -> None:
    code = (
        "import sys, syft_split.psi, syft_split.defences, syft_split.leakage; "
        "assert not {'syft', 'tenseal'} & set(sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_a_gcs_setup_past_its_int64_hash_range_is_refused() -> None:
    """openmined-psi's GCS hash range is max(m, n) * m / fpr in int64: past it the library
    fails with a raw ValueError (before: `basic_string::_M_replace_aux`)."""
    with pytest.raises(ConfigError, match="overflows its int64 hash range"):
        PsiServer([1]).setup(100_000)
    assert PsiServer([1], fpr=1e-3).setup(100_000)  # a larger fpr fits


@pytest.mark.parametrize(("m", "n"), [(20, 50), (3, 1000), (480, 420), (100, 7), (7, 4096)])
def test_the_strict_check_takes_an_honest_set_of_at_most_max_server_ids(m: int, n: int) -> None:
    """With ``fpr`` and ``max_server_ids``, an honest server of ``n`` ids passes exactly when
    ``n <= max_server_ids`` (its hash range names its size past the request's ``m``; at or
    below ``m`` its bits do)."""
    client = PsiClient([f"c{i}" for i in range(m)])
    server = PsiServer([f"c{i}" for i in range(0, 2 * n, 2)])
    setup, response = server.handle(client.request())
    assert client.intersection(setup, response, fpr=psi.DEFAULT_FPR,
                               max_server_ids=n).numel() == min(m // 2 + m % 2, n)
    with pytest.raises(ProtocolError, match=r"hash_range|bytes for a set of at most"):
        client.intersection(setup, response, fpr=psi.DEFAULT_FPR, max_server_ids=max(1, n // 2))
    for bad in (0, -1, True, 2.5, "5"):
        with pytest.raises(ConfigError, match="max_server_ids"):
            client.intersection(setup, response, fpr=psi.DEFAULT_FPR,
                                max_server_ids=bad)  # type: ignore[arg-type]

"""Record alignment for vertical split learning by private set intersection (PSI).

In vertical split learning every party holds different *columns* of the same people; before
training they must agree on the rows they have in common, in the same order, without
showing each other their id lists. This module does that with the ECDH-PSI of
``openmined-psi`` (module ``private_set_intersection.python``). It is pure compute: the
roles exchange ``bytes`` only, so any transport can carry them.

Two-party roles (one round trip)::

    client = PsiClient(my_ids)                     # learns the intersection (its own rows)
    request = client.request()                     # client -> server: bytes
    setup, response = PsiServer(your_ids).handle(request)   # server -> client: bytes, bytes
    rows = client.intersection(setup, response)    # LongTensor of rows into my_ids

The server learns only the number of elements in the request; the client learns which of
its ids the server holds and (exactly with ``"raw"``, roughly with ``"gcs"``/
``"bloom_filter"``) the size of the server's set. Ids are hashed to a curve and blinded
with a fresh key per object, so nothing else travels (semi-honest parties, DDH in the
random-oracle model; see the openmined-psi documentation).

k-party alignment, :func:`align` (a leader ``L`` and the others ``P1..Pm`` in dict order):

1. *Narrowing.* For ``i = 1..m``: ``L`` is client with its current candidates
   ``C(i-1)`` (``C0`` = all of ``L``'s ids), padded with random dummy ids up to ``|L|``;
   ``Pi`` is server with all its ids. ``L`` learns ``C(i) = C(i-1) ∩ Pi``. After ``m``
   rounds ``L`` holds ``G``, the ids common to every party.
2. *Distribution.* ``L`` is server with ``G``; each ``Pi`` is client with all its ids and
   learns ``Pi ∩ G = G``.

Every party then sorts its common rows by id (see :func:`id_sort_key`), so row ``j`` of
every party's index tensor is the same record.

What each party learns (honest-but-curious, no collusion):

* a non-leader ``Pi``: which of its ids are in ``G`` — exactly the global intersection, no
  other id; plus two sizes: ``|L|`` (the padded request of round i) and ``|G|``.
* the leader ``L``: the *prefix* intersections ``L∩P1 ⊇ L∩P1∩P2 ⊇ ... ⊇ G``. So the leader
  can learn ids outside ``G`` (an id of ``L∩P1`` missing from ``P2`` is seen in round 1),
  and for each such id the first party in the order that lacks it; plus every ``|Pi|``.

Why the leader's guarantee is not exact: every protocol built from black-box two-party
PSI has a first execution whose inputs are two parties' own sets, and its client learns
their pairwise intersection, a superset of ``G``. An exact k-party guarantee needs a
multi-party PSI (e.g. OPPRF-based, Kolesnikov et al., CCS 2017) that openmined-psi does not
provide. To limit the leak, make the leader the party that is least sensitive to it
(usually the label holder that already coordinates training) and order the others so
that ``L∩P1`` is small (e.g. the party with the smallest overlap first).

``"gcs"`` and ``"bloom_filter"`` setups have false positives with probability at most
``fpr`` per execution (default ``1e-9``); a false positive would leave parties with
different row counts, which :func:`align` detects (:class:`ProtocolError`). ``"raw"`` has
none but costs ~33 bytes per server id instead of ~5. Ids are ``str`` or ``int`` (also
numpy/torch integers) and are compared as the string ``str(id)``: ``5`` and ``"5"`` are
the same record.
"""

from __future__ import annotations

import numbers
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch

from .errors import ConfigError, EmptyBatchError, ProtocolError, ValidationError, WireError

__all__ = [
    "DEFAULT_FPR",
    "DataStructure",
    "PsiClient",
    "PsiServer",
    "align",
    "canonical_ids",
    "id_sort_key",
    "request_elements",
]

#: default false-positive rate of a ``"gcs"``/``"bloom_filter"`` setup, per execution.
DEFAULT_FPR = 1e-9

DataStructure = Literal["gcs", "raw", "bloom_filter"]
_DATA_STRUCTURES = ("gcs", "raw", "bloom_filter")
_INT_RE = re.compile(r"-?(0|[1-9][0-9]*)\Z")
_DUMMY_PREFIX = "\x00syft-split-psi-dummy:"
#: the largest Golomb divisor and Bloom hash count a setup may use (honest ones: under 64)
_MAX_GCS_DIV = 62
_MAX_BLOOM_HASHES = 256


def _psi() -> Any:
    try:
        import private_set_intersection.python as psi
    except ImportError as exc:  # pragma: no cover - dependency is pinned
        raise ConfigError(
            "PSI needs the `openmined-psi` package (module private_set_intersection.python)"
        ) from exc
    return psi


def canonical_ids(ids: Sequence[str | int] | torch.Tensor, *, party: str | None = None) -> list[str]:
    """Validate one party's ids and return them as strings, in the given order.

    Raises :class:`EmptyBatchError` for no ids and :class:`ValidationError` for an id that
    is not ``str``/integer (``bool`` and floats are refused) or that occurs twice (after
    ``str()``: ``5`` and ``"5"`` collide).
    """
    who = f"party {party!r}: " if party is not None else ""
    if isinstance(ids, torch.Tensor):
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise ValidationError(f"{who}expected integer ids but got a tensor of dtype {ids.dtype}")
        ids = ids.reshape(-1).tolist()
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise ValidationError(f"{who}expected a sequence of str/int ids but got {type(ids).__name__}")
    out: list[str] = []
    seen: dict[str, int] = {}
    for row, value in enumerate(ids):
        if isinstance(value, str):
            key = value
        elif isinstance(value, numbers.Integral) and not isinstance(value, bool):
            key = str(int(value))
        else:
            raise ValidationError(
                f"{who}expected each id to be str or int but row {row} is {type(value).__name__}"
            )
        if key in seen:
            # not the id itself: this message may reach the other party
            raise ValidationError(f"{who}duplicate id at rows {seen[key]} and {row}")
        seen[key] = row
        out.append(key)
    if not out:
        raise EmptyBatchError(f"{who}expected at least one id but got none")
    return out


def id_sort_key(key: str) -> tuple[int, int | str]:
    """The order common rows are returned in: decimal integers numerically, then strings.

    Depends only on the canonical string, so every party sorts the same ids the same way.
    """
    if _INT_RE.match(key):
        return (0, int(key))
    return (1, key)


def _gcs_range(num_client_inputs: int, num_server_inputs: int, fpr: float) -> float:
    """The hash range of openmined-psi's GCS setup (``max(m, n) / (fpr / m)``, as its C++
    computes it in double before truncating it to int64)."""
    m = num_client_inputs
    return max(m, num_server_inputs) / (fpr / m)


def _honest_set_size(hash_range: int, m: int, most_ids: int, fpr: float) -> int | None:
    """The largest set of at most ``most_ids`` ids for which a :class:`PsiServer` at ``fpr``
    sends this ``hash_range`` to a request of ``m`` elements (``max(m, n) * m / fpr``: any
    ``n <= m`` gives the same range), or ``None`` when no such set exists."""
    if hash_range == int(_gcs_range(m, m, fpr)):
        return min(m, most_ids)
    guess = round(hash_range * fpr / m)
    for n in (guess - 1, guess, guess + 1):
        if m < n <= most_ids and int(_gcs_range(m, n, fpr)) == hash_range:
            return n
    return None


def _check_setup(msg: Any, num_client_inputs: int, fpr: float | None,
                 max_server_ids: int | None = None) -> None:
    """Refuse a setup that openmined-psi would abort on (a zero modulus: empty Bloom ``bits``,
    GCS ``hash_range`` 0) or spin in (2^31 hash functions, a huge Golomb ``div``), before the
    library sees it. With ``fpr``, accept only what :class:`PsiServer` with that ``fpr`` sends
    for ``num_client_inputs`` request elements and a set of at most ``max_server_ids`` ids
    (default: as many as the request's elements): a ``"gcs"`` setup with exactly the
    ``hash_range`` of such a set and at most the bits it compresses to."""
    kind = msg.WhichOneof("data_structure")
    m = num_client_inputs
    most_ids = m if max_server_ids is None else max_server_ids
    n = m
    if fpr is not None:
        got = f"{kind} hash_range={msg.gcs.hash_range}" if kind == "gcs" else repr(kind)
        found = _honest_set_size(msg.gcs.hash_range, m, most_ids, fpr) if kind == "gcs" else None
        if found is None and most_ids <= m:
            raise ProtocolError(f"expected a 'gcs' PSI setup with hash_range="
                                f"{int(_gcs_range(m, m, fpr))} (what a server at fpr={fpr} "
                                f"sends for {m} request elements) but got {got}")
        if found is None:
            raise ProtocolError(f"expected a 'gcs' PSI setup with the hash_range a server at "
                                f"fpr={fpr} sends for {m} request elements and at most "
                                f"{most_ids} ids ({int(_gcs_range(m, m, fpr))}.."
                                f"{int(_gcs_range(m, most_ids, fpr))}) but got {got}")
        n = found
    if kind == "gcs":
        gcs = msg.gcs
        if gcs.hash_range < 1:
            raise ProtocolError(f"expected a GCS setup with hash_range >= 1 but got {gcs.hash_range}")
        top = min(_MAX_GCS_DIV, gcs.hash_range.bit_length())
        if not 0 <= gcs.div <= top:
            raise ProtocolError(f"expected a GCS setup with 0 <= div <= {top} (its hash_range is "
                                f"{gcs.hash_range}) but got div={gcs.div}")
        most = (n * (gcs.div + 8)) // 8 + 8  # n elements of div + 1 + ~4 bits each
        if fpr is not None and len(gcs.bits) > most:
            raise ProtocolError(f"expected a GCS setup of at most {most} bytes for a set of at "
                                f"most {n} ids but got {len(gcs.bits)}")
        gcs.bits = gcs.bits + bytes(8)  # the decoder reads up to 8 bytes past the last element
    elif kind == "bloom_filter":
        bloom = msg.bloom_filter
        if not 1 <= bloom.num_hash_functions <= _MAX_BLOOM_HASHES or not bloom.bits:
            raise ProtocolError(f"expected a Bloom filter setup with 1..{_MAX_BLOOM_HASHES} hash "
                                f"functions and some bits but got {bloom.num_hash_functions} "
                                f"hash functions and {len(bloom.bits)} bytes")
    elif kind != "raw":
        raise ProtocolError("expected a PSI setup holding a data structure but got none")


def _parse(cls: Any, data: bytes, what: str) -> Any:
    if not isinstance(data, (bytes, bytearray)):
        raise WireError(f"expected the PSI {what} as bytes but got {type(data).__name__}")
    msg = cls()
    try:
        msg.ParseFromString(bytes(data))
    except Exception as exc:
        raise WireError(f"PSI {what} bytes do not decode: {exc}") from exc
    return msg


def request_elements(request: bytes) -> int:
    """How many elements a client's PSI request holds (what answering it costs a server, on
    top of blinding its own ids). Raises :class:`WireError` on bad bytes."""
    return len(_parse(_psi().Request, request, "request").encrypted_elements)


class PsiServer:
    """The PSI role that answers a request and learns only the request's size.

    Args:
        ids: this party's record ids (str/int, unique, non-empty).
        fpr: false-positive rate of the setup message, per execution (``0 < fpr < 1``).
        data_structure: ``"gcs"`` (compact, default), ``"bloom_filter"`` or ``"raw"`` (exact).
    """

    def __init__(self, ids: Sequence[str | int] | torch.Tensor, *, fpr: float = DEFAULT_FPR,
                 data_structure: DataStructure = "gcs") -> None:
        if not (isinstance(fpr, (int, float)) and 0.0 < fpr < 1.0):
            raise ConfigError(f"Expected argument `fpr` to be in (0, 1) but got {fpr!r}")
        if data_structure not in _DATA_STRUCTURES:
            raise ConfigError(
                f"Expected argument `data_structure` in {_DATA_STRUCTURES} but got {data_structure!r}"
            )
        self._ids = canonical_ids(ids)
        self.fpr = float(fpr)
        self.data_structure: DataStructure = data_structure
        psi = _psi()
        self._ds = {"gcs": psi.DataStructure.GCS, "raw": psi.DataStructure.RAW,
                    "bloom_filter": psi.DataStructure.BLOOM_FILTER}[data_structure]
        self._server = psi.server.CreateWithNewKey(True)

    def __len__(self) -> int:
        return len(self._ids)

    def setup(self, num_client_inputs: int) -> bytes:
        """The setup message (this party's blinded ids) sized for a client of that many ids."""
        if not isinstance(num_client_inputs, int) or num_client_inputs < 1:
            raise ValidationError(
                f"Expected `num_client_inputs` to be a positive int but got {num_client_inputs!r}"
            )
        if self.data_structure == "gcs" and _gcs_range(num_client_inputs, len(self._ids),
                                                       self.fpr) >= 2**63:
            raise ConfigError(f"a 'gcs' setup at fpr={self.fpr} for {num_client_inputs} request "
                              f"elements and {len(self._ids)} ids overflows its int64 hash range; "
                              "use fewer elements or a larger fpr")
        msg = self._server.CreateSetupMessage(self.fpr, num_client_inputs, self._ids, self._ds)
        return bytes(msg.SerializeToString())

    def respond(self, request: bytes) -> bytes:
        """Blind a client's request with this party's key; raises :class:`WireError` on bad bytes."""
        return self._respond(self._parse_request(request))

    def handle(self, request: bytes) -> tuple[bytes, bytes]:
        """One round trip: ``(setup, response)`` for a client's request."""
        req = self._parse_request(request)
        return self.setup(len(req.encrypted_elements)), self._respond(req)

    def _parse_request(self, request: bytes) -> Any:
        req = _parse(_psi().Request, request, "request")
        n = len(req.encrypted_elements)
        if not req.reveal_intersection:
            raise ValidationError("expected a PSI request with reveal_intersection=True")
        if n == 0:
            raise EmptyBatchError("expected a PSI request with at least one element but got none")
        if len(set(req.encrypted_elements)) != n:  # one id blinded twice: never honest
            raise ValidationError(f"expected distinct PSI request elements but "
                                  f"{n - len(set(req.encrypted_elements))} repeat")
        return req

    def _respond(self, req: Any) -> bytes:
        try:
            resp = self._server.ProcessRequest(req)
        except RuntimeError as exc:
            raise WireError(f"PSI request refused: {exc}") from exc
        return bytes(resp.SerializeToString())


class PsiClient:
    """The PSI role that learns which of its own ids the server holds.

    Args:
        ids: this party's record ids (str/int, unique, non-empty).
        pad_to: pad the request with random dummy ids up to this many elements, so the
            server learns ``pad_to`` instead of ``len(ids)``; dummies never match.
    """

    def __init__(self, ids: Sequence[str | int] | torch.Tensor, *, pad_to: int | None = None) -> None:
        self._ids = canonical_ids(ids)
        if pad_to is not None and (not isinstance(pad_to, int) or pad_to < len(self._ids)):
            raise ConfigError(
                f"Expected argument `pad_to` to be an int >= {len(self._ids)} (the number of ids) "
                f"but got {pad_to!r}"
            )
        n_dummy = 0 if pad_to is None else pad_to - len(self._ids)
        padded = self._ids + [_DUMMY_PREFIX + secrets.token_hex(16) for _ in range(n_dummy)]
        #: a secret order for the request: position k holds row _order[k], so a server that
        #: answers in another order cannot pick which rows match (it reorders at random)
        self._order = list(range(len(padded)))
        secrets.SystemRandom().shuffle(self._order)
        self._padded = [padded[k] for k in self._order]
        self._client = _psi().client.CreateWithNewKey(True)

    def __len__(self) -> int:
        return len(self._ids)

    def request(self) -> bytes:
        """The request message: this party's ids (and dummies), hashed and blinded."""
        return bytes(self._client.CreateRequest(self._padded).SerializeToString())

    def intersection(self, setup: bytes, response: bytes, *, fpr: float | None = None,
                     max_server_ids: int | None = None) -> torch.Tensor:
        """Rows (into ``ids``) of the ids the server also holds, sorted by :func:`id_sort_key`.

        ``fpr``: accept only the setup a :class:`PsiServer` at this ``fpr`` (``"gcs"``) sends for
        this request and a set of at most ``max_server_ids`` ids (default: no larger than the
        request), so a server cannot claim more ids than that (a data owner's host, with the
        model owner's common ids as server; the model owner, with a data owner's declared
        records). Any setup is first checked for parameters that would crash or stall
        openmined-psi. Returns an int64 tensor (possibly empty). Raises
        :class:`WireError` on bad bytes, :class:`ProtocolError` on a refused setup or response
        (a repeated element: never honest).
        """
        if max_server_ids is not None and (not isinstance(max_server_ids, int)
                                           or isinstance(max_server_ids, bool) or max_server_ids < 1):
            raise ConfigError(f"Expected argument `max_server_ids` to be a positive int but got "
                              f"{max_server_ids!r}")
        psi = _psi()
        setup_msg = _parse(psi.ServerSetup, setup, "setup")
        resp_msg = _parse(psi.Response, response, "response")
        elements = resp_msg.encrypted_elements
        if len(elements) != len(self._padded):
            raise ProtocolError(
                f"expected a PSI response with {len(self._padded)} elements (one per request "
                f"element) but got {len(elements)}"
            )
        if len(set(elements)) != len(elements):
            raise ProtocolError(f"expected distinct PSI response elements but "
                                f"{len(elements) - len(set(elements))} repeat")
        _check_setup(setup_msg, len(self._padded), fpr, max_server_ids)
        try:
            hits = self._client.GetIntersection(setup_msg, resp_msg)
        except RuntimeError as exc:
            raise WireError(f"PSI setup/response refused: {exc}") from exc
        found = (self._order[i] for i in hits)
        rows = sorted((r for r in found if r < len(self._ids)), key=lambda r: id_sort_key(self._ids[r]))
        return torch.tensor(rows, dtype=torch.int64)


def align(parties: Mapping[str, Sequence[str | int] | torch.Tensor], *, leader: str | None = None,
          fpr: float = DEFAULT_FPR, data_structure: DataStructure = "gcs") -> dict[str, torch.Tensor]:
    """Align k parties on the records they all hold (see the module docstring for who learns what).

    Runs the leader/other roles of the protocol in this process; only bytes pass between
    roles, so the same sequence runs over any transport.

    Args:
        parties: party name -> its record ids (row ``r`` of the party's data has id ``ids[r]``).
        leader: the party that coordinates (default: the first one).
        fpr, data_structure: as in :class:`PsiServer`.

    Returns:
        party name -> int64 row indices of the common records, the same records in the same
        order for every party (sorted by :func:`id_sort_key`).

    Raises:
        ConfigError: fewer than two parties, unknown leader, or no record common to all.
        ValidationError / EmptyBatchError: a party's ids are bad (named in the message).
        ProtocolError: parties ended with different counts (a PSI false positive).
    """
    if not isinstance(parties, Mapping) or len(parties) < 2:
        got = f"{len(parties)} party" if isinstance(parties, Mapping) else type(parties).__name__
        raise ConfigError(f"Expected a mapping of at least two parties to align but got {got}")
    names = list(parties)
    leader = names[0] if leader is None else leader
    if leader not in parties:
        raise ConfigError(f"Expected argument `leader` to be one of {names} but got {leader!r}")
    ids = {name: canonical_ids(parties[name], party=name) for name in names}
    others = [n for n in names if n != leader]
    lead_ids = ids[leader]

    # 1. narrowing: the leader (client) against each other party (server) in turn.
    cand = torch.arange(len(lead_ids))
    for name in others:
        client = PsiClient([lead_ids[i] for i in cand.tolist()], pad_to=len(lead_ids))
        server = PsiServer(ids[name], fpr=fpr, data_structure=data_structure)  # runs at `name`
        setup, response = server.handle(client.request())
        cand = cand[client.intersection(setup, response)]
        if cand.numel() == 0:
            raise ConfigError("no record is common to all parties; nothing to align")
    cand = cand[sorted(range(len(cand)), key=lambda j: id_sort_key(lead_ids[int(cand[j])]))]

    # 2. distribution: the leader (server with G) against each other party (client).
    out = {leader: cand}
    common = [lead_ids[i] for i in cand.tolist()]
    for name in others:
        client = PsiClient(ids[name])
        server = PsiServer(common, fpr=fpr, data_structure=data_structure)  # runs at the leader
        setup, response = server.handle(client.request())
        out[name] = client.intersection(setup, response)
    counts = {name: int(rows.numel()) for name, rows in out.items()}
    if len(set(counts.values())) != 1:
        raise ProtocolError(f"parties ended with different numbers of common rows {counts} "
                            "(a PSI false positive); rerun, or use data_structure='raw'")
    return {name: out[name] for name in names}

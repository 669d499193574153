"""Where a model owner's channel may connect: the address in a data owner's ticket, checked.

The data owner chooses the address its ``open_channel`` answer names. Unchecked, a malicious
data owner could make the model owner open TCP/TLS connections to any host and port (scan the
model owner's network, reach its internal services). A channel connects only to an address of
a host the model owner has reason to trust for that party (:func:`vetted`): the host its
transport reaches that party's datasite at (the datasite URL's host; ``localhost`` for a
datasite in this process) and the one host it allows that party besides
(``channel_hosts={party: host}``, for a channel that listens on another interface). The port
is free. A ticket naming one of these hosts connects to what that name resolves to; a ticket
naming an IP address connects to it only if a trusted name resolves to it; any other ticket is
refused before any connection is attempted (another name is not even looked up: a data owner
cannot make the model owner's resolver query names of its choosing).

Names are resolved with a deadline (:func:`resolve`): a resolver that hangs fails the open in
time (the lookup is left to finish on its own daemon thread); the connection then goes to the
resolved address (:func:`connect`), so nothing is resolved again outside the check.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..errors import ConfigError, TransportError, shown

__all__ = ["Address", "channel_hosts", "connect", "resolve", "vetted"]

#: one TCP address as ``socket.getaddrinfo`` gives it: (family, sockaddr)
Address = tuple[int, tuple[Any, ...]]


def channel_hosts(value: Mapping[str, str] | None) -> dict[str, str]:
    """The model owner's ``channel_hosts`` (``{party: host}``), checked; else ConfigError."""
    hosts = dict(value or {})
    for party, host in hosts.items():
        if not isinstance(party, str) or not isinstance(host, str) or not host.strip():
            raise ConfigError(f"channel_hosts maps a party name to one host name or address, "
                              f"got {party!r}: {host!r}")
    return hosts


def resolve(host: str, port: int, timeout: float) -> list[Address]:
    """``host``'s TCP addresses (``socket.getaddrinfo``) within ``timeout`` seconds, else
    :class:`TimeoutError`; a name that does not resolve raises :class:`OSError`."""
    found: list[Address] = []
    failed: list[OSError] = []
    done = threading.Event()

    def lookup() -> None:
        try:
            found.extend((family, sockaddr) for family, _, _, _, sockaddr in
                         socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except Exception as exc:  # e.g. UnicodeError for a malformed name
            failed.append(exc if isinstance(exc, OSError) else OSError(str(exc)))
        finally:
            done.set()

    threading.Thread(target=lookup, name="syft-split resolve", daemon=True).start()
    if not done.wait(max(timeout, 0.0)):
        raise TimeoutError(f"resolving {shown(host)} took over {timeout:.3g} s")
    if failed:
        raise failed[0]
    return found


def _same(a: str, b: str) -> bool:
    return a.lower().rstrip(".") == b.lower().rstrip(".")


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def vetted(host: str, port: int, trusted: Sequence[str],
           timeout: Callable[[], float]) -> list[Address]:
    """The addresses a ticket naming ``host``:``port`` may be connected at, given the hosts
    ``trusted`` for its party (see the module docstring). ``timeout()`` is the time left for
    each lookup. Raises :class:`TransportError` when the ticket names none of them (nothing
    was connected), :class:`OSError` (:class:`TimeoutError`) when a name cannot be resolved
    (in time)."""
    if any(_same(host, name) for name in trusted):
        return resolve(host, port, timeout())
    usable: list[Address] = []
    if _ip(host) is not None:  # an address: one a trusted name resolves to?
        allowed: set[Any] = set()
        for name in trusted:
            try:
                allowed.update(_ip(sockaddr[0]) for _, sockaddr in resolve(name, port, timeout()))
            except TimeoutError:
                raise
            except OSError:  # a trusted name that does not resolve allows nothing
                continue
        if _ip(host) in allowed:
            usable = resolve(host, port, timeout())  # an address: nothing is looked up
    if not usable:
        raise TransportError(
            f"the ticket names {shown(host)} port {port}, which is not the datasite's host "
            f"({', '.join(trusted)}) nor one of its addresses: refused, nothing was connected "
            "(a model owner allows another data-plane host with channel_hosts={party: host})")
    return usable


def connect(addresses: Sequence[Address], timeout: Callable[[], float]) -> socket.socket:
    """A TCP connection to the first of ``addresses`` that accepts (as
    ``socket.create_connection`` does, without resolving anything); ``timeout()`` is the time
    left for each attempt."""
    last: OSError = OSError("no address to connect to")
    for family, sockaddr in addresses:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout())
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            sock.close()
            last = exc
    raise last

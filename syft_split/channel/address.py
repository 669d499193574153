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
cannot make the model owner's resolver query names of its choosing). What a trusted *name*
resolves to must not be a loopback, unspecified, link-local or multicast address
(:func:`routable`), unless the name is ``localhost`` (a datasite in this process or on this
machine): a data owner that controls its domain's DNS could otherwise point the datasite's
name at the model owner's own machine when a channel opens (review R12). A model owner that
wants such an address writes it literally (``channel_hosts={party: "127.0.0.1"}``). Private
addresses (10/8, 192.168/16, fc00::/7, ...) stay allowed: intranet datasites use them.

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

__all__ = ["Address", "channel_hosts", "connect", "resolve", "routable", "vetted"]

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


def routable(name: str, addresses: Sequence[Address]) -> list[Address]:
    """The addresses trusted ``name`` resolved to that a channel may use: all of them for
    ``localhost`` or an address written literally; otherwise none that is loopback,
    unspecified, link-local or multicast (a name its data owner's DNS points there)."""
    if _same(name, "localhost") or _ip(name) is not None:
        return list(addresses)
    return [(family, sockaddr) for family, sockaddr in addresses
            if not _local(_ip(str(sockaddr[0]).split("%")[0]))]


def _local(ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip is None or ip.is_loopback or ip.is_unspecified or ip.is_link_local or \
        ip.is_multicast


def vetted(host: str, port: int, trusted: Sequence[str],
           timeout: Callable[[], float]) -> list[Address]:
    """The addresses a ticket naming ``host``:``port`` may be connected at, given the hosts
    ``trusted`` for its party (see the module docstring). ``timeout()`` is the time left for
    each lookup. Raises :class:`TransportError` when the ticket names none of them (nothing
    was connected), :class:`OSError` (:class:`TimeoutError`) when a name cannot be resolved
    (in time)."""
    if any(_same(host, name) for name in trusted):
        found = resolve(host, port, timeout())
        literal = {_ip(name) for name in trusted} - {None}  # addresses the MO wrote itself
        ok = routable(host, found)
        kept = [a for a in found if a in ok or _ip(str(a[1][0])) in literal]
        if found and not kept:
            raise TransportError(
                f"the datasite's host {shown(host)} resolves only to loopback, link-local or "
                "unspecified addresses: refused, nothing was connected (a model owner that "
                "means it writes the address in channel_hosts={party: address})")
        return kept
    usable: list[Address] = []
    if _ip(host) is not None:  # an address: one a trusted name resolves to?
        allowed: set[Any] = set()
        for name in trusted:
            try:
                allowed.update(_ip(str(sockaddr[0])) for _, sockaddr in
                               routable(name, resolve(name, port, timeout())))
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

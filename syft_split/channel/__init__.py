"""The direct data plane: TLS 1.3 channels negotiated and governed through PySyft.

PySyft stays the control plane (proposal, review, approval, audit, the data owner's console);
after approval, a model owner's transport asks the datasite for a channel (op
``open_channel``, answered by :mod:`syft_split.host.channel`) and sends that segment's steps
over it. The datasite answers every frame with the same ``host.handle`` as a PySyft call.

What a channel guarantees: the model owner talks to the datasite that answered through PySyft
(its certificate came with the PySyft answer and is the only one trusted, fingerprint
checked); the datasite talks to the user PySyft authenticated (the per-channel 32-byte key was
given to that user only) and only about the segments the channel is bound to; frames are
encrypted and authenticated by TLS 1.3 and numbered (a replayed or reordered frame is refused,
nothing runs). Not hidden: the channel id (sent as TLS server name) and traffic sizes and
timing. Anyone who can reach the address can attempt handshakes: the datasite caps concurrent
connections and new connections per address and minute (more are closed before any TLS), and
counts refused hellos (audited once per interval per channel). Keys and
certificates live in memory only (the standard library loads the certificate from a private
temporary file, removed at once).

- :mod:`.tls`: certificates (``cryptography``), TLS 1.3 contexts (stdlib ``ssl``), framing.
- :mod:`.server`: :class:`ChannelServer`, the listener in the data owner's process (the
  channel table in :mod:`.table`, one connection's hello and frames in :mod:`.connection`,
  unauthenticated peers in :mod:`.strangers`).
- :mod:`.client`: :class:`ChannelClient` (one channel), :class:`ChannelRouter` (channels of
  a transport, opened on demand), :class:`DirectTransport` (any transport + channels); the
  ticket's address is checked in :mod:`.address` (only the datasite's host, or one the model
  owner allowed for that party, ``channel_hosts``, is connected to).
"""

from .client import ChannelClient, ChannelRouter, ChannelTicket, DirectTransport
from .server import DATA_OPS, Channel, ChannelServer

__all__ = ["DATA_OPS", "Channel", "ChannelClient", "ChannelRouter", "ChannelServer",
           "ChannelTicket", "DirectTransport"]

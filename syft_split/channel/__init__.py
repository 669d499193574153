"""The direct data plane: TLS 1.3 channels negotiated and governed through PySyft.

PySyft stays the control plane (proposal, review, approval, audit, the data owner's console);
after approval, a model owner's transport asks the datasite for a channel (op
``open_channel``, answered by :mod:`syft_split.host.channel`) and sends that segment's steps
over it. The datasite answers every frame with the same ``host.handle`` as a PySyft call.

- :mod:`.tls`: certificates (``cryptography``), TLS 1.3 contexts (stdlib ``ssl``), framing.
- :mod:`.server`: :class:`ChannelServer`, the listener in the data owner's process.
- :mod:`.client`: :class:`ChannelClient` (one channel), :class:`ChannelRouter` (channels of
  a transport, opened on demand), :class:`DirectTransport` (any transport + channels).
"""

from .client import ChannelClient, ChannelRouter, ChannelTicket, DirectTransport
from .server import CONTROL_OPS, Channel, ChannelServer

__all__ = ["CONTROL_OPS", "Channel", "ChannelClient", "ChannelRouter", "ChannelServer",
           "ChannelTicket", "DirectTransport"]

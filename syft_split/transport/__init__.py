"""Transports: the seam that moves bytes between parties (PySyft one loads lazily)."""

from .base import MODEL_OWNER, TrafficLog, TrafficRecord, Transport
from .inprocess import InProcessTransport

__all__ = ["MODEL_OWNER", "InProcessTransport", "TrafficLog", "TrafficRecord", "Transport"]

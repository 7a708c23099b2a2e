"""Clients of a TF Serving model server running a `kneetf export`: gRPC and REST.

Names load lazily, so `import kneetf.client.request` (used by the exporter's warm-up writer)
does not pull in grpc.
"""
from __future__ import annotations

from typing import Any

_LAZY = {
    "ServingClient": "kneetf.client.grpc",
    "RestClient": "kneetf.client.rest",
    "ServingError": "kneetf.client.request",
    "ModelNotFoundError": "kneetf.client.request",
    "ServerUnavailableError": "kneetf.client.request",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kneetf.client' has no attribute {name!r}")

"""Clients of a TF Serving model server running a `kneetf export`: gRPC and REST.

Names load lazily, so `import kneetf.client` and the REST client do not pull in grpc or
TensorFlow. Requests and responses are encoded by `kneetf.protocol`.
"""
from __future__ import annotations

from typing import Any

_LAZY = {
    "ServingClient": "kneetf.client.grpc",
    "RestClient": "kneetf.client.rest",
    "ServingError": "kneetf.errors",
    "ModelNotFoundError": "kneetf.errors",
    "ServerUnavailableError": "kneetf.errors",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kneetf.client' has no attribute {name!r}")

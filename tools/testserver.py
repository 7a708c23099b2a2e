"""The TF Serving stand-in of `tests/serving_server.py` for the tools: imported by path
(tests/ is not a package) or run as a server process of its own, as TF Serving runs.

    from testserver import load_test_server, ServerProcess    # tools/ is on sys.path
"""
from __future__ import annotations

import importlib.util
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SERVER_SCRIPT = ROOT / "tests" / "serving_server.py"


def load_test_server() -> ModuleType:
    """tests/serving_server.py as a module (imported once per process)."""
    name = "kneetf_test_serving_server"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SERVER_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    """A TCP port of localhost that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """The test server serving `base` (a folder of numeric version folders) as model `name`
    in a process of its own; `grpc_target` and `rest_url` once entered (it waits until the
    model answers, at most `timeout` seconds)."""

    def __init__(self, base: str | Path, name: str = "kneetf", timeout: float = 120.0) -> None:
        self.base, self.name, self.timeout = Path(base), name, timeout
        self.grpc_port, self.rest_port = free_port(), free_port()
        self.grpc_target = f"127.0.0.1:{self.grpc_port}"
        self.rest_url = f"http://127.0.0.1:{self.rest_port}"
        self._process: subprocess.Popen | None = None

    def __enter__(self) -> "ServerProcess":
        from kneetf.client import ServingClient

        self._process = subprocess.Popen(
            [sys.executable, str(SERVER_SCRIPT), str(self.base), "--name", self.name, "--grpc-port",
             str(self.grpc_port), "--rest-port", str(self.rest_port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + self.timeout
        with ServingClient(self.grpc_target, self.name, retries=0, timeout=5.0) as probe:
            while not probe.health():
                if self._process.poll() is not None:
                    raise RuntimeError(f"the test server ended: {self._process.stderr.read().decode()[-2000:]}")
                if time.monotonic() > deadline:
                    self.__exit__()
                    raise TimeoutError(f"the test server did not serve {self.name} within {self.timeout:g} s")
                time.sleep(0.2)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

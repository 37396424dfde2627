"""Real ``kvtier serve`` processes for tests: a free loopback port, ready when /health answers, stopped
with SIGTERM at the end (then killed if it hangs), its output kept for the assertion messages.

The port is reserved (``kvtier.bench.servers.free_port``) for the seconds the process takes to bind
it, and a process that still could not bind it ("address already in use") is started again on a new
port, ``START_ATTEMPTS`` in all."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from kvtier.bench.servers import ADDRESS_IN_USE, PortTaken, free_port

START_TIMEOUT_S = 90.0
START_ATTEMPTS = 3
STOP_TIMEOUT_S = 60.0
SRC = str(Path(__file__).resolve().parents[1] / "src")
MODEL_LABEL = re.compile(r'model_name="[^"]*",?')  # on every sample: the served model's name


class KvtierServer:
    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        full_env = {**os.environ, "PYTHONPATH": SRC, "KVTIER_TIERS": "none", **(env or {})}
        for attempt in range(1, START_ATTEMPTS + 1):
            self.port = free_port()
            self.log = tempfile.NamedTemporaryFile(prefix="kvtier-serve-", suffix=".log", delete=False)  # noqa: SIM115
            cmd = [
                sys.executable,
                "-m",
                "kvtier.cli",
                "serve",
                "--port",
                str(self.port),
                "--log-level",
                "warning",
            ]
            self.proc = subprocess.Popen(
                [*cmd, *args], stdout=self.log, stderr=subprocess.STDOUT, env=full_env
            )
            try:
                self._wait_ready()
                return
            except PortTaken:
                if attempt == START_ATTEMPTS:
                    raise

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                output = self.output()
                error = PortTaken if ADDRESS_IN_USE in output.lower() else RuntimeError
                raise error(f"kvtier serve exited with {self.proc.returncode}:\n{output}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(
            f"kvtier serve did not answer /health within {START_TIMEOUT_S} s:\n{self.output()}"
        )

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = STOP_TIMEOUT_S) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.terminate()
            try:
                return self.wait()
            except subprocess.TimeoutExpired:
                return None
        return self.proc.returncode

    def metrics(self) -> dict[str, float]:
        """Samples by their text name less the ``model_name`` label, e.g. 'kvtier:pool_blocks_in_use'
        or 'kvtier:tier_blocks_loaded_total{tier="host"}'."""
        text = httpx.get(self.url + "/metrics", timeout=30.0).text
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[MODEL_LABEL.sub("", name).replace("{}", "")] = float(value)
        return out

    def wait_idle(self, timeout: float = 30.0) -> dict[str, float]:
        """Metrics once no request runs, waits or loads and no block is held (or the last seen)."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            busy = sum(m[f"kvtier:num_requests_{s}"] for s in ("running", "waiting", "loading"))
            if (busy == 0 and m["kvtier:pool_blocks_in_use"] == 0) or time.monotonic() > deadline:
                return m
            time.sleep(0.1)

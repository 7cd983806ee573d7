"""One `rewardkit serve` for the service tests: embedded models, loopback, a free port.

The server runs as the command runs (``python -m rewardkit.cli serve``) in its own process
group, with an API key and small limits; its generate workers are held after loading (the
``REWARDKIT_SERVE_HOLD`` hook) until the fixture has seen ``/health`` answer 503, then
released. Data: a few AdWorld renders (64 px, the embedded models' size), a `rewardkit
generate` output over their products, and the scoring tests' folder (good and bad files).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytest.importorskip("litserve", reason="the service needs rewardkit[serve] (make test has it)")
import httpx  # noqa: E402  (after the skip: comes with rewardkit[serve])

from rewardkit.cli import main
from rewardkit.serve.config import HOLD_ENV
from rewardkit.world.export import render_world
from tests.test_scoring import make_folder

KEY = "test-key-123"
START_SECONDS = 300  # a loaded 2-core machine takes ~40 s to load three workers


@dataclass
class Server:
    url: str
    root: Path
    db: str
    outputs: Path
    process: subprocess.Popen
    loading: httpx.Response | None = None  # /health while the generate worker was held
    ready: httpx.Response | None = None
    log: Path = field(default_factory=Path)

    def client(self, key: str | None = KEY, timeout: float = 120) -> httpx.Client:
        headers = {"X-API-Key": key} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def serve_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve")
    render_world(root / "world", 6, seed=7, size=64, progress=False)
    make_folder(root / "images")
    rc = main([
        "generate", "--products", str(root / "world" / "manifest.parquet"),
        "--out", str(root / "gen"), "--steps", "2", "--no-progress", "--device", "cpu",
    ])  # fmt: skip
    assert rc == 0
    return root


@pytest.fixture(scope="session")
def server(serve_data, tmp_path_factory):
    root = serve_data
    state = tmp_path_factory.mktemp("serve_state")
    port = _free_port()
    gate = state / "release-generate"
    log = state / "server.log"
    db = f"sqlite:///{state / 'labels.db'}"
    argv = [
        sys.executable, "-m", "rewardkit.cli", "serve", "--port", str(port), "--api-key", KEY,
        "--device", "cpu", "--steps", "2", "--batch-size", "8", "--batch-timeout", "0.05",
        "--max-images", "12", "--max-body-mb", "2", "--max-pixels", "250000",
        "--max-attempts", "3", "--db", db, "--outputs", str(state / "outputs"),
        "--review-root", str(root), "--log-level", "warning",
    ]  # fmt: skip
    env = {**os.environ, HOLD_ENV: f"generate:{gate}"}
    with open(log, "wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)  # fmt: skip
    server = Server(f"http://127.0.0.1:{port}", root, db, state / "outputs", process, log=log)
    try:
        deadline = time.monotonic() + START_SECONDS
        with httpx.Client(base_url=server.url, timeout=10) as client:
            while server.ready is None:
                if process.poll() is not None:
                    pytest.fail(f"rewardkit serve exited {process.returncode}: "
                                f"{log.read_text()[-3000:]}")  # fmt: skip
                if time.monotonic() > deadline:
                    pytest.fail(f"rewardkit serve not ready in {START_SECONDS} s: "
                                f"{log.read_text()[-3000:]}")  # fmt: skip
                try:
                    r = client.get("/health")
                except httpx.TransportError:  # not listening yet
                    time.sleep(0.25)
                    continue
                if r.status_code == 503 and server.loading is None:
                    server.loading = r
                    gate.touch()  # seen loading: let the generate worker finish
                elif r.status_code == 200:
                    server.ready = r
                else:
                    time.sleep(0.1)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        try:  # any worker the server left behind: its own process group only
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

"""What ``rewardkit serve`` runs: models, devices, batching, limits, review storage."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ENDPOINTS", "HOLD_ENV", "ServeConfig"]

ENDPOINTS = ("score", "inspect", "generate")
# A test hook: "<endpoint>:<file>" makes that endpoint's workers wait, after loading their
# models, until the file exists, so /health can be seen answering 503 while loading.
HOLD_ENV = "REWARDKIT_SERVE_HOLD"
API_KEY_ENV = "REWARDKIT_API_KEY"


@dataclass(frozen=True)
class ServeConfig:
    """Everything the server and its workers need (pickled into each worker process).

    Attributes:
        host, port: Where to listen (LitServe accepts 127.0.0.1, 0.0.0.0 or ::).
        api_key: When set, /v1/* and /review/api/* need it (``X-API-Key`` header,
            ``Authorization: Bearer``, or the review page's cookie); /health never does.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; ``gpus``: how many GPUs ``cuda``
            spreads workers over (one set of workers per GPU).
        workers_per_device: Model workers per device and endpoint (LitServe processes).
        api_servers: HTTP server processes (uvicorn) in front of the workers.
        mixed_precision: ``no``, ``fp16`` or ``bf16`` (inference autocast, as the CLI).
        endpoints: Which of score, inspect, generate to serve (the review page needs
            inspect).
        scorer, scorer_model: The registered scorer and its folder (None: embedded default).
        inspector, generator: Model folders (None: the embedded defaults).
        steps, guidance: The generator's sampler (None: what its folder recommends).
        batch_size: Requests combined into one forward by LitServe's dynamic batching
            (score and inspect; generate runs one request at a time).
        batch_timeout: Seconds a batch waits to fill.
        forward_batch: Images per forward pass within a batch (as ``--batch-size`` of
            ``rewardkit score``).
        max_body_bytes, max_pixels, max_images, max_attempts: Request limits.
        timeout: Seconds a request may wait in the queue before a 504.
        db_url: SQLAlchemy URL of the review labels.
        outputs: Where /v1/generate writes each request's images and manifests.
        review_roots: Folders whose manifests and images the review page may open.
        log_level: uvicorn's log level.
        threads: Torch threads per CPU worker (0: cores / workers).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    device: str = "cpu"
    gpus: int = 1
    workers_per_device: int = 1
    api_servers: int = 1
    mixed_precision: str = "no"
    endpoints: tuple[str, ...] = ENDPOINTS
    scorer: str = "social-reward"
    scorer_model: str | None = None
    inspector: str | None = None
    generator: str | None = None
    steps: int | None = None
    guidance: float | None = None
    batch_size: int = 16
    batch_timeout: float = 0.01
    forward_batch: int = 64
    max_body_bytes: int = 32 * 1024 * 1024
    max_pixels: int = 4096 * 4096
    max_images: int = 64
    max_attempts: int = 8
    timeout: float = 120.0
    db_url: str = "sqlite:///rewardkit-serve/labels.db"
    outputs: str = "rewardkit-serve/outputs"
    review_roots: tuple[str, ...] = field(default_factory=tuple)
    log_level: str = "warning"
    threads: int = 0

    def __post_init__(self) -> None:
        unknown = [e for e in self.endpoints if e not in ENDPOINTS]
        if unknown or not self.endpoints:
            raise ValueError(f"--endpoints: choose from {', '.join(ENDPOINTS)}; got {unknown}")
        if self.host not in ("127.0.0.1", "0.0.0.0", "::"):
            raise ValueError(f"--host: 127.0.0.1, 0.0.0.0 or :: (LitServe's); got {self.host}")
        if not 1024 <= self.port <= 65535:
            raise ValueError(f"--port: 1024 to 65535; got {self.port}")
        for name in ("gpus", "workers_per_device", "api_servers", "batch_size",
                     "forward_batch", "max_body_bytes", "max_pixels", "max_images",
                     "max_attempts"):  # fmt: skip
            if getattr(self, name) < 1:
                flag = name.replace("_", "-")
                raise ValueError(f"--{flag}: must be >= 1; got {getattr(self, name)}")
        if self.batch_timeout < 0 or self.timeout <= self.batch_timeout:
            raise ValueError(
                f"--batch-timeout: must be >= 0 and below --timeout; got {self.batch_timeout}"
            )

    def replace(self, **changes) -> ServeConfig:
        return dataclasses.replace(self, **changes)

    @property
    def roots(self) -> tuple[Path, ...]:
        """The review roots, resolved: the given ones, else the working folder; the outputs
        folder always."""
        given = self.review_roots or (os.getcwd(),)
        return tuple(dict.fromkeys(Path(p).resolve() for p in (*given, self.outputs)))

    @property
    def loopback(self) -> str:
        """The base URL this server reaches itself at."""
        return f"http://{'[::1]' if self.host == '::' else '127.0.0.1'}:{self.port}"

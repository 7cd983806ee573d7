"""``rewardkit serve``: the model endpoints on LitServe, plus health, limits and the review page.

LitServe runs each endpoint's models in its own worker processes (``--workers-per-device``
per device) and batches the requests that arrive together (``--batch-size`` requests within
``--batch-timeout`` seconds) into one forward; uvicorn processes (``--api-servers``) answer
HTTP in front of them. Added here, on LitServe's FastAPI app:

- ``GET /health``: 200 ``{"status": "ok"}`` once every worker of every endpoint has loaded
  its models, else 503 ``{"status": "loading", "workers": {...}}`` (no key needed: for load
  balancers);
- a body limit (413 past ``--max-body-mb``, from ``Content-Length`` or while reading) and
  multipart forms on /v1/* read into the same JSON the endpoints take;
- one-line 422s naming the field for bodies that do not fit an endpoint's schema;
- the review page (:mod:`rewardkit.serve.review`); OpenAPI docs at ``/docs``.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import sys
from collections.abc import Sequence

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers, UploadFile
from starlette.types import ASGIApp, Receive, Scope, Send

from rewardkit.serve.apis import build_apis
from rewardkit.serve.config import ServeConfig
from rewardkit.serve.review import review_router

__all__ = ["BodyLimitMiddleware", "build_server", "run_server"]

LIST_FIELDS = ("images", "prompts", "products", "captions", "heights_cm", "fills")  # repeated
LITSERVE_HEALTH = "/health/workers"  # LitServe's own plain-text check, kept beside ours


def _field(loc: Sequence) -> str:
    """``("body", "images", 2)`` -> ``images[2]``; ``("body", 12)`` (a JSON syntax error at
    character 12) -> ``body``."""
    parts = list(loc[1:]) if loc and loc[0] == "body" else list(loc)
    if not parts or isinstance(parts[0], int):
        return "body"
    text = str(parts[0])
    for p in parts[1:]:
        text += f"[{p}]" if isinstance(p, int) else f".{p}"
    return text


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    message = f"{_field(first.get('loc', ()))}: {first.get('msg', 'invalid')}{more}"
    return JSONResponse({"detail": " ".join(message.split())}, status_code=422)


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` (413, one line), and turn multipart forms
    sent to /v1/* into the JSON body the endpoints read (files as base64; the fields of
    :data:`LIST_FIELDS` repeat, other fields are single)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            await self._too_large(int(length), scope, receive, send)
            return
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                await self._too_large(len(body), scope, receive, send, at_least=True)
                return
        data = bytes(body)
        kind = headers.get("content-type", "")
        if scope["path"].startswith("/v1/") and kind.startswith("multipart/form-data"):
            try:
                data = await _form_to_json(scope, data)
            except Exception as err:  # a malformed form: the parser's reason, one line
                reply = JSONResponse(
                    {"detail": f"body: unreadable multipart form ({type(err).__name__}: {err})"},
                    status_code=422,
                )
                await reply(scope, receive, send)
                return
            raw = [(k, v) for k, v in scope["headers"]
                   if k not in (b"content-type", b"content-length")]  # fmt: skip
            raw += [(b"content-type", b"application/json"),
                    (b"content-length", str(len(data)).encode())]  # fmt: skip
            scope = {**scope, "headers": raw}
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": data, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, size, scope, receive, send, at_least: bool = False) -> None:
        mb = self.max_bytes / 2**20
        reply = JSONResponse(
            {"detail": f"body: {'over ' if at_least else ''}{size} bytes, over the server's "
                       f"limit of {self.max_bytes} ({mb:g} MB, --max-body-mb)"},
            status_code=413, headers={"Connection": "close"},
        )  # fmt: skip
        await reply(scope, receive, send)


async def _form_to_json(scope: Scope, body: bytes) -> bytes:
    from starlette.requests import Request as StarletteRequest

    sent = False

    async def once():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    form = await StarletteRequest(scope, once).form(max_files=10_000, max_fields=10_000)
    out: dict = {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            value = base64.b64encode(await value.read()).decode()
        elif key not in LIST_FIELDS:
            value = _scalar(value)
        if key in LIST_FIELDS:
            out.setdefault(key, []).append(value)
        else:
            out[key] = value
    await form.close()
    return json.dumps(out).encode()


def _scalar(text: str):
    """A form field's text as JSON would carry it (true/false, numbers), else the text."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _describe(app, config: ServeConfig) -> None:
    """Summaries and multipart notes on the endpoints' OpenAPI entries."""
    notes = {
        "/v1/score": "Reward scores of images: the numbers `rewardkit score` writes for the "
        "same files.",
        "/v1/inspect": "RFNet verdict and per-class probabilities of generated images, as "
        "`rewardkit inspect`.",
        "/v1/generate": "An ad image around a product photo, judged, optionally regenerated "
        "until accepted (Recurrent Generation), as `rewardkit generate`.",
    }
    limits = (f" Limits: {config.max_images} images per request, {config.max_pixels} pixels "
              f"per image, {config.max_body_bytes} bytes per body. Also accepts "
              f"multipart/form-data with the same field names (files for images; "
              f"{', '.join(LIST_FIELDS)} repeat). Send the API key as X-API-Key when the "
              f"server has one.")  # fmt: skip
    for route in app.router.routes:
        path = getattr(route, "path", None)
        if path in notes:
            route.summary = path.rsplit("/", 1)[-1].capitalize()
            route.description = notes[path] + limits
            route.tags = ["models"]


def build_server(config: ServeConfig):
    """The LitServer for ``config`` (not started): the endpoints it asks for, /health, the
    limits and the review page."""
    import litserve as ls
    from litserve.utils import WorkerSetupStatus

    apis = build_apis(config)
    accelerator, devices = _devices(config.device, config.gpus)
    server = ls.LitServer(
        apis,
        accelerator=accelerator,
        devices=devices,
        workers_per_device=config.workers_per_device,
        timeout=config.timeout,
        healthcheck_path=LITSERVE_HEALTH,
        middlewares=[(BodyLimitMiddleware, {"max_bytes": config.max_body_bytes})],
    )
    app = server.app
    app.title = "rewardkit"
    app.description = ("Reward scoring, ad-image inspection and generation (rewardkit), "
                       "and the review page at /review.")  # fmt: skip
    app.add_exception_handler(RequestValidationError, _validation_error)
    _describe(app, config)
    expected = {
        f"{api.api_path.split('/')[-1]}_{i}"
        for api in apis
        for i in range(len(server._inference_workers_config_for_api(api.api_path)))
    }

    @app.get("/health", tags=["health"])
    def health() -> JSONResponse:
        """200 {"status": "ok"} once every worker has loaded its models, 503 before."""
        status = dict(getattr(server, "workers_setup_status", None) or {})
        ready = expected <= set(status) and all(
            status[k] == WorkerSetupStatus.READY for k in expected
        )
        if ready:
            return JSONResponse({"status": "ok"})
        failed = any(v == WorkerSetupStatus.ERROR for v in status.values())
        return JSONResponse(
            {"status": "failed" if failed else "loading",
             "workers": {k: str(status.get(k, "starting")) for k in sorted(expected)}},
            status_code=503,
        )  # fmt: skip

    app.include_router(review_router(config))
    return server


def _devices(device: str, gpus: int) -> tuple[str, int | list[int]]:
    """LitServe's accelerator and devices for ``--device`` (``cuda:N`` pins GPU N)."""
    kind, _, index = device.partition(":")
    if kind == "cpu":
        return "cpu", 1
    if kind in ("cuda", "mps"):
        return kind, [int(index)] if index else gpus
    raise ValueError(f"--device {device}: cpu, cuda, cuda:N or mps")


def _check_port(host: str, port: int) -> None:
    """A one-line error before any model loads when the address cannot be listened on."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as err:
            raise ValueError(f"--port {port}: cannot listen on {host}:{port} "
                             f"({err.strerror or err})") from None  # fmt: skip


def run_server(config: ServeConfig) -> None:
    """Build and run the server until Ctrl-C or SIGTERM (both shut it down gracefully)."""
    from pathlib import Path

    _check_port(config.host, config.port)
    Path(config.outputs).mkdir(parents=True, exist_ok=True)
    server = build_server(config)

    main = os.getpid()

    def stop(signum, frame):  # SIGTERM (docker stop, kubernetes) takes LitServe's Ctrl-C path
        if os.getpid() != main:  # a forked HTTP process, after uvicorn's own shutdown
            raise SystemExit(0)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    print(
        f"rewardkit serve: http://{config.host}:{config.port} endpoints "
        f"{', '.join(config.endpoints)}; /health, /docs, /review",
        file=sys.stderr,
        flush=True,
    )
    server.run(
        host=config.host,
        port=config.port,
        num_api_servers=config.api_servers,
        log_level=config.log_level,
        generate_client_file=False,
    )

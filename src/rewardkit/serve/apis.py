"""The model endpoints as LitServe APIs: each loads its models once per worker process and
LitServe's dynamic batching hands it the requests that arrived together.

- :class:`ScoreAPI` (``/v1/score``): the scorer of ``rewardkit score``; images are read by
  ``scoring.load_scorer_image``, stacked by ``scoring.stack_images`` and scored by
  ``scoring.score_tensor``, the functions of the command's own loop.
- :class:`InspectAPI` (``/v1/inspect``): the RFNet inspector of ``rewardkit inspect``;
  images and product photos are read by the command's batch reader (``_BatchReader``) and
  judged by its ``inspect_batch``.
- :class:`GenerateAPI` (``/v1/generate``): ``rewardkit generate`` for one product:
  ``generation.run.load_jobs``, Recurrent Generation (``generation.recurrent``) and
  ``write_result`` into the server's outputs folder, one request at a time.

A bad request inside a batch is answered alone (413/422 with a line naming the field); the
other requests of the batch are served.
"""

# No `from __future__ import annotations`: LitServe hands decode_request's annotation to
# FastAPI as the request body type, which must be the class itself, not its name.
import base64
import hmac
import os
import time
import uuid
from pathlib import Path
from typing import Any

import litserve as ls
from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse

from rewardkit.serve.config import HOLD_ENV, ServeConfig
from rewardkit.serve.payloads import (
    GenerateRequest,
    InspectRequest,
    RequestError,
    ScoreRequest,
    Uploads,
    per_image,
)

__all__ = ["GenerateAPI", "InspectAPI", "ScoreAPI", "build_apis", "check_key"]


def check_key(config: ServeConfig, request: Request) -> None:
    """401 unless the request carries the server's API key (when one is set): the
    ``X-API-Key`` header, ``Authorization: Bearer KEY``, or the review page's cookie."""
    if not config.api_key:
        return
    given = request.headers.get("x-api-key")
    if given is None:
        auth = request.headers.get("authorization", "")
        given = auth[7:] if auth.lower().startswith("bearer ") else None
    if given is None:
        given = request.cookies.get("rewardkit_key")
    if given is None or not hmac.compare_digest(given.encode(), config.api_key.encode()):
        raise HTTPException(
            status_code=401,
            detail="missing or wrong API key: send it in the X-API-Key header",
        )


class _Endpoint(ls.LitAPI):
    """What the three endpoints share: the key check, the loading hook, thread count and
    answering a bad request alone within its batch."""

    name = ""

    def __init__(self, config: ServeConfig, max_batch_size: int, batch_timeout: float) -> None:
        super().__init__(
            max_batch_size=max_batch_size,
            batch_timeout=batch_timeout if max_batch_size > 1 else 0.0,
            api_path=f"/v1/{self.name}",
        )
        self.config = config

    def authorize(self, request: Request) -> None:
        check_key(self.config, request)

    def setup(self, device) -> None:
        import torch

        if str(device).startswith("cpu"):
            workers = len(self.config.endpoints) * self.config.workers_per_device
            torch.set_num_threads(self.config.threads or max(1, (os.cpu_count() or 1) // workers))
        self.device = str(device)
        self.load(self.device)
        hold = os.environ.get(HOLD_ENV, "")
        endpoint, _, gate = hold.partition(":")
        if endpoint == self.name and gate:
            while not Path(gate).exists():  # the test hook: stay "loading" until released
                time.sleep(0.05)

    def load(self, device: str) -> None:
        raise NotImplementedError

    def decode_request(self, request, **kwargs):
        try:
            return self.read(request)
        except RequestError as err:
            return err

    def read(self, request):
        raise NotImplementedError

    def predict(self, x, **kwargs):
        many = x if self.max_batch_size > 1 else [x]
        good = [item for item in many if not isinstance(item, RequestError)]
        results = iter(self.run(good) if good else [])
        out = [item if isinstance(item, RequestError) else next(results) for item in many]
        return out if self.max_batch_size > 1 else out[0]

    def run(self, items: list) -> list:
        raise NotImplementedError

    def encode_response(self, output, **kwargs):
        if isinstance(output, RequestError):
            return JSONResponse(status_code=output.status, content={"detail": output.message})
        from rewardkit.io import json_safe

        return json_safe(output)  # NaN (e.g. no accepted image's mean attempts) -> null

    def check_count(self, n: int, field: str = "images") -> None:
        if n == 0:
            raise RequestError(422, f"{field}: empty list")
        if n > self.config.max_images:
            raise RequestError(
                413,
                f"{field}: {n} images, over the server's limit of {self.config.max_images} "
                f"per request (--max-images)",
            )


class ScoreAPI(_Endpoint):
    """``POST /v1/score``: the reward score of each image, as ``rewardkit score``."""

    name = "score"

    def load(self, device: str) -> None:
        from rewardkit.models.defaults import default_model_path
        from rewardkit.models.scorers import create_scorer
        from rewardkit.scoring import input_side

        c = self.config
        folder = c.scorer_model or default_model_path(c.scorer)
        self.scorer = create_scorer(c.scorer, folder, device=device)
        self.side = input_side(self.scorer)

    def decode_request(self, request: ScoreRequest, **kwargs):
        return super().decode_request(request)

    def read(self, request: ScoreRequest):
        from rewardkit.scoring import load_scorer_image

        n = len(request.images)
        self.check_count(n)
        if request.prompts is not None and request.prompt is not None:
            raise RequestError(422, "prompt: give prompts or prompt, not both")
        prompts = per_image(request.prompts, n, "prompts", request.prompt or "")
        arrays = []
        with Uploads(self.config.max_pixels) as up:
            for i, data in enumerate(request.images):
                path = up.write(f"images[{i}]", data)
                try:
                    arrays.append(load_scorer_image(path, self.side)[0])
                except (OSError, ValueError) as err:
                    raise RequestError(422, up.message(err)) from None
        return arrays, prompts

    def run(self, items: list) -> list:
        from rewardkit.commands.devices import autocast
        from rewardkit.scoring import score_tensor, stack_images

        arrays = [a for images, _ in items for a in images]
        prompts = [p for _, texts in items for p in texts]
        with autocast(self.device, self.config.mixed_precision):
            images = stack_images(arrays, self.side)
            scores = score_tensor(self.scorer, images, prompts, self.config.forward_batch)
        out, start = [], 0
        for images_of, _ in items:
            out.append({"scores": scores[start : start + len(images_of)].tolist()})
            start += len(images_of)
        return out


class InspectAPI(_Endpoint):
    """``POST /v1/inspect``: verdict and per-class probabilities, as ``rewardkit inspect``."""

    name = "inspect"

    def load(self, device: str) -> None:
        from rewardkit.models.defaults import default_model_path
        from rewardkit.models.inspector import Inspector

        folder = self.config.inspector or default_model_path("rfnet")
        self.inspector = Inspector.from_pretrained(folder, device)
        self.size = self.inspector.rfnet.config.resolution
        self.classes = self.inspector.classes

    def decode_request(self, request: InspectRequest, **kwargs):
        return super().decode_request(request)

    def read(self, request: InspectRequest):
        from rewardkit.commands.inspect import _BatchReader

        n = len(request.images)
        self.check_count(n)
        if len(request.products) not in (1, n):
            raise RequestError(
                422, f"products: {len(request.products)} photos for {n} images (give 1 or {n})"
            )
        captions = per_image(request.captions, n, "captions", "")
        fills = heights = None
        if self.inspector.uses_placement:  # early fusion: where the product sits, its height
            from rewardkit.data.keys import height_from_row

            fills = per_image(request.fills, n, "fills", None)
            for i, f in enumerate(fills):
                if f is not None and not 0.05 <= f <= 1.0:
                    raise RequestError(422, f"fills[{i}]: must be in [0.05, 1]; got {f}")
            heights = per_image(request.heights_cm, n, "heights_cm", None)
            heights = [h if h is not None else height_from_row({"caption": c})
                       for h, c in zip(heights, captions, strict=True)]  # fmt: skip
        elif request.fills is not None or request.heights_cm is not None:
            per_image(request.fills, n, "fills", None)  # still checked for length
            per_image(request.heights_cm, n, "heights_cm", None)
        with Uploads(self.config.max_pixels) as up:
            paths = [str(up.write(f"images[{i}]", d)) for i, d in enumerate(request.images)]
            photos = [str(up.write(f"products[{i}]", d)) for i, d in enumerate(request.products)]
            products = photos * n if len(photos) == 1 else photos
            reader = _BatchReader(
                paths, products, [None] * n, self.size, check_domain=False, fills=fills
            )
            gen, prod, _, bad, _ = reader((0, n))
            if bad:
                reason = bad[0]["reason"]
                if str(up.root) in reason:
                    raise RequestError(422, up.message(reason))
                raise RequestError(422, f"images[{bad[0]['row']}]: {reason}")
        missing = [] if heights is None else self.inspector.missing_heights(heights)
        if missing:
            raise RequestError(
                422, f"heights_cm[{missing[0]}]: this inspector needs the product's height "
                "(heights_cm, or 'N cm' in the caption)",
            )  # fmt: skip
        return gen, prod, captions, heights

    def run(self, items: list) -> list:
        import numpy as np
        import torch

        from rewardkit.commands.inspect import inspect_batch

        gen = torch.cat([g for g, _, _, _ in items])
        prod = torch.cat([p for _, p, _, _ in items])
        captions = [c for _, _, texts, _ in items for c in texts]
        heights = None
        if self.inspector.uses_placement:
            heights = [h for *_, hs in items for h in hs]
        step = self.config.forward_batch
        probs = np.concatenate([
            inspect_batch(self.inspector, gen[i : i + step], prod[i : i + step],
                          captions[i : i + step], self.config.mixed_precision,
                          None if heights is None else heights[i : i + step])
            for i in range(0, len(captions), step)
        ])  # fmt: skip
        out, start = [], 0
        for g, *_ in items:
            rows = probs[start : start + len(g)]
            start += len(g)
            out.append({
                "classes": list(self.classes),
                "results": [
                    {"verdict": v,
                     "probabilities": dict(zip(self.classes, map(float, p), strict=True))}
                    for v, p in zip(self.inspector.verdicts(rows), rows, strict=True)
                ],
            })  # fmt: skip
        return out


class GenerateAPI(_Endpoint):
    """``POST /v1/generate``: an ad image around a product photo, judged, optionally
    regenerated until accepted (Recurrent Generation), as ``rewardkit generate``. Each
    request's files (images, ``manifest.parquet``, ``attempts.parquet``) are written to its
    own folder under the outputs folder, which the review page lists."""

    name = "generate"

    def load(self, device: str) -> None:
        from rewardkit.commands.devices import precision_dtype
        from rewardkit.generation.pipeline import AdGenerator
        from rewardkit.generation.recurrent import InspectorJudge, OracleJudge
        from rewardkit.generation.run import sampler_for
        from rewardkit.models.defaults import default_model_path
        from rewardkit.models.inspector import Inspector

        c = self.config
        folder = c.generator or default_model_path("generator")
        dtype = precision_dtype(c.mixed_precision)
        self.gen = AdGenerator.from_pretrained(folder, device, dtype)
        self.sampler = sampler_for(folder, c.steps, c.guidance)
        inspector = Inspector.from_pretrained(c.inspector or default_model_path("rfnet"), device)
        self.judges = {"inspector": InspectorJudge(inspector), "oracle": OracleJudge()}

    def decode_request(self, request: GenerateRequest, **kwargs):
        return super().decode_request(request)

    def read(self, request: GenerateRequest):
        import pyarrow as pa

        from rewardkit.generation.run import load_jobs
        from rewardkit.io import write_parquet_atomic

        c = self.config
        if request.max_attempts is not None and request.max_attempts > c.max_attempts:
            raise RequestError(
                422,
                f"max_attempts: {request.max_attempts}, over the server's limit of "
                f"{c.max_attempts} (--max-attempts)",
            )
        with Uploads(c.max_pixels) as up:
            photo = up.write("product", request.product)
            manifest = up.root / "products.parquet"
            write_parquet_atomic(manifest, pa.table({
                "product_path": [str(photo)], "prompt": [request.prompt],
                "caption": [request.caption],
                "product_height_cm": pa.array([request.product_height_cm], pa.float64()),
                "fill": pa.array([request.fill], pa.float64()),
            }))  # fmt: skip
            try:
                jobs, skipped = load_jobs(manifest, self.gen.resolution)
            except (OSError, ValueError) as err:
                raise RequestError(422, f"product: {up.message(err)}") from None
            if skipped or not jobs:
                reason = up.message(skipped[0]["reason"]) if skipped else "unusable"
                raise RequestError(422, reason if reason.startswith("product") else
                                   f"product: {reason}")  # fmt: skip
        job = jobs[0]
        inspector = self.judges["inspector"].inspector
        needs_height = request.judge == "inspector" and inspector.missing_heights([job.height_cm])
        if needs_height:  # none given, or NaN: no size
            raise RequestError(
                422,
                "product_height_cm: the inspector judge needs the product's height (or a "
                "caption ending in 'N cm'), or judge 'none'",
            )
        if request.judge == "oracle" and job.height_cm != job.height_cm:  # NaN: no size
            raise RequestError(
                422,
                "product_height_cm: the oracle judge needs the product's height (or a "
                "caption ending in 'N cm')",
            )
        return job, request

    def run(self, items: list) -> list:
        return [self.generate(job, request) for job, request in items]

    def generate(self, job, request: GenerateRequest) -> dict[str, Any]:
        from rewardkit.commands.devices import autocast
        from rewardkit.commands.generate import _AcceptAll
        from rewardkit.generation.recurrent import recurrent_generate
        from rewardkit.generation.run import write_result
        from rewardkit.io import png_bytes, write_json_atomic

        judged = request.judge != "none"
        accept = self.judges[request.judge] if judged else _AcceptAll()
        budget = request.max_attempts or self.config.max_attempts
        attempts = budget if request.until_accepted and judged else 1
        start = time.perf_counter()
        with autocast(self.device, self.config.mixed_precision):
            result = recurrent_generate(
                self.gen, [job], accept, self.sampler, attempts, 1, request.seed
            )
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        out = Path(self.config.outputs) / f"{stamp}-{uuid.uuid4().hex[:8]}"
        stats = write_result(out, [job], result, judged=judged)
        info = request.model_dump(exclude={"product"})
        write_json_atomic(out / "request.json", {**info, "judge_name": accept.name})
        final = result.final[0]

        def b64(image) -> str:
            return base64.b64encode(png_bytes(image)).decode()

        rows = []
        for a in result.attempts:
            row = {"attempt": a.attempt, "seed": a.seed,
                   "verdict": a.label if judged else None,
                   "score": float(a.score) if judged else None,
                   "accepted": a.accepted if judged else None}  # fmt: skip
            if request.return_attempts:
                row["image"] = b64(a.image)
            rows.append(row)
        return {
            "id": out.name,
            "image": b64(final.image),
            "verdict": final.label if judged else None,
            "accepted": final.accepted if judged else None,
            "best_effort": judged and request.until_accepted and not final.accepted,
            "attempts_used": len(result.attempts),
            "attempts": rows,
            "judge": accept.name,
            "seed": final.seed,
            "manifest": str((out / "manifest.parquet").resolve()),
            "stats": stats,
            "seconds": round(time.perf_counter() - start, 3),
        }


def build_apis(config: ServeConfig) -> list:
    """The endpoints ``config`` asks for; generate runs one request at a time (Recurrent
    Generation batches its own attempts)."""
    kinds = {"score": ScoreAPI, "inspect": InspectAPI, "generate": GenerateAPI}
    apis = []
    for name in config.endpoints:
        batch = 1 if name == "generate" else config.batch_size
        apis.append(kinds[name](config, batch, config.batch_timeout))
    return apis

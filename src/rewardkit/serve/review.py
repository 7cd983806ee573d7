"""The review page (``/review``) and its JSON API (``/review/api/...``).

A reviewer opens a manifest of generated images (a ``rewardkit generate`` output's
``manifest.parquet`` or ``attempts.parquet``, a world render, an inspect output, or a
``/v1/generate`` result under the server's outputs folder): any Parquet file with ``path``
and ``product_path`` columns (relative to its folder, or absolute), under one of the review
roots. Opening records its rows in the label database and has the server's own
``/v1/inspect`` judge each image, so the page shows the inspector's verdict beside the
image, its product photo and caption; the reviewer's labels are stored with their name and
time.

Images are served only as items of an opened manifest (by item id, never by a path from the
request), only from inside the review roots (resolved, so links cannot lead out), and
re-encoded as PNG after decoding, so nothing but image pixels leaves the server.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import math
from importlib import resources
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field

from rewardkit.serve.apis import check_key
from rewardkit.serve.config import ServeConfig
from rewardkit.serve.labels import CARRIED_COLUMNS, LabelStore, agreement

__all__ = ["MAX_REVIEW_ROWS", "open_manifest", "review_router"]

MAX_REVIEW_ROWS = 20_000  # rows of one manifest the page opens
DISPLAY_SIDE = 512  # large images are decoded reduced toward this side for the page


class OpenRequest(BaseModel):
    path: str = Field(min_length=1, description="manifest (.parquet) or a folder holding one")


class LabelRequest(BaseModel):
    item: int
    reviewer: str = Field(min_length=1, max_length=128)
    label: str


def _inside(path: Path, roots: tuple[Path, ...]) -> bool:
    resolved = path.resolve()
    return any(resolved.is_relative_to(root) for root in roots)


def _manifest_path(config: ServeConfig, text: str) -> Path:
    path = Path(text).expanduser()
    if not path.is_absolute():
        path = config.roots[0] / path
    if path.is_dir():
        path = path / "manifest.parquet"
    if not _inside(path, config.roots):
        roots = ", ".join(str(r) for r in config.roots)
        raise HTTPException(403, f"path: {text} is outside the review roots ({roots}; "
                                 f"--review-root adds one)")  # fmt: skip
    if not path.is_file():
        raise HTTPException(404, f"path: {text}: no such manifest")
    return path.resolve()


def _read_items(config: ServeConfig, path: Path) -> tuple[list[dict], list[dict], int]:
    """The reviewable rows of a manifest (as :class:`~rewardkit.serve.labels.Item`
    fields), the rows left out with the reason, and the row count."""
    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for non-Parquet files
        raise HTTPException(422, f"path: {path}: not a readable Parquet manifest ({err})") from None
    missing = [c for c in ("path", "product_path") if c not in table.column_names]
    if missing:
        raise HTTPException(422, f"path: {path}: missing column(s) {missing}; has "
                                 f"{table.column_names}")  # fmt: skip
    if table.num_rows > MAX_REVIEW_ROWS:
        raise HTTPException(413, f"path: {path}: {table.num_rows} rows, over the page's limit "
                                 f"of {MAX_REVIEW_ROWS}; split the manifest")  # fmt: skip
    base = path.parent
    items, skipped = [], []

    def absolute(value: Any) -> Path | None:
        if value is None or str(value) == "":
            return None
        p = Path(str(value))
        return p if p.is_absolute() else base / p

    for row, r in enumerate(table.to_pylist()):
        image, product = absolute(r.get("path")), absolute(r.get("product_path"))
        why = None
        for name, p in (("path", image), ("product_path", product)):
            if p is None:
                why = f"empty {name}"
            elif not _inside(p, config.roots):
                why = f"{name} {p} is outside the review roots"
            elif not p.is_file():
                why = f"{name} {p}: no such file"
            if why:
                break
        if why:
            skipped.append({"row": row, "reason": why})
            continue
        extra = {c: r.get(c) for c in CARRIED_COLUMNS if r.get(c) is not None}
        for c in ("depth_path", "saliency_path"):
            if c in extra:
                extra[c] = str(absolute(extra[c]).resolve())
        if isinstance(extra.get("fill"), float) and math.isnan(extra["fill"]):
            del extra["fill"]
        items.append({
            "row": row, "path": str(image.resolve()), "product_path": str(product.resolve()),
            "caption": str(r.get("caption") or ""), "prompt": str(r.get("prompt") or ""),
            "source_label": None if r.get("label") is None else str(r["label"]),
            "source_verdict": None if r.get("verdict") is None else str(r["verdict"]),
            "extra": json.dumps(extra, default=str),
        })  # fmt: skip
    return items, skipped, table.num_rows


async def _judge(config: ServeConfig, items: list[dict]) -> dict[int, dict]:
    """The server's own /v1/inspect on each item ({item id: result}); a chunk that fails is
    judged item by item, and an item that cannot be judged has no verdict."""
    import httpx

    headers = {"X-API-Key": config.api_key} if config.api_key else {}

    def body(chunk: list[dict]) -> dict:
        def b64(p: str) -> str:
            return base64.b64encode(Path(p).read_bytes()).decode()

        return {"images": [b64(i["path"]) for i in chunk],
                "products": [b64(i["product_path"]) for i in chunk],
                "captions": [i["caption"] for i in chunk]}  # fmt: skip

    out: dict[int, dict] = {}
    step = max(1, min(config.max_images, 16))
    async with httpx.AsyncClient(base_url=config.loopback, timeout=config.timeout + 60) as client:

        async def ask(chunk: list[dict]) -> bool:
            payload = await asyncio.to_thread(body, chunk)
            r = await client.post("/v1/inspect", json=payload, headers=headers)
            if r.status_code != 200:
                return False
            for item, res in zip(chunk, r.json()["results"], strict=True):
                out[item["id"]] = res
            return True

        for i in range(0, len(items), step):
            chunk = items[i : i + step]
            if not await ask(chunk) and len(chunk) > 1:
                for one in chunk:
                    await ask([one])
    return out


def _inspector_name(config: ServeConfig) -> str:
    from rewardkit.models.defaults import default_model_path

    return str(Path(config.inspector or default_model_path("rfnet")).resolve())


async def open_manifest(config: ServeConfig, store: LabelStore, text: str) -> dict:
    """Open a manifest for review: record its items (once per content) and the inspector's
    verdicts (again when the server's inspector changed); returns the manifest's view."""
    path = _manifest_path(config, text)
    digest = await asyncio.to_thread(lambda: hashlib.sha256(path.read_bytes()).hexdigest())
    inspector = _inspector_name(config)
    found = await asyncio.to_thread(store.find_manifest, str(path), digest)
    if found is None:
        items, skipped, rows = await asyncio.to_thread(_read_items, config, path)
        if not items:
            why = skipped[0]["reason"] if skipped else "no rows"
            raise HTTPException(422, f"path: {path}: nothing to review ({why})")
        manifest_id = await asyncio.to_thread(
            store.add_manifest, str(path), digest, rows, skipped, "", items
        )
        judged_by = ""
    else:
        manifest_id, judged_by = found.id, found.inspector
    if judged_by != inspector:
        view = await asyncio.to_thread(store.manifest, manifest_id)
        rows = [{"id": it["id"], "caption": it["caption"]} for it in view["items"]]
        full = await asyncio.to_thread(_item_files, store, rows)
        verdicts = await _judge(config, full)
        await asyncio.to_thread(store.set_verdicts, manifest_id, inspector, verdicts)
    return await asyncio.to_thread(store.manifest, manifest_id)


def _item_files(store: LabelStore, rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        it = store.item(r["id"])
        out.append({**r, "path": it.path, "product_path": it.product_path})
    return out


def _sources(config: ServeConfig, store: LabelStore) -> dict:
    outputs = Path(config.outputs)
    found = []
    if outputs.is_dir():
        for name in ("manifest.parquet", "attempts.parquet"):
            found.extend(outputs.glob(f"*/{name}"))
    found.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    return {
        "opened": store.manifests(),
        "outputs": [str(p.resolve()) for p in found[:100]],
        "roots": [str(r) for r in config.roots],
    }


def review_router(config: ServeConfig) -> APIRouter:
    """The page and its API; the API needs the server's key when one is set (the page keeps
    it in a cookie)."""
    store = LabelStore(config.db_url)

    def auth(request: Request) -> None:
        check_key(config, request)

    router = APIRouter()
    api = APIRouter(prefix="/review/api", dependencies=[Depends(auth)], tags=["review"])

    @router.get("/review", response_class=HTMLResponse, tags=["review"])
    def page() -> HTMLResponse:
        """The review page (plain HTML and JavaScript)."""
        html = resources.files("rewardkit.serve").joinpath("review.html").read_text()
        return HTMLResponse(html, headers={"Cache-Control": "no-store"})

    @api.get("/sources")
    def sources() -> dict:
        """Manifests opened before, and the service's own /v1/generate outputs."""
        return _sources(config, store)

    @api.post("/manifests")
    async def open_(request: OpenRequest) -> dict:
        """Open a manifest (a path on the server, inside the review roots)."""
        return await open_manifest(config, store, request.path)

    @api.get("/manifests/{manifest_id}")
    def manifest(manifest_id: int) -> dict:
        view = store.manifest(manifest_id)
        if view is None:
            raise HTTPException(404, f"manifest: no manifest {manifest_id}")
        return view

    @api.get("/manifests/{manifest_id}/agreement")
    def manifest_agreement(manifest_id: int) -> dict:
        """Agreement between reviewers and with the inspector, on this manifest and overall."""
        return {"manifest": agreement(store.label_rows([manifest_id])),
                "all": agreement(store.label_rows())}  # fmt: skip

    @api.post("/labels")
    def label(request: LabelRequest) -> dict:
        """Record a reviewer's label of an item (a later one replaces theirs)."""
        try:
            labels = store.set_label(request.item, request.reviewer, request.label)
        except KeyError as err:
            raise HTTPException(404, str(err).strip("'\"")) from None
        except ValueError as err:
            raise HTTPException(422, str(err)) from None
        return {"item": request.item, "labels": labels}

    @api.get("/items/{item_id}/{kind}")
    def image(item_id: int, kind: str) -> Response:
        """An item's image (``image``) or product photo (``product``) as PNG."""
        from rewardkit.io import decode_image, png_bytes

        if kind not in ("image", "product"):
            raise HTTPException(404, f"kind: {kind!r} is not image or product")
        item = store.item(item_id)
        if item is None:
            raise HTTPException(404, f"item: no item {item_id}")
        path = Path(item.path if kind == "image" else item.product_path)
        if not _inside(path, config.roots):
            raise HTTPException(403, f"item {item_id}: its file is outside the review roots")
        try:
            decoded = decode_image(path, "RGBA" if kind == "product" else "RGB", DISPLAY_SIDE)
        except (OSError, ValueError) as err:
            return JSONResponse({"detail": f"item {item_id}: {err}"}, status_code=422)
        return Response(png_bytes(decoded.array), media_type="image/png",
                        headers={"Cache-Control": "private, max-age=300"})  # fmt: skip

    router.include_router(api)
    return router

"""`rewardkit serve` over real HTTP on loopback: the same numbers as the commands, health,
auth, limits, bad images, multipart, generate, docs."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from rewardkit.cli import main
from rewardkit.io import png_bytes, read_image
from rewardkit.world.scene import CLASSES
from tests.serve.conftest import KEY
from tests.test_scoring import GOOD

PROMPT = "a red shoe on a table"


def b64(path: Path | bytes) -> str:
    data = path if isinstance(path, bytes) else Path(path).read_bytes()
    return base64.b64encode(data).decode()


def test_health_is_503_while_a_model_loads_then_200(server):
    assert server.loading is not None and server.loading.status_code == 503
    body = server.loading.json()
    assert body["status"] == "loading"
    assert body["workers"]["generate_0"] == "starting"
    # LitServe starts listening once a worker is ready; the others may still be loading.
    assert "ready" in (body["workers"]["score_0"], body["workers"]["inspect_0"])
    assert server.ready.status_code == 200 and server.ready.json() == {"status": "ok"}
    with server.client(key=None) as c:  # load balancers send no key
        assert c.get("/health").json() == {"status": "ok"}


def test_scores_equal_the_score_command(server, tmp_path, capsys):
    folder = server.root / "images"
    out = tmp_path / "cli.parquet"
    argv = ["score", "--input", str(folder), "--out", str(out), "--prompt", PROMPT,
            "--workers", "0", "--no-progress", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    table = pq.read_table(out)
    assert table.column("path").to_pylist() == GOOD
    expected = np.array(table.column("score").to_pylist())
    images = [b64(folder / p) for p in GOOD]
    with server.client() as c:
        r = c.post("/v1/score", json={"images": images, "prompt": PROMPT})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["scores"], expected, rtol=0, atol=1e-5)

        # Requests sent together are batched together (40x40, 48x36 and a JPEG mixed):
        # each still gets the command's numbers.
        def one(i: int):
            return c.post("/v1/score", json={"images": images[i : i + 2], "prompt": PROMPT})

        with ThreadPoolExecutor(5) as pool:
            replies = list(pool.map(one, range(0, 10, 2)))
    for i, reply in zip(range(0, 10, 2), replies, strict=True):
        assert reply.status_code == 200, reply.text
        np.testing.assert_allclose(reply.json()["scores"], expected[i : i + 2], atol=1e-5)


def test_scores_with_prompts_per_image_equal_the_command_on_a_manifest(server, tmp_path):
    manifest = server.root / "world" / "manifest.parquet"
    out = tmp_path / "cli.parquet"
    assert main(["score", "--input", str(manifest), "--out", str(out), "--workers", "0",
                 "--no-progress", "--device", "cpu"]) == 0  # fmt: skip
    rows = pq.read_table(out).to_pylist()
    body = {
        "images": [b64(manifest.parent / r["path"]) for r in rows],
        "prompts": [r["prompt"] for r in rows],
    }
    with server.client() as c:
        r = c.post("/v1/score", json=body)
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["scores"], [r["score"] for r in rows], atol=1e-5)


def test_inspect_equals_the_inspect_command(server, tmp_path):
    manifest = server.root / "gen" / "manifest.parquet"
    out = tmp_path / "verdicts.parquet"
    assert main(["inspect", "--input", str(manifest), "--out", str(out), "--workers", "0",
                 "--device", "cpu"]) == 0  # fmt: skip
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 6
    # The inspector reads where each product was placed and its height: sent as the
    # manifest has them (the caption's "N cm" is rounded).
    placed = pq.read_table(manifest).to_pylist()
    body = {
        "images": [b64(r["path"]) for r in rows],
        "products": [b64(r["product_path"]) for r in rows],
        "captions": [r["caption"] for r in rows],
        "heights_cm": [r["product_height_cm"] for r in placed],
        "fills": [r["fill"] for r in placed],
    }
    with server.client() as c:
        r = c.post("/v1/inspect", json=body)
    assert r.status_code == 200, r.text
    reply = r.json()
    assert reply["classes"] == list(CLASSES)
    for got, want in zip(reply["results"], rows, strict=True):
        assert got["verdict"] == want["verdict"]
        for name in CLASSES:
            column = "p_" + name.lower().replace(" ", "_")
            assert got["probabilities"][name] == pytest.approx(want[column], abs=1e-5)


def test_every_endpoint_needs_the_key(server):
    product = b64(server.root / "gen" / "products" / "000000.png")
    bodies = {
        "/v1/score": {"images": [product]},
        "/v1/inspect": {"images": [product], "products": [product]},
        "/v1/generate": {"product": product, "prompt": "a mug"},
    }
    for key in (None, "wrong-key"):
        with server.client(key=key) as c:
            for path, body in bodies.items():
                r = c.post(path, json=body)
                assert r.status_code == 401, (path, r.text)
                assert "API key" in r.json()["detail"]
            assert c.get("/review/api/sources").status_code == 401
            assert c.get("/review").status_code == 200  # the page itself holds no data
    with server.client(key=None) as c:
        r = c.post("/v1/score", json=bodies["/v1/score"],
                   headers={"Authorization": f"Bearer {KEY}"})  # fmt: skip
        assert r.status_code == 200, r.text


def test_limits_and_malformed_requests_get_one_line_naming_the_field(server):
    small = b64(png_bytes(np.zeros((8, 8, 3), np.uint8)))
    large = b64(png_bytes(np.zeros((500, 600, 3), np.uint8)))  # 300,000 px > 250,000
    cases = [
        ("/v1/score", {"images": [small] * 13}, 413, "images: 13 images, over"),
        ("/v1/score", {"images": [small, large]}, 413, "images[1]: 600 x 500 = 300000 pixels"),
        ("/v1/score", {"images": [small] * 3, "prompts": ["a", "b"]}, 422, "prompts: 2 values"),
        ("/v1/score", {"images": [small], "prompts": ["a"], "prompt": "b"}, 422, "prompt:"),
        ("/v1/score", {"images": [1]}, 422, "images[0]: Input should be a valid string"),
        ("/v1/score", {"imgs": [small]}, 422, "images: Field required"),
        ("/v1/score", {"images": []}, 422, "images: empty list"),
        ("/v1/score", {"images": ["%%%"]}, 422, "images[0]: not valid base64"),
        ("/v1/inspect", {"images": [small] * 3, "products": [small] * 2}, 422, "products: 2"),
        ("/v1/generate", {"product": small, "prompt": "x", "max_attempts": 5}, 422,
         "max_attempts: 5, over the server's limit of 3"),
        ("/v1/generate", {"product": small, "prompt": "x", "fill": 2}, 422, "fill:"),
    ]  # fmt: skip
    with server.client() as c:
        for path, body, status, start in cases:
            r = c.post(path, json=body)
            assert r.status_code == status, (body.keys(), r.text)
            detail = r.json()["detail"]
            assert isinstance(detail, str) and "\n" not in detail
            assert detail.startswith(start), detail
        json_type = {"Content-Type": "application/json"}
        r = c.post("/v1/score", content=b'{"images": [', headers=json_type)
        assert r.status_code == 422 and r.json()["detail"].startswith("body")
        big = b'{"images": ["' + b"A" * (3 * 2**20) + b'"]}'
        r = c.post("/v1/score", content=big, headers=json_type)
        assert r.status_code == 413, r.text
        assert r.json()["detail"].startswith("body: ") and "--max-body-mb" in r.json()["detail"]


def test_a_bad_image_is_answered_alone_and_the_server_keeps_serving(server):
    folder = server.root / "images"
    good = [b64(folder / p) for p in GOOD[:3]]
    truncated = b64(folder / "broken.png")
    text = b64(folder / "fake.jpg")
    with server.client() as c:
        r = c.post("/v1/score", json={"images": [good[0], truncated], "prompt": PROMPT})
        assert r.status_code == 422
        assert r.json()["detail"].startswith("images[1]: unreadable image")
        r = c.post("/v1/inspect", json={"images": [good[0]], "products": [text]})
        assert r.status_code == 422
        assert r.json()["detail"].startswith("products[0]: not an image file")
        reference = c.post("/v1/score", json={"images": good, "prompt": PROMPT})
        assert reference.status_code == 200
        # Bad and good requests arriving together share a batch: only the bad ones fail.
        bodies = [{"images": [good[i % 3]] + ([truncated] if i % 2 else []), "prompt": PROMPT}
                  for i in range(8)]  # fmt: skip
        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda b: c.post("/v1/score", json=b), bodies))
        for i, reply in enumerate(replies):
            if i % 2:
                assert reply.status_code == 422 and "images[1]" in reply.json()["detail"]
            else:
                assert reply.status_code == 200, reply.text
                assert reply.json()["scores"][0] == pytest.approx(
                    reference.json()["scores"][i % 3], abs=1e-5
                )
        assert c.get("/health").status_code == 200


def test_multipart_forms_give_the_json_answers(server):
    folder = server.root / "images"
    files = [("images", (p, (folder / p).read_bytes(), "application/octet-stream"))
             for p in GOOD[:3]]  # fmt: skip
    with server.client() as c:
        r = c.post("/v1/score", files=files, data={"prompt": PROMPT})
        assert r.status_code == 200, r.text
        ref = c.post("/v1/score", json={"images": [b64(folder / p) for p in GOOD[:3]],
                                        "prompt": PROMPT})  # fmt: skip
        assert r.json() == ref.json()
        product = server.root / "gen" / "products" / "000000.png"
        image = server.root / "gen" / "images" / "000000.png"
        form = [("images", ("g.png", image.read_bytes())),
                ("products", ("p.png", product.read_bytes()))]  # fmt: skip
        r = c.post("/v1/inspect", files=form, data={"captions": "mug, 10 cm"})
        ref = c.post("/v1/inspect", json={"images": [b64(image)], "products": [b64(product)],
                                          "captions": ["mug, 10 cm"]})  # fmt: skip
        assert r.status_code == 200 and r.json() == ref.json()


def test_generate_returns_the_generate_commands_image_with_verdicts(server, tmp_path):
    world = pq.read_table(server.root / "world" / "manifest.parquet").to_pylist()
    row = world[0]
    photo = server.root / "world" / row["product_path"]
    folder = tmp_path / "products"
    folder.mkdir()
    (folder / "item.png").write_bytes(photo.read_bytes())
    out = tmp_path / "cli"
    assert main(["generate", "--products", str(folder), "--out", str(out), "--prompt",
                 row["prompt"], "--seed", "3", "--steps", "2", "--no-progress",
                 "--device", "cpu"]) == 0  # fmt: skip
    expected = read_image(out / "images" / "item.png")
    with server.client() as c:
        # The inspector judge reads the product's height: without one, one line says so.
        r = c.post("/v1/generate", json={"product": b64(photo), "prompt": row["prompt"],
                                         "seed": 3})  # fmt: skip
        assert r.status_code == 422 and r.json()["detail"].startswith("product_height_cm:")
        r = c.post("/v1/generate", json={"product": b64(photo), "prompt": row["prompt"],
                                         "seed": 3, "caption": row["caption"]})  # fmt: skip
        assert r.status_code == 200, r.text
        reply = r.json()
        image = np.asarray(Image.open(io.BytesIO(base64.b64decode(reply["image"]))))
        # The same seed paints the same image; the server's worker runs other thread counts,
        # so a rounding may land one grey level away.
        diff = np.abs(image.astype(int) - expected.astype(int))
        assert image.shape == expected.shape and diff.max() <= 1 and (diff > 0).mean() < 0.01
        assert reply["verdict"] in CLASSES and reply["attempts_used"] == 1
        assert reply["judge"] == "inspector" and len(reply["attempts"]) == 1
        assert Path(reply["manifest"]).is_file()
        saved = pq.read_table(reply["manifest"]).to_pylist()
        assert saved[0]["verdict"] == reply["verdict"]

        # Recurrent Generation with the oracle (the caption holds the height) and every
        # attempt's image.
        r = c.post("/v1/generate", json={
            "product": b64(photo), "prompt": row["prompt"], "caption": row["caption"],
            "until_accepted": True, "max_attempts": 3, "judge": "oracle",
            "return_attempts": True,
        })  # fmt: skip
        assert r.status_code == 200, r.text
        reply = r.json()
        assert 1 <= reply["attempts_used"] == len(reply["attempts"]) <= 3
        assert all(a["verdict"] in CLASSES and a["image"] for a in reply["attempts"])
        assert reply["accepted"] == (reply["verdict"] == "Available")
        assert reply["best_effort"] == (not reply["accepted"])
        if not reply["accepted"]:
            assert reply["attempts_used"] == 3
        r = c.post("/v1/generate", json={"product": b64(photo), "prompt": "x",
                                         "judge": "oracle"})  # fmt: skip
        assert r.status_code == 422 and r.json()["detail"].startswith("product_height_cm:")
        outputs = c.get("/review/api/sources").json()["outputs"]
        assert str(Path(reply["manifest"])) in outputs


def test_openapi_docs(server):
    with server.client(key=None) as c:
        assert c.get("/docs").status_code == 200
        spec = c.get("/openapi.json").json()
    for path in ("/v1/score", "/v1/inspect", "/v1/generate", "/health", "/review/api/labels"):
        assert path in spec["paths"], path
    assert {"ScoreRequest", "InspectRequest", "GenerateRequest"} <= set(
        spec["components"]["schemas"]
    )

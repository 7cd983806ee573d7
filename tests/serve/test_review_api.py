"""The review page's API without a browser: which manifests and files it serves, labels,
agreement by hand, the export's rules and errors."""

from __future__ import annotations

import datetime as dt
import json
import os

import numpy as np
import pyarrow as pa
import pytest

from rewardkit.cli import main
from rewardkit.io import png_bytes, write_parquet_atomic
from rewardkit.serve.labels import _kappa, agreement, consensus
from rewardkit.world.scene import CLASSES

A, S, Z, U = CLASSES[0], CLASSES[1], CLASSES[2], CLASSES[5]


def test_only_manifests_and_files_inside_the_review_roots_are_served(server, tmp_path):
    root = server.root / "roots_case"
    root.mkdir()
    inside = root / "ok.png"
    inside.write_bytes(png_bytes(np.full((16, 16, 3), 200, np.uint8)))
    outside = tmp_path / "secret.png"  # tmp_path is not a review root
    outside.write_bytes(png_bytes(np.zeros((16, 16, 3), np.uint8)))
    (root / "link.png").symlink_to(outside)  # a link inside that leads out
    (root / "notes.txt").write_text("not an image")
    manifest = root / "m.parquet"
    write_parquet_atomic(manifest, pa.table({
        "path": ["ok.png", str(outside), "link.png", "notes.txt", "../../nowhere.png"],
        "product_path": ["ok.png"] * 5, "caption": ["mug, 10 cm"] * 5,
    }))  # fmt: skip
    with server.client() as c:
        r = c.post("/review/api/manifests", json={"path": str(tmp_path / "x.parquet")})
        assert r.status_code == 403 and r.json()["detail"].startswith("path: ")
        assert "outside the review roots" in r.json()["detail"]
        r = c.post("/review/api/manifests", json={"path": str(root / "missing.parquet")})
        assert r.status_code == 404
        write_parquet_atomic(root / "bad.parquet", pa.table({"path": ["ok.png"]}))
        r = c.post("/review/api/manifests", json={"path": str(root / "bad.parquet")})
        assert r.status_code == 422 and "missing column(s) ['product_path']" in r.text

        view = c.post("/review/api/manifests", json={"path": str(manifest)}).json()
        assert [it["row"] for it in view["items"]] == [0, 3]
        reasons = {s["row"]: s["reason"] for s in view["skipped"]}
        assert "outside the review roots" in reasons[1] and "outside" in reasons[2]
        assert "no such file" in reasons[4] or "outside" in reasons[4]
        good, text = view["items"]
        r = c.get(f"/review/api/items/{good['id']}/image")
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert r.content.startswith(b"\x89PNG")
        r = c.get(f"/review/api/items/{text['id']}/image")  # listed, but not an image
        assert r.status_code == 422
        assert r.json()["detail"].startswith(f"item {text['id']}: ")
        assert c.get("/review/api/items/999999/image").status_code == 404
        assert c.get(f"/review/api/items/{good['id']}/secret").status_code == 404
        # The verdict comes from the server's own inspector; an unreadable image has none.
        assert good["verdict"] in CLASSES and text["verdict"] is None


def test_labels_are_kept_per_reviewer_and_reopening_keeps_them(server):
    manifest = server.root / "world" / "manifest.parquet"
    with server.client() as c:
        view = c.post("/review/api/manifests", json={"path": str(manifest)}).json()
        first = view["items"][0]["id"]
        assert view["items"][0]["source_label"] in CLASSES  # the render's own label
        post = lambda body: c.post("/review/api/labels", json=body)  # noqa: E731
        assert post({"item": first, "reviewer": "carol", "label": S}).json()["labels"] == {
            "carol": S
        }
        assert post({"item": first, "reviewer": "carol", "label": A}).json()["labels"] == {
            "carol": A
        }
        r = post({"item": first, "reviewer": "carol", "label": "Fine"})
        assert r.status_code == 422 and r.json()["detail"].startswith("label: 'Fine'")
        r = post({"item": first, "reviewer": "", "label": A})
        assert r.status_code == 422 and r.json()["detail"].startswith("reviewer:")
        assert post({"item": 10**8, "reviewer": "carol", "label": A}).status_code == 404
        again = c.post("/review/api/manifests", json={"path": str(manifest)}).json()
        assert again["id"] == view["id"] and again["items"][0]["labels"] == {"carol": A}
        opened = c.get("/review/api/sources").json()["opened"]
        assert any(m["id"] == view["id"] for m in opened)


def _rows(labels: dict[int, dict[str, str]], verdicts: dict[int, str]) -> list[dict]:
    return [{"item": i, "reviewer": r, "label": lab, "verdict": verdicts[i]}
            for i, by in labels.items() for r, lab in by.items()]  # fmt: skip


def test_agreement_by_hand():
    labels = {
        1: {"ann": A, "ben": A},
        2: {"ann": S, "ben": A},
        3: {"ann": S, "ben": S, "cat": Z},
        4: {"ann": U},
    }
    verdicts = {1: A, 2: S, 3: Z, 4: None}
    a = agreement(_rows(labels, verdicts))
    assert a["labels"] == 8 and a["items"] == 4
    assert a["reviewers_per_item"] == {"1": 1, "2": 2, "3": 1}
    ann_ben = next(p for p in a["reviewers"]["pairs"] if (p["a"], p["b"]) == ("ann", "ben"))
    assert ann_ben["n"] == 3 and ann_ben["agreement"] == pytest.approx(2 / 3)
    # Cohen's kappa: p_o = 2/3; ann A:1 S:2, ben A:2 S:1 -> p_e = (1*2 + 2*1) / 9 = 4/9.
    assert ann_ben["kappa"] == pytest.approx((2 / 3 - 4 / 9) / (1 - 4 / 9))
    # Available or not: items 1 (A, A) and 3 (S, S) agree, item 2 (S, A) does not.
    assert ann_ben["available_agreement"] == pytest.approx(2 / 3)
    overall = a["reviewers"]["overall"]  # pairs: (1) ab, (2) ab, (3) ab ac bc
    assert overall["n"] == 5 and overall["agreement"] == pytest.approx(2 / 5)
    ann = a["inspector"]["by_reviewer"]["ann"]  # item 4 has no verdict
    assert ann["n"] == 3 and ann["agreement"] == pytest.approx(2 / 3)
    assert a["inspector"]["by_reviewer"]["cat"]["agreement"] == 1.0
    assert _kappa([(A, A), (A, A)]) is None  # chance agreement is certain


def test_consensus_is_the_majority_then_the_latest():
    t = [dt.datetime(2026, 1, 1, h) for h in range(4)]
    assert consensus({"a": (S, t[0]), "b": (S, t[1]), "c": (A, t[3])}) == (S, pytest.approx(2 / 3))
    assert consensus({"a": (S, t[2]), "b": (A, t[1])}) == (S, 0.5)


def test_export_filters_and_errors(server, tmp_path, capsys):
    manifest = str(server.root / "world" / "manifest.parquet")
    out = tmp_path / "e.parquet"
    argv = ["labels", "export", "--out", str(out), "--db", server.db, "--manifest", manifest]
    assert main([*argv, "--reviewer", "carol"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows"] == 1 and summary["per_class"] == {A: 1}
    assert main([*argv, "--min-reviewers", "2"]) == 2
    assert "no items with at least 2 label(s)" in capsys.readouterr().err
    assert main(["labels", "export", "--out", str(out), "--db", server.db, "--manifest",
                 str(tmp_path / "never.parquet")]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not a manifest opened on the review page" in err
    assert main(["labels", "export", "--out", str(tmp_path / "e.csv"), "--db", server.db]) == 2
    assert "--out" in capsys.readouterr().err
    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    assert main(["labels", "export", "--out", str(out), "--db", empty]) == 2
    assert "no items" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "never.parquet")

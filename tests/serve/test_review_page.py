"""The review page in a real browser (headless Chromium driven by selenium): open a
`rewardkit generate` manifest, label three images with the keyboard, reload, the labels are
there; then `rewardkit labels export` and `rewardkit train rfnet` on the export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from rewardkit.cli import main
from rewardkit.world.scene import CLASSES
from tests.serve.conftest import KEY

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
TINY_RFNET = dict(width=32, heads=2, n_fusion=1, resolution=32,
                  backbone={"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1],
                            "layer_type": "basic"})  # fmt: skip


def _browser():
    """Headless Chromium, or a skip naming what is missing (Debian: `apt-get install -y
    chromium chromium-driver`; `make test` installs them)."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install 'rewardkit[serve]')")
    binary = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    driver = CHROMEDRIVER if Path(CHROMEDRIVER).exists() else shutil.which("chromedriver")
    if not binary or not driver:
        pytest.skip("no headless browser: apt-get install -y chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000"):  # fmt: skip
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)


def test_label_with_the_keyboard_reload_export_and_train(server, tmp_path, capsys):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    manifest = server.root / "gen" / "manifest.parquet"
    browser = _browser()
    try:
        wait = WebDriverWait(browser, 180)
        browser.get(f"{server.url}/review?reviewer=alice&key={KEY}")
        box = browser.find_element(By.ID, "manifest-path")
        box.send_keys(str(manifest))
        browser.find_element(By.ID, "open").click()
        wait.until(lambda b: b.find_element(By.ID, "position").text == "1 / 6")
        cells = browser.find_elements(By.CSS_SELECTOR, "#strip li")
        assert len(cells) == 6
        # The inspector's verdict and the product photo are shown beside the image.
        assert browser.find_element(By.ID, "verdict").text in CLASSES
        wait.until(lambda b: b.execute_script(
            "const i = document.getElementById('product'); return i.complete && i.naturalWidth"
        ))  # fmt: skip
        browser.execute_script("document.activeElement.blur()")

        def mine() -> list[str]:
            cells = browser.find_elements(By.CSS_SELECTOR, "#strip li")
            return [c.get_attribute("data-mine") or "" for c in cells]

        keys = ActionChains(browser)
        keys.send_keys("2").perform()  # image 1: Space Mismatch, on to image 2
        wait.until(lambda b: mine()[0] == CLASSES[1])
        keys.send_keys("1").perform()  # image 2: Available, on to image 3
        wait.until(lambda b: mine()[1] == CLASSES[0])
        keys.send_keys(Keys.ARROW_RIGHT).perform()  # skip image 3
        wait.until(lambda b: b.find_element(By.ID, "position").text == "4 / 6")
        keys.send_keys("6").perform()  # image 4: Unsuitable
        wait.until(lambda b: mine()[3] == CLASSES[5])

        browser.refresh()  # the URL now names the manifest; the key is in a cookie
        wait.until(lambda b: b.execute_script("return document.body.dataset.ready") == "1")
        wait.until(lambda b: len(mine()) == 6)
        assert mine() == [CLASSES[1], CLASSES[0], "", CLASSES[5], "", ""]
        assert browser.find_element(By.ID, "position").text == "3 / 6"  # first not labelled
        assert browser.find_element(By.ID, "reviewer").get_attribute("value") == "alice"
        wait.until(lambda b: "3 labels" in b.find_element(By.ID, "agreement").text)
    finally:
        browser.quit()

    # A second reviewer labels every image (through the page's API): agreement is shown
    # between reviewers and with the inspector.
    with server.client() as c:
        opened = c.post("/review/api/manifests", json={"path": str(manifest)}).json()
        assert [it["labels"].get("alice", "") for it in opened["items"]] == [
            CLASSES[1], CLASSES[0], "", CLASSES[5], "", ""]  # fmt: skip
        bob = [CLASSES[1], CLASSES[2], CLASSES[0], CLASSES[5], CLASSES[0], CLASSES[3]]
        for item, label in zip(opened["items"], bob, strict=True):
            r = c.post("/review/api/labels",
                       json={"item": item["id"], "reviewer": "bob", "label": label})  # fmt: skip
            assert r.status_code == 200, r.text
        a = c.get(f"/review/api/manifests/{opened['id']}/agreement").json()["manifest"]
    pair = a["reviewers"]["pairs"][0]
    assert (pair["a"], pair["b"], pair["n"]) == ("alice", "bob", 3)
    assert pair["agreement"] == pytest.approx(2 / 3)
    verdicts = [it["verdict"] for it in opened["items"]]
    bob_vs = a["inspector"]["by_reviewer"]["bob"]
    assert bob_vs["n"] == 6
    same = sum(v == b for v, b in zip(verdicts, bob, strict=True))
    assert bob_vs["agreement"] == pytest.approx(same / 6)

    out = tmp_path / "labels.parquet"
    assert main(["labels", "export", "--out", str(out), "--db", server.db,
                 "--manifest", str(manifest)]) == 0  # fmt: skip
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows"] == 6 and summary["labels"] == 9
    rows = pq.read_table(out).to_pylist()
    gen = pq.read_table(manifest).to_pylist()
    for row, source in zip(rows, gen, strict=True):
        assert row["path"] == str((manifest.parent / source["path"]).resolve())
        assert row["product_path"] == str((manifest.parent / source["product_path"]).resolve())
        assert row["caption"] == source["caption"]
        assert row["product_height_cm"] == source["product_height_cm"]
    # Majority label; alice and bob disagree on image 2: the later label (bob's) wins.
    assert [r["label"] for r in rows] == bob
    assert [r["n_reviewers"] for r in rows] == [2, 2, 1, 2, 1, 1]

    config = tmp_path / "rfnet.yaml"
    config.write_text(yaml.safe_dump(TINY_RFNET))
    run = tmp_path / "run"
    argv = ["train", "rfnet", "--manifest", str(out), "--out", str(run), "--model-config",
            str(config), "--max-steps", "1", "--batch-size", "2", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["samples"] == 6 and summary["runs"]["full"]["steps"] == 1
    assert (run / "model" / "config.json").is_file()

import json

from rewardkit.cli import main


def test_demo_writes_a_readable_report(tmp_path, capsys):
    from rewardkit.generation.default import GeneratorArch, build_generator

    # A tiny random generator at 64 px stands in for the shipped one: the stage's logic is
    # under test here, not the weights.
    tiny = GeneratorArch(unet_channels=(16, 32, 32), vae_channels=(8, 16), text_width=32,
                         text_layers=1, text_heads=2, max_tokens=48)  # fmt: skip
    gen_dir = build_generator(tiny).save_pretrained(tmp_path / "gen")
    out = tmp_path / "demo"
    args = ["--n", "36", "--users", "2000", "--prompts", "20", "--train-steps", "2",
            "--gen-products", "3", "--gen-attempts", "2", "--gen-steps", "3",
            "--rfft-products", "3", "--generator", str(gen_dir)]  # fmt: skip
    assert main(["demo", "--out", str(out), *args]) == 0
    html = (out / "report.html").read_text()
    for heading in (
        "AdWorld: renders and the oracle",
        "AdWorld community",
        "Oracle agreement",
        "Social Reward: from remix logs",
        "Scorers on held-out prompts",
        "Highest and lowest ranked",
        "RFNet: the inspector on new products",
        "verdict: Available",
        "Ad generation and Recurrent Generation",
        "First attempt and returned image",
        "RFFT: the generator fine-tuned with reward gradients",
    ):
        assert heading in html
    assert html.count("<img") > 30
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world"]["n"] == 36
    assert set(summary["world"]["per_class"]) >= {"Available", "Unsuitable"}
    assert summary["community"]["events"] > 0
    rf = summary["rfnet"]["results"]["RFNet (shipped)"]["clean"]
    assert rf["n"] == 36 and len(rf["confusion"]) == 6
    assert rf["oracle_n"] == 36 and 0 <= rf["oracle_agreement"] <= 1
    reward = summary["social_reward"]
    assert reward["train"]["steps"] == 2
    names = [row["scorer"] for row in reward["table"]]
    assert names[0] == "Social Reward (shipped)" and len(names) == 4
    assert all(row["truth_pairs_n"] > 0 for row in reward["table"])
    gen = summary["generation"]
    assert gen["products"] == 3 and 3 <= gen["stats"]["images_generated"] <= 6
    assert len(gen["oracle_curve"]) == 2 and 0 <= gen["inspector_oracle_agreement"] <= 1
    rfft = summary["rfft"]  # the shipped original and fine-tuned generators, 3 products
    assert rfft["products"] == 3 and rfft["rows"][0]["model"] == "Original"
    assert len(rfft["rows"]) >= 2 and all(0 <= r["oracle_available"] <= 1 for r in rfft["rows"])
    # Every figure is on products and prompts no shipped model trained or was chosen on.
    for stage in (summary["rfnet"], reward, gen, rfft):
        assert stage["held_out"]["rows"] > 0 and stage["held_out"]["seen_rows"] == 0
    assert summary["rfnet"]["held_out"]["unknown_models"] == []  # the shipped keys are read
    assert html.count("Held out: none of these") >= 3


def test_demo_refuses_a_seed_whose_products_the_shipped_models_trained_on(tmp_path, capsys):
    # Seed 101 renders are the shipped RFNet's (and dual encoder's) training products.
    argv = ["demo", "--out", str(tmp_path / "d"), "--seed", "101", "--n", "12"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "demo RFNet stage" in err and "were seen by rfnet" in err and "--allow-overlap" in err


def test_world_community_command(tmp_path, capsys):
    out = tmp_path / "c"
    assert (
        main(
            [
                "world",
                "community",
                "--users",
                "1500",
                "--seed",
                "3",
                "--out",
                str(out),
                "--prompts",
                "6",
                "--images-per-prompt",
                "5",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 30 and summary["users"] == 1500
    for f in (
        "users.parquet",
        "images.parquet",
        "truth/images.parquet",
        "schema.md",
        "pool.parquet",
    ):
        assert (out / f).exists(), f
    assert list((out / "events").glob("*.parquet"))


def test_rfft_recipe_text_says_what_the_shipped_folder_was_trained_with(tmp_path):
    """The demo's RFFT paragraph reads each shipped generator's finetune_summary.json, so it
    cannot describe a ControlNet run when every weight was trained, or drop a KL term."""
    from rewardkit.demo.rfft import recipe_text

    assert recipe_text(tmp_path) == ""
    config = {"reward": "rfnet", "regularizer": "cc", "beta": 300.0, "kl_beta": 10.0,
              "trainable": "all", "lr": 1e-4, "max_steps": 200}  # fmt: skip
    (tmp_path / "finetune_summary.json").write_text(json.dumps({"config": config}))
    assert recipe_text(tmp_path) == (
        "reward rfnet, Consistent Condition (beta 300), KL beside it (beta 10), "
        "every UNet and ControlNet weight trained, lr 0.0001, 200 steps"
    )
    config.update(regularizer="none", kl_beta=0.0, trainable="controlnet")
    (tmp_path / "finetune_summary.json").write_text(json.dumps({"config": config}))
    assert (
        recipe_text(tmp_path)
        == "reward rfnet, no regulariser, ControlNet trained, lr 0.0001, 200 steps"
    )

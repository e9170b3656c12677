"""The `marche` command line with the shipped digits model."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from marche.cli import app

runner = CliRunner()


def test_generate_writes_a_grid_and_prints_seeds(tmp_path):
    out = tmp_path / "grid.png"
    result = runner.invoke(
        app,
        [
            "generate",
            "--class-id",
            "7",
            "--num",
            "2",
            "--seed",
            "5",
            "--steps",
            "4",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "image 0: class 7 (7) seed 5" in result.output
    assert "image 1: class 7 (7) seed 6" in result.output
    image = Image.open(out)
    assert image.size == (2 * 34 + 2, 36)  # two 32x32 digits in one row, 2 px padding


def test_generate_several_classes_one_row_each_on_the_same_seeds(tmp_path):
    out = tmp_path / "grid.png"
    opts = ["--num", "3", "--steps", "4", "--seed", "1"]
    args = ["generate", "--class-id", "2", "--class-id", "5", *opts]
    result = runner.invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "image 2: class 2 (2) seed 3" in result.output
    assert "image 3: class 5 (5) seed 1" in result.output
    assert "wrote" in result.output and "(6" in result.output  # rich may wrap the line
    assert Image.open(out).size == (3 * 34 + 2, 2 * 34 + 2)  # rows = classes, columns = seeds
    # a class's images do not depend on which other classes share the grid
    alone = tmp_path / "alone"
    result = runner.invoke(app, ["generate", "--class-id", "2", *opts, "--out-dir", str(alone)])
    assert result.exit_code == 0, result.output
    with_five = tmp_path / "both"
    result = runner.invoke(app, [*args, "--out-dir", str(with_five)])
    assert result.exit_code == 0, result.output
    for name in ("class2_seed1.png", "class2_seed3.png"):
        assert (alone / name).read_bytes() == (with_five / name).read_bytes()


def test_generate_out_dir_one_file_per_image(tmp_path):
    result = runner.invoke(
        app,
        [
            "generate",
            "--class-id",
            "1",
            "--num",
            "2",
            "--steps",
            "4",
            "--mode",
            "marche",
            "--out-dir",
            str(tmp_path),
            "--scale",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    files = sorted(p.name for p in tmp_path.glob("*.png"))
    assert files == ["class1_seed0.png", "class1_seed1.png"]
    assert Image.open(tmp_path / files[0]).size == (64, 64)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--class-id", "12"], "class_id 12 is out of range for digits: 0..9"),
        (["--class-id", "1", "--class-id", "10"], "class_id 10 is out of range"),
        (["--model", "mar_base"], "marche weights fetch mar_base vae"),
        (["--class", "sevn"], "unknown class name 'sevn'; did you mean '7'?"),
        (["--model", "mar_base", "--checkpoint", "/nope/checkpoint-last.pth"], "not found"),
        (["--mode", "warp"], "unknown mode"),
        (["--cfg-schedule", "cosine"], "cfg_schedule"),
        (["--cfg", "nan"], "cfg must be"),
    ],
)
def test_errors_exit_nonzero_with_one_clear_line(args, message):
    result = runner.invoke(app, ["generate", "--num", "1", "--steps", "2", *args])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_info_lists_models_with_parameter_counts():
    result = runner.invoke(app, ["info"])
    assert result.exit_code == 0, result.output
    for name in ("digits", "mar_base", "mar_large", "mar_huge"):
        assert name in result.output
    assert "207,924,768" in result.output  # MAR-B, exactly as released


def test_bench_json_has_speedup_and_phases(tmp_path):
    path = tmp_path / "bench.json"
    result = runner.invoke(
        app,
        [
            "bench",
            "--model",
            "digits",
            "--batch",
            "1",
            "--steps",
            "2",
            "--device",
            "cpu",
            "--json",
            str(path),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "turbo: run 1 took" in result.output  # each run is printed as it ends,
    assert "diffusion_head" in result.output  # with its phase split
    report = json.loads(path.read_text())
    assert set(report["modes"]) == {"mar", "marche", "turbo"}
    assert report["speedup"]["mar"] == 1.0 and report["speedup"]["turbo"] > 0
    assert report["cfg"] == 5.0  # the model's default guidance unless --cfg is given
    for mode in report["modes"].values():
        assert mode["s_per_image"] > 0
        assert set(mode["phases_s_per_image"]) == {"encoder", "decoder", "diffusion_head", "vae"}


def test_quality_marche_with_psnr_vs_mar(tmp_path):
    path = tmp_path / "q.json"
    result = runner.invoke(
        app,
        [
            "quality",
            "--mode",
            "marche",
            "--num",
            "10",
            "--steps",
            "2",
            "--budget",
            "32",
            "--refresh",
            "random",
            "--psnr-vs-mar",
            "--json",
            str(path),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(path.read_text())
    assert report["num_images"] == 10 and 0 <= report["accuracy"] <= 1
    knobs = report["decoding"]["marche"]
    assert knobs["budget"] == 32 and knobs["refresh"] == "random"
    assert 0 < report["psnr_vs_mar_db"] <= 100


def test_quality_scores_another_checkpoint_and_refuses_a_wrong_one(tmp_path):
    from engine.pipeline import MODELS

    path = tmp_path / "q.json"
    shipped = MODELS["digits"].weights
    args = ["quality", "--num", "10", "--steps", "2", "--json", str(path)]
    result = runner.invoke(app, [*args, "--checkpoint", str(shipped)])
    assert result.exit_code == 0, result.output
    assert json.loads(path.read_text())["weights"] == str(shipped)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"not_a_key": torch.zeros(1)}, str(wrong))
    result = runner.invoke(app, [*args, "--checkpoint", str(wrong)])
    assert result.exit_code == 2
    assert "not_a_key" in result.output


def test_ablations_table_and_json(tmp_path):
    path = tmp_path / "ablations.json"
    args = ["ablations", "--num", "10", "--steps", "3", "--json", str(path)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "low-attention refresh" in result.output and "PSNR vs MAR" in result.output
    assert "drift p" in result.output
    rows = json.loads(path.read_text())["rows"]
    assert [r["name"] for r in rows][:2] == ["MAR (exact)", "MARché (defaults)"]
    assert len(rows) == 6 and all(0 < r["psnr_vs_mar_db"] <= 100 for r in rows[1:])
    assert all(0 < r["drift_p"] <= 1 for r in rows[1:])


def test_bench_flops_counts_every_phase_and_mode(tmp_path):
    path = tmp_path / "flops.json"
    args = ["bench", "--flops", "--model", "digits", "--steps", "4", "--json", str(path)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(path.read_text())["digits"]
    assert set(report["modes"]) == {"mar", "marche", "turbo"}
    mar, turbo = report["modes"]["mar"], report["modes"]["turbo"]
    assert mar["encoder"] > 0 and mar["decoder"] > 0 and mar["diffusion_head"] > 0
    assert mar["vae"] == 0  # pixel tokenizer: no VAE
    assert turbo["total"] < mar["total"] and report["reduction"]["turbo"] > 1
    assert "turbo" in result.output and "vs mar" in result.output


def test_bench_profile_reports_where_each_modes_time_goes(tmp_path):
    path = tmp_path / "profile.json"
    args = ["bench", "--profile", "--model", "digits", "--device", "cpu", "--modes", "mar,fast",
            "--batches", "1,2", "--steps", "2", "--json", str(path)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(path.read_text())
    assert [(r["mode"], r["batch"]) for r in report["rows"]] == [
        ("mar", 1), ("fast", 1), ("mar", 2), ("fast", 2)]  # fmt: skip
    for row in report["rows"]:
        assert row["device_busy"] is None  # a CPU has no device timeline
        assert 0 < row["host_ms_per_step"] and 0 < row["ms_per_step"]
        assert row["top"] and all(0 < t["share"] <= 1 for t in row["top"])
        assert row["top"][0]["ms"] >= row["top"][-1]["ms"]
    assert [r["steps"] for r in report["rows"]][:2] == [2, 1 + 8]  # fast: S 1 + K 8
    assert "host ms/step" in result.output


def test_bench_rejects_an_unknown_model():
    result = runner.invoke(app, ["bench", "--flops", "--model", "digits,mar_giant"])
    assert result.exit_code == 2 and "mar_giant" in result.output


def test_ablations_turbo_set(tmp_path):
    path = tmp_path / "ablations.json"
    args = ["ablations", "--set", "turbo", "--num", "10", "--steps", "3", "--json", str(path)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = json.loads(path.read_text())["rows"]
    names = [r["name"] for r in rows]
    assert names[0] == "MAR (exact)" and "turbo (preset)" in names
    assert "condition cache alone" in names and "head cache alone" in names
    turbo = rows[names.index("turbo (preset)")]
    assert turbo["decoding"]["cond_cache"] is not None and turbo["psnr_vs_mar_db"] < 100


def test_ablations_only_runs_the_named_variants(tmp_path):
    path = tmp_path / "ablations.json"
    args = ["ablations", "--set", "turbo", "--only", "turbo", "--num", "10", "--steps", "2"]
    result = runner.invoke(app, [*args, "--json", str(path)])
    assert result.exit_code == 0, result.output
    assert [r["name"] for r in json.loads(path.read_text())["rows"]] == [
        "MAR (exact)",
        "turbo (preset)",
    ]
    result = runner.invoke(app, ["ablations", "--set", "turbo", "--only", "nothing"])
    assert result.exit_code == 2 and "matches no variant" in result.output


def test_ablations_split_over_runs_reuse_mar_and_merge_rows(tmp_path):
    path, ref = tmp_path / "ablations.json", tmp_path / "mar.safetensors"
    base = ["ablations", "--set", "turbo", "--num", "10", "--steps", "2", "--reference", str(ref)]
    for only in ("turbo", "head cache"):
        result = runner.invoke(app, [*base, "--only", only, "--json", str(path)])
        assert result.exit_code == 0, result.output
    names = [r["name"] for r in json.loads(path.read_text())["rows"]]
    assert names == ["MAR (exact)", "turbo (preset)", "head cache alone"]

"""python -m experiments.inspect on a run trained with --telemetry: every figure, readable size;
and the telemetry cost measurement."""
from PIL import Image

from experiments import inspect
from experiments.benchmarks.telemetry import telemetry_overhead
from experiments.cifar import cli


def test_inspect_draws_every_figure_of_a_telemetry_run(tmp_path, cifar_folder):
    cifar_folder(6, 2)
    argv = ["--data-dir", str(tmp_path / "c10"), "--out", str(tmp_path / "runs"), "--name", "b",
            "--epochs", "2", "--batch-size", "20", "--val-split", "0", "--no-bf16", "--telemetry", "1"]
    assert cli.main("cifar_model_b", "B", argv) == 0
    run = tmp_path / "runs" / "b"
    assert len((run / "telemetry.jsonl").read_text().splitlines()) == 6      # 3 steps x 2 epochs
    assert inspect.main([str(run), "--data-dir", str(tmp_path / "c10"), "--images", "20"]) == 0
    names = {p.name for p in (run / "figures").iterdir()}
    assert {"telemetry_heatmaps.png", "gradient_flow.png", "activation_histograms.png",
            "feature_maps_features_2.png"} <= names
    with Image.open(run / "figures" / "telemetry_heatmaps.png") as im:
        assert im.size[0] >= 1000 and im.size[1] >= 1000


def test_inspect_refuses_a_folder_without_a_run(tmp_path, capsys):
    assert inspect.main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_telemetry_overhead_is_measured_against_the_step():
    out = telemetry_overhead("cifar_model_a", batch=4, rounds=1, bf16=False, channels_last=False)
    assert out["step_s"] > 0 and out["pass_s"] > 0
    assert abs(out["overhead_at_default"] - out["pass_s"] / (50 * out["step_s"])) < 1e-12


def test_inspect_refuses_zero_or_negative_images_in_one_line_before_reading_the_run(tmp_path, capsys):
    for n in ("0", "-3"):
        assert inspect.main([str(tmp_path), "--images", n, "--out", str(tmp_path / "figs")]) == 2
        err = capsys.readouterr().err
        assert err == f"error: --images: expected a whole number >= 1, got {n}\n"
    assert not (tmp_path / "figs").exists()

"""`noisyseg demo --quick` end to end through the console entry point."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest

from noisyseg import demo as demo_module
from noisyseg.cli import main

DEMO_METHODS = ("baseline-ms", "adele", "arm")
THREE = ("best_val", "last", "max")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("demo")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["demo", "--quick", "--out", str(out)]) == 0
    return out, stdout.getvalue()


def _is_fraction(value: object) -> bool:
    return isinstance(value, float) and 0.0 <= value <= 1.0


def test_summary_has_one_run_summary_per_method_with_fractions(demo_run: tuple[Path, str]) -> None:
    out, _ = demo_run
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(summary["methods"]) == sorted(DEMO_METHODS)
    for method, run in summary["methods"].items():
        for key in ("test_miou", "test_miou_fg"):
            assert sorted(run[key]) == sorted(THREE)
            assert all(_is_fraction(run[key][which]) for which in THREE), (method, key, run[key])
            assert run[key]["max"] >= run[key]["last"] and run[key]["max"] >= run[key]["best_val"]
        assert sorted(run["trigger_epoch"]) == ["1", "2", "3", "4"]
        for epoch in run["trigger_epoch"].values():
            assert epoch is None or (isinstance(epoch, int) and 1 <= epoch <= summary["scale"]["epochs"])
        if method != "adele":  # only ADELE corrects labels
            assert set(run["trigger_epoch"].values()) == {None}
        assert (Path(run["run_dir"]) / "curves.png").is_file()
    assert _is_fraction(summary["noise"]["annotation_miou"])


def test_the_table_is_printed(demo_run: tuple[Path, str]) -> None:
    out, stdout = demo_run
    summary = json.loads((out / "summary.json").read_text())
    for method in DEMO_METHODS:
        row = next(line for line in stdout.splitlines() if line.startswith(method + " "))
        last = summary["methods"][method]["test_miou"]["last"]
        assert f"{100 * last:.1f}" in row.split()
    assert "Label correction start" in stdout and "Per-class test IoU" in stdout


def test_best_model_is_exported_and_onnx_runtime_agrees(demo_run: tuple[Path, str]) -> None:
    out, _ = demo_run
    onnx = json.loads((out / "summary.json").read_text())["onnx"]
    assert Path(onnx["path"]).is_file()
    assert onnx["test_argmax_agreement"] >= 0.999
    assert onnx["test_miou_onnxruntime"] == pytest.approx(onnx["test_miou_pytorch"], abs=0.01)


def test_a_second_demo_reuses_the_finished_runs(demo_run: tuple[Path, str], capsys: pytest.CaptureFixture[str]) -> None:
    out, _ = demo_run
    before = {m: (out / "runs" / "demo").rglob(f"{m}/summary.json") for m in DEMO_METHODS}
    stamps = {m: next(paths).stat().st_mtime_ns for m, paths in before.items()}
    assert main(["demo", "--quick", "--no-export", "--out", str(out)]) == 0
    for method, stamp in stamps.items():
        assert next((out / "runs" / "demo").rglob(f"{method}/summary.json")).stat().st_mtime_ns == stamp
    assert "baseline-ms" in capsys.readouterr().out


def test_bad_epochs_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--quick", "--epochs", "0", "--out", str(tmp_path)]) == 2
    assert "--epochs: expected at least 1" in capsys.readouterr().err


def test_one_worker_trains_the_same_runs_as_the_parallel_demo(demo_run: tuple[Path, str], tmp_path: Path) -> None:
    """The methods train deterministically whether the demo runs them in worker processes (the
    console run above, one per core) or one after another in this process."""
    from noisyseg.demo import demo, demo_scale

    parallel = json.loads((demo_run[0] / "summary.json").read_text())
    sequential = demo(tmp_path, demo_scale(quick=True), export=False, workers=1)
    for method in DEMO_METHODS:
        for key in ("test_miou", "test_miou_fg", "trigger_epoch"):
            assert sequential["methods"][method][key] == parallel["methods"][method][key], (method, key)


def test_progress_line_shows_each_workers_last_epoch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = {name: tmp_path / name for name in ("adele", "arm", "baseline-ms")}
    runs["adele"].mkdir()
    (runs["adele"] / "metrics.jsonl").write_text(
        json.dumps({"epoch": 3, "loss": {"total": 0.5}, "val": {"miou": 0.6134}}) + "\n", encoding="utf-8"
    )
    runs["arm"].mkdir()
    (runs["arm"] / "summary.json").write_text("{}", encoding="utf-8")
    progress = demo_module.TrainingProgress(runs, epochs=10, started=0.0)
    progress.report()
    progress.report()  # unchanged: printed once
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    assert lines[0].endswith("adele epoch 3/10 loss 0.500 val mIoU 61.3% | arm done | baseline-ms starting")


def test_the_demo_ends_with_the_review_of_the_adele_run(demo_run: tuple[Path, str]) -> None:
    from noisyseg.data.folder import read_mask, read_split_ids
    from noisyseg.run.checkpoint import find_checkpoint

    out, stdout = demo_run
    summary = json.loads((out / "summary.json").read_text())
    page = Path(summary["review"]["page"])
    assert stdout.strip().splitlines()[-1].endswith(f"page: {page}") and page.is_file()
    run_dir = Path(summary["methods"]["adele"]["run_dir"])
    phantom = Path(json.loads((run_dir / "config.json").read_text())["config"]["data"])
    ids = read_split_ids(phantom, "train")
    rows = (out / "review" / "scores.csv").read_text().splitlines()[1:]
    assert sorted(row.split(",")[1] for row in rows) == sorted(ids)
    # The corrected masks are the labels ADELE trains on now: its label store.
    checkpoint = find_checkpoint(run_dir)
    assert checkpoint is not None
    store = np.load(checkpoint / "labels.npy")
    assert json.loads((checkpoint / "labels.json").read_text())["ids"] == ids  # the store's item order
    for index, slice_id in enumerate(ids):
        assert np.array_equal(read_mask(out / "review" / "corrected" / f"{slice_id}.png"), store[index])


def test_review_of_the_exported_model_over_the_data_folder(
    demo_run: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, _ = demo_run
    summary = json.loads((out / "summary.json").read_text())
    config = json.loads((Path(summary["methods"]["adele"]["run_dir"]) / "config.json").read_text())["config"]
    review = tmp_path / "onnx-review"
    # The file the demo exported (a later test's demo --no-export rewrites summary.json without it).
    args = [
        "review",
        "--model",
        str(out / demo_module.ONNX_FILE),
        "--data",
        config["data"],
        "--labels",
        config["labels"],
        "--top",
        "3",
        "--format",
        "png,html",
        "--out",
        str(review),
        "--quiet",
    ]
    assert main(args) == 0
    assert f"review page: {review / 'index.html'}" in capsys.readouterr().out
    rows = (review / "scores.csv").read_text().splitlines()
    assert len(rows) == 1 + len(list((review / "corrected").iterdir())) and not (review / "cvat").exists()

"""The experiment runner: skipping, resuming, locking between processes, and the results document,
on tiny real runs of the trainer."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from noisyseg.commands.train import train_and_draw as train
from noisyseg.data.label_store import LabelStore
from noisyseg.data.run_data import load_run_data
from noisyseg.experiments.correction_analysis import label_quality, quality_row
from noisyseg.experiments.experiment import (
    NoiseSpec,
    RunSpec,
    Scale,
    data_paths,
    experiment_runs,
    run_experiment_step,
    run_experiments,
    run_lock,
)
from noisyseg.experiments.report import KEEP_MARKER, erased_classes, write_results
from noisyseg.experiments.results import RunResult, load_results, mean_std
from noisyseg.experiments.selection_report import chosen_on_noisy_val, never_loses_lines
from noisyseg.methods.hooks import arm_epoch
from noisyseg.run.checkpoint import find_checkpoint
from noisyseg.run.run_dir import RunDir

TINY = Scale(patients=5, size=32, slices_per_patient=4, epochs=2, batch_size=8, unet={"base_width": 4, "depth": 2})
SPECS = [RunSpec("table1", m, NoiseSpec(seed=0)) for m in ("baseline-ms", "adele", "arm")]


class RecordingTrain:
    """The real trainer, recording each call's (method, resume)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bool]] = []

    def __call__(self, config, resume):
        self.calls.append((config.method, resume))
        return train(config, resume)


@pytest.fixture(scope="module")
def finished_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("experiment")
    trainer = RecordingTrain()
    counts = run_experiments(root, SPECS, TINY, trainer)
    assert counts == {"done": 0, "trained": 3, "busy": 0}
    assert trainer.calls == [("baseline-ms", False), ("adele", False), ("arm", False)]
    return root


def test_finished_runs_are_skipped(finished_root: Path) -> None:
    trainer = RecordingTrain()
    assert run_experiments(finished_root, SPECS, TINY, trainer) == {"done": 3, "trained": 0, "busy": 0}
    assert trainer.calls == []
    run_dir = finished_root / "runs" / SPECS[0].relative_dir
    summary = json.loads((run_dir / "summary.json").read_text())
    assert 0.0 <= summary["test_miou"]["last"] <= 1.0
    timing = json.loads((run_dir / "experiment_timing.json").read_text())
    assert timing["cpu_seconds"] > 0


def test_an_interrupted_run_is_resumed(finished_root: Path) -> None:
    # A run killed after its checkpoint but before its summary: the runner resumes it.
    run_dir = finished_root / "runs" / SPECS[0].relative_dir
    (run_dir / "summary.json").unlink()
    trainer = RecordingTrain()
    assert run_experiment_step(SPECS[0], finished_root, TINY, trainer) == "trained"
    assert trainer.calls == [("baseline-ms", True)]
    assert (run_dir / "summary.json").is_file()


def test_data_is_built_once_per_scale_and_noise(finished_root: Path) -> None:
    phantom, labels = data_paths(finished_root, TINY, NoiseSpec(seed=0))
    assert (phantom / "dataset.json").is_file() and (labels / "noise.json").is_file()
    assert sorted(p.name for p in (finished_root / "data").iterdir()) == sorted([phantom.name, labels.name])


def test_a_run_held_by_a_live_process_is_left_to_it(tmp_path: Path) -> None:
    spec = RunSpec("table1", "arm", NoiseSpec(seed=5))
    lock = tmp_path / "runs" / spec.relative_dir.parent / ".arm.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text(f"{os.getpid()}\n")  # this test process: alive

    def must_not_train(config, resume):
        raise AssertionError("trained a run another process holds")

    assert run_experiment_step(spec, tmp_path, TINY, must_not_train) == "busy"
    assert lock.read_text() == f"{os.getpid()}\n"


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    lock = tmp_path / ".run.lock"
    lock.write_text(finished.stdout)
    with run_lock(lock) as acquired:
        assert acquired
        assert lock.read_text() == f"{os.getpid()}\n"
    assert not lock.exists()


def test_results_document_holds_the_measured_numbers(finished_root: Path, tmp_path: Path) -> None:
    out = write_results(
        finished_root, tmp_path / "docs" / "results.md", TINY, SPECS, [0], "noisyseg experiment --out X"
    )
    text = out.read_text()
    summaries = {
        s.method: json.loads((finished_root / "runs" / s.relative_dir / "summary.json").read_text()) for s in SPECS
    }
    for method, summary in summaries.items():
        row = next(line for line in text.splitlines() if line.startswith(f"| {method} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == "1"  # one seed finished
        assert cells[2] == f"{100 * summary['test_miou']['best_val']:.1f}"
        assert cells[4] == f"{100 * summary['test_miou']['last']:.1f}"
    assert "| adele-nonadaptive | 0 |" in text  # planned elsewhere, not run here: shown as missing
    assert "noisyseg experiment --out X" in text
    assert (tmp_path / "docs" / "results" / "table1_dynamics.png").is_file()
    assert (tmp_path / "docs" / "results" / "table1_adele_curves.png").is_file()
    # The ARM section: the last epoch's statistics of the arm run's own record.
    arm_record = json.loads(
        (finished_root / "runs" / SPECS[2].relative_dir / "metrics.jsonl").read_text().splitlines()[-1]
    )["arm"]
    row = next(line for line in text.splitlines() if line.startswith("| table1 | arm |"))
    assert row.split("|")[7].strip() == f"{arm_epoch(arm_record).wrong_relative_weight:.2f}"
    assert (tmp_path / "docs" / "results" / "arm_table1_arm.png").is_file()


def test_hand_written_sections_survive_regeneration(finished_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "results.md"
    kept = f"{KEEP_MARKER}\n\n## Label review\n\nwritten by hand\n"
    out.write_text("# old generated text\n\n" + kept)
    write_results(finished_root, out, TINY, SPECS, [0], "noisyseg experiment --out X")
    text = out.read_text()
    assert "old generated text" not in text and text.endswith(kept) and "## 1. ADELE Table 1" in text


def test_mean_std_formats_percentages() -> None:
    assert mean_std([0.5, 0.7]) == "60.0 ± 14.1"
    assert mean_std([0.123]) == "12.3"
    assert mean_std([None]) == "-"


def test_diagnostic_means_the_classes_that_have_a_value() -> None:
    """IoU_el per epoch is the mean over the classes that had one; an epoch where none had one
    is NaN, without numpy's empty-slice warning (an error inside this test)."""
    records = [{"iou_el": {"1": 0.5, "2": None, "3": 0.25}}, {"iou_el": {"1": None, "2": None}}]
    result = RunResult(RunSpec("ladder", "plain", NoiseSpec(level=0, seed=0)), {}, records, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        values = result.diagnostic("iou_el")
    assert values[0] == pytest.approx(0.375) and np.isnan(values[1])
    assert result.diagnostic("iou_m") is None  # not recorded (no clean labels)


def test_experiment_plans() -> None:
    # 6 methods, the paper's adele, 3 rivals, baseline-ms and adele in bf16, the forked adele
    assert len(experiment_runs("table1", [0, 1, 2], [0])) == 39
    ladder = experiment_runs("ladder", [7, 8], [0, 3])
    names = [
        "baseline-ms",
        "adele-correction",
        "adele-consistency",
        "adele",
        "adele@adele.consistency_start=always",
        "tloss@optim.optimizer=adam@optim.lr=0.001",
        "baseline-ms@loader.augment.label_elastic=true",
        "adele@loader.augment.label_elastic=true",
        "adele@adele.fork=true",
    ]
    # Seed-major: a first seed over every level finishes before the next seed starts. Level 0
    # (no noise) has its seeds train differently seeded networks; noisy levels train seed 0.
    assert [(s.name, s.noise.level, s.noise.seed) for s in ladder] == [
        (m, level, seed) for seed in (7, 8) for level in (0, 3) for m in names
    ]
    assert [s.noise.training_seed for s in ladder if s.name == "adele"] == [7, 0, 8, 0]
    # Checkpoints are chosen on noisy validation masks unless asked otherwise (the earlier runs' names).
    assert ladder[0].relative_dir == Path("ladder/erode-dilate-L0-s7-noisyval/baseline-ms") and ladder[
        0
    ].noise.splits == ("train", "val")
    assert experiment_runs("ladder", [7], [0], noisy_val=False)[0].relative_dir == Path(
        "ladder/erode-dilate-L0-s7/baseline-ms"
    )
    assert {s.architecture for s in experiment_runs("coarse", [0], [])} == {"deeplabv3plus"}
    study = experiment_runs("armstudy", [0], [])
    assert [s.relative_dir.name for s in study] == [
        "baseline",
        "arm",
        "arm@arm.lr=0.01",
        "arm@arm.warmup_fraction=0.2",
        "arm@arm.momentum=0.0",
        "baseline@seed=1",
    ]


def test_a_variant_run_trains_with_its_overrides(tmp_path: Path) -> None:
    spec = RunSpec("armstudy", "arm", NoiseSpec("coarse"), "unet", ("arm.lr=0.01",))
    trainer = RecordingConfigs()
    run_experiments(tmp_path, [spec], TINY, trainer)
    assert [(c.method, c.arm.lr, c.out) for c in trainer.configs] == [
        ("arm", 0.01, str(tmp_path / "runs" / spec.relative_dir))
    ]
    trainer.configs.clear()
    # The ARM paper's setting trains under its multi-step policy, the study under a constant lr.
    run_experiments(
        tmp_path,
        [
            RunSpec("coarse", "arm", NoiseSpec("coarse"), "unet"),
            RunSpec("armstudy", "baseline", NoiseSpec("coarse"), "unet", ("seed=1",)),
        ],
        TINY,
        trainer,
    )
    assert [(c.method, c.seed, c.optim.schedule) for c in trainer.configs] == [
        ("arm", 0, "multistep"),
        ("baseline", 1, "constant"),
    ]
    trainer.configs.clear()
    run_experiments(
        tmp_path,
        [
            RunSpec("ladder", "adele", NoiseSpec(level=0, seed=2)),
            RunSpec("ladder", "adele", NoiseSpec(level=1, seed=2)),
        ],
        TINY,
        trainer,
    )
    assert [c.seed for c in trainer.configs] == [2, 0]


class RecordingConfigs:
    """Records the configurations the runner would train with (trains nothing)."""

    def __init__(self) -> None:
        self.configs: list = []

    def __call__(self, config, resume):
        self.configs.append(config)
        return None

    with pytest.raises(ValueError, match="unknown experiment 'table9'"):
        experiment_runs("table9", [0], [0])


def fake_result(method: str, seed: int, per_class: list[float | None]) -> RunResult:
    summary = {"test_miou": {"best_val": 0.5, "last": 0.5, "max": 0.5}}
    return RunResult(
        RunSpec("ladder", method, NoiseSpec(level=4, seed=seed)),
        summary,
        [{"test": {"per_class_iou": per_class}}],
        None,
    )


def test_erased_classes_compare_with_the_same_settings_baseline() -> None:
    results = [
        fake_result("baseline-ms", 0, [0.97, 0.30, 0.80, 0.10]),
        fake_result("adele", 0, [0.97, 0.04, 0.82, 0.00]),  # class 1 learned by the baseline, erased here
        fake_result("baseline-ms", 1, [0.97, 0.30, 0.80, 0.60]),
        fake_result("adele", 1, [0.97, 0.25, 0.81, 0.06]),  # nothing below 5
        fake_result("adele-correction", 0, [0.97, 0.0, 0.0, 0.0]),  # not a method the target covers
    ]
    assert erased_classes(results, ["bg", "a", "b", "c"]) == [
        "ladder/erode-dilate-L4-s0-noisyval/adele: a 4.0 (baseline-ms 30.0)"
    ]


def selected_run(method: str, seed: int, val_miou: float | None, test_miou: float) -> RunResult:
    summary = {
        "test_miou": {"best_val": test_miou, "last": test_miou, "max": test_miou},
        "selection": {"rule": "noisy-val", "epoch": 7, "val_miou": val_miou},
        "test_miou_at": {"noisy-val": test_miou},
    }
    return RunResult(RunSpec("ladder", method, NoiseSpec(level=0, seed=seed)), summary, [], None)


def test_the_run_the_noisy_validation_masks_prefer() -> None:
    results = [
        # seed 0: adele scores higher on the noisy masks and on the test set
        selected_run("adele", 0, 0.80, 0.75),
        selected_run("baseline-ms", 0, 0.70, 0.70),
        # seed 1: the masks prefer baseline-ms, which is worse on the test set by 0.02
        selected_run("adele", 1, 0.60, 0.72),
        selected_run("baseline-ms", 1, 0.65, 0.70),
        # seed 2: a summary written before it held the validation score: read from the selected
        # epoch's record (0.55 on the noisy masks against 0.50: adele)
        selected_run("adele", 2, None, 0.90),
        selected_run("baseline-ms", 2, 0.50, 0.50),
        # seed 3: neither the score nor the records: left out
        selected_run("adele", 3, None, 0.60),
        selected_run("baseline-ms", 3, 0.60, 0.60),
    ]
    del results[4].summary["selection"]["val_miou"]
    results[4].records = [{"epoch": 6, "val_noisy": {"miou": 0.9}}, {"epoch": 7, "val_noisy": {"miou": 0.55}}]
    adele = [r for r in results if r.spec.method == "adele"]
    baseline = [r for r in results if r.spec.method == "baseline-ms"]
    delta, adele_chosen = chosen_on_noisy_val(adele, baseline)
    assert delta == pytest.approx([0.05, 0.0, 0.40]) and adele_chosen == 2
    lines = never_loses_lines(results, {"ladder"}, [0])
    # adele itself on all four seeds (+5, +2, +40, 0); the preferred run on the three it can judge (+5, 0, +40)
    assert (
        "- ladder level 0: adele at least baseline-ms - 0.5: 11.8 ± 18.9 points over 4 paired seed(s), **met**" in lines
    )
    assert (
        "  - the one of adele and baseline-ms scoring higher on the noisy validation masks (adele in 2 of 3): "
        "15.0 ± 21.8 points, **met**"
    ) in lines


def write_finished_run(run: Path, summary: dict) -> None:
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1}) + "\n")


def test_a_forked_run_is_read_as_the_run_it_kept(tmp_path: Path) -> None:
    forked = RunSpec("ladder", "adele", NoiseSpec(level=0, seed=0), overrides=("adele.fork=true",))
    baseline = RunSpec("ladder", "baseline-ms", NoiseSpec(level=0, seed=0))
    adele_run = tmp_path / "runs" / forked.relative_dir
    own = selected_run("adele", 0, 0.60, 0.72).summary
    fork = {"epoch": 12, "branch": "baseline-ms", "kept": "baseline-ms", "val_miou": {}, "test_miou": {}}
    write_finished_run(adele_run, {**own, "fork": fork})
    write_finished_run(adele_run / "branch", selected_run("baseline-ms", 0, 0.65, 0.70).summary)
    write_finished_run(tmp_path / "runs" / baseline.relative_dir, selected_run("baseline-ms", 0, 0.65, 0.69).summary)
    results = load_results(tmp_path, [forked, baseline])
    assert results[0].path == adele_run / "branch" and results[0].summary["test_miou_at"]["noisy-val"] == 0.70
    lines = never_loses_lines(results, {"ladder"}, [0])
    assert (
        "  - `adele@adele.fork=true`, the run its fork kept: 1.0 points over 1 paired seed(s), **met** "
        "(1 forked; 0 decided by the bootstrap, the others by the higher score)"
    ) in lines
    # A fork that kept ADELE reads ADELE's own run; a summary with the bootstrap's share counts as its.
    bootstrap_fork = {**fork, "kept": "adele", "p_branch_better": 0.5}
    (adele_run / "summary.json").write_text(json.dumps({**own, "fork": bootstrap_fork}))
    results = load_results(tmp_path, [forked, baseline])
    assert results[0].summary["test_miou_at"]["noisy-val"] == 0.72 and results[0].fork == bootstrap_fork
    assert (
        "(1 forked; 1 decided by the bootstrap, the others by the higher score)"
        in never_loses_lines(results, {"ladder"}, [0])[-1]
    )


def test_arm_statistics_on_a_hand_made_record() -> None:
    # Two bins: 30 right + 10 wrong pixels at v^ = -0.5 with weight 0.2, 60 right at 0.5 with 0.8.
    record = {"v": [-0.5, 0.5], "w": [0.2, 0.8], "pixels": [30, 60], "pixels_wrong": [10, 0]}
    epoch = arm_epoch(record)
    assert epoch.wrong_pixel_share == pytest.approx(0.1)
    assert epoch.wrong_weight_share == pytest.approx(0.2 * 10 / (0.2 * 40 + 0.8 * 60))
    assert epoch.wrong_relative_weight == pytest.approx((2 / 56) / 0.1)
    # (sum w n)^2 / (sum w^2 n * sum n) = 56^2 / ((0.04 * 40 + 0.64 * 60) * 100)
    assert epoch.effective_fraction == pytest.approx(56**2 / (40.0 * 100))
    uniform = arm_epoch({**record, "w": [0.5, 0.5]})
    assert uniform.wrong_relative_weight == pytest.approx(1.0) and uniform.effective_fraction == pytest.approx(1.0)


def test_correction_table_scores_the_label_store_against_the_clean_masks(finished_root: Path, tmp_path: Path) -> None:
    run = tmp_path / "adele"
    shutil.copytree(finished_root / "runs" / SPECS[1].relative_dir, run)
    config = RunDir(run).read_config()
    data = load_run_data(config)
    checkpoint = find_checkpoint(run)
    store = LabelStore.load(checkpoint, data.train_labels, data.train_ids)
    store.update(np.array([0]), [np.full_like(store.maps[0], 2)])  # a correction: the first slice all heart
    store.save(checkpoint)

    # The reference: the mask files themselves, read with Pillow, and IoU by hand.
    def masks(folder: str) -> np.ndarray:
        return np.stack([np.array(Image.open(Path(folder) / "masks" / f"{i}.png")) for i in data.train_ids])

    clean, given = masks(config.data), masks(config.labels)
    corrected = given.copy()
    corrected[0] = 2

    def iou(labels: np.ndarray, c: int) -> float:
        return np.count_nonzero((labels == c) & (clean == c)) / np.count_nonzero((labels == c) | (clean == c))

    quality = label_quality(run)
    assert quality is not None
    assert quality["given"] == pytest.approx([iou(given, c) for c in range(1, 5)])
    assert quality["corrected"] == pytest.approx([iou(corrected, c) for c in range(1, 5)])
    assert quality["corrected"][1] < quality["given"][1]  # the heart's labels got worse
    row = quality_row("table1 ref, adele", [quality], [{"2": 7}])
    assert (
        row.split("|")[4].strip() == f"{100 * quality['given'][1]:.0f} → {100 * quality['corrected'][1]:.0f} (1/1: 7)"
    )


def test_methods_option_picks_a_variant_by_its_run_name(tmp_path: Path) -> None:
    from noisyseg.cli import main

    args = [
        "experiment",
        "--out",
        str(tmp_path),
        "--experiments",
        "armstudy",
        "--seeds",
        "0",
        "--epochs",
        "1",
        "--patients",
        "5",
        "--size",
        "32",
    ]
    assert main([*args, "--methods", "baseline@seed=1", "--results", str(tmp_path / "results.md")]) == 0
    trained = sorted(p.parent.name for p in (tmp_path / "runs" / "armstudy").glob("*/*/summary.json"))
    assert trained == ["baseline@seed=1"]
    assert RunDir(tmp_path / "runs" / "armstudy" / "coarse-ref-s0-noisyval" / "baseline@seed=1").read_config().seed == 1


def test_runs_select_on_noisy_validation_masks_and_the_document_shows_what_a_user_gets(
    finished_root: Path, tmp_path: Path
) -> None:
    labels = data_paths(finished_root, TINY, NoiseSpec(seed=0))[1]
    noise = json.loads((labels / "noise.json").read_text())
    assert noise["splits"] == ["train", "val"] and "annotation_miou" in noise["val"]
    out = write_results(finished_root, tmp_path / "results.md", TINY, SPECS, [0], "noisyseg experiment --out X")
    lines = out.read_text().splitlines()
    assert "## What a user gets: the checkpoint chosen without clean masks" in lines
    for spec in SPECS:
        summary = json.loads((finished_root / "runs" / spec.relative_dir / "summary.json").read_text())
        assert summary["selection"]["rule"] == "noisy-val"
        row = next(line for line in lines if line.startswith(f"| Table 1 | {spec.name} | 1 |"))
        cells = [c.strip() for c in row.strip("|").split("|")][3:]
        rules = ("last", "noisy-val", "label-free", "label-free-curves", "clean-val")
        assert cells == [f"{100 * summary['test_miou_at'][rule]:.1f}" for rule in rules]
    # The selection targets of baseline-ms and adele (arm is not judged), each rule's gaps.
    baseline = json.loads((finished_root / "runs" / SPECS[0].relative_dir / "summary.json").read_text())["test_miou_at"]
    row = next(line for line in lines if line.startswith("| Table 1 | baseline-ms | 1 |") and "met" in line)
    noisy_cell = row.strip("|").split("|")[3].strip()
    assert noisy_cell.startswith(
        f"{100 * (baseline['noisy-val'] - baseline['clean-val']):+.1f} "
        f"/ {100 * (baseline['noisy-val'] - baseline['last']):+.1f}"
    )
    assert not any(line.startswith("| Table 1 | arm | 1 |") and "met" in line for line in lines)
    assert any(line.startswith("- Table 1: adele at least 5 points above baseline-ms") for line in lines)


def test_the_rivals_train_on_the_ladder(tmp_path: Path) -> None:
    from noisyseg.experiments.experiment import RIVALS

    specs = [RunSpec("ladder", m, NoiseSpec(level=2, seed=0), overrides=v) for m, v in RIVALS]
    trainer = RecordingTrain()
    assert run_experiments(tmp_path, specs, TINY, trainer) == {"done": 0, "trained": 3, "busy": 0}
    configs = {spec.name: RunDir(tmp_path / "runs" / spec.relative_dir).read_config() for spec in specs}
    tloss = configs["tloss@optim.optimizer=adam@optim.lr=0.001"]
    assert tloss.method == "tloss" and not tloss.loader.augment.label_elastic
    assert (tloss.optim.optimizer, tloss.optim.lr) == ("adam", 0.001)
    for name in ("baseline-ms@loader.augment.label_elastic=true", "adele@loader.augment.label_elastic=true"):
        assert configs[name].loader.augment.label_elastic and configs[name].correction_timing() == "epoch"
    records = [
        json.loads(line)
        for line in (tmp_path / "runs" / specs[0].relative_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert "tloss_nu" in records[-1]["loss"] and "val_noisy" in records[-1]
    text = write_results(tmp_path, tmp_path / "results.md", TINY, specs, [2], "noisyseg experiment").read_text()
    for spec in specs:
        assert f"| level 2 | {spec.name} | 1 |" in text

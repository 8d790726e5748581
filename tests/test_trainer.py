"""The trainer end to end on a tiny data folder: methods, resume, label store, errors, commands."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from scipy import ndimage

from noisyseg.cli import main
from noisyseg.config import AdeleConfig, TrainConfig, build_config
from noisyseg.data.run_data import RunData, load_run_data, load_split
from noisyseg.evaluation.metrics import (
    early_learning_memorization_iou,
    iou_per_class,
)
from noisyseg.kernels.reference import ARM
from noisyseg.method_table import METHOD_SPECS, METHODS
from noisyseg.methods import adele
from noisyseg.models.model_file import load_model
from noisyseg.run.checkpoint import find_checkpoint, read_checkpoint, write_checkpoint
from noisyseg.run.run_dir import CHECKPOINT_DIR, RunDir, resolve_model_file
from noisyseg.training.counters import EpochCounters
from noisyseg.training.loop import Trainer
from noisyseg.training.optim import lr_factor
from noisyseg.training.trainer import make_trainer, train

SIZE = 32
CLASSES = ["background", "a", "b", "c", "d"]
TINY_MODEL = ["model.kwargs.base_width=4", "model.kwargs.depth=2"]
# The reference loss backend: the fused CPU backend (numba) costs a one-time JIT compilation of
# about a minute per machine, which these trainer tests have no budget for.
REFERENCE_LOSS = "torch"


def synthetic_slice(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Four discs (classes 1-4) of distinct brightness on a noisy background."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    image = rng.normal(0.0, 10.0, size=(SIZE, SIZE)).astype(np.float32)
    for class_id, (cy, cx) in enumerate([(8, 8), (8, 24), (24, 8), (24, 24)], start=1):
        radius = rng.uniform(3.5, 6.5)
        disc = (yy - cy - rng.integers(-2, 3)) ** 2 + (xx - cx - rng.integers(-2, 3)) ** 2 <= radius**2
        mask[disc] = class_id
        image[disc] += 40.0 * class_id
    return image, mask


def noisy_version(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Every organ eroded or dilated by two pixels (earlier classes win on overlap)."""
    dilate = rng.random() < 0.5
    noisy = np.zeros_like(mask)
    for class_id in range(1, len(CLASSES)):
        organ = mask == class_id
        changed = (
            ndimage.binary_dilation(organ, iterations=2) if dilate else ndimage.binary_erosion(organ, iterations=2)
        )
        noisy[changed & (noisy == 0)] = class_id
    return noisy


def write_png(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask, mode="L").save(path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data folder with clean masks, noisy-label folder for its train split), written by hand
    in the folder format of docs/architecture.md."""
    root = tmp_path_factory.mktemp("tiny")
    data, labels = root / "data", root / "noisy"
    rng = np.random.default_rng(0)
    patients = {"train": ("P000", 8), "val": ("P001", 3), "test": ("P002", 3)}
    (data / "images").mkdir(parents=True)
    (data / "splits").mkdir()
    for split, (patient, count) in patients.items():
        ids = [f"{patient}_{z:03d}" for z in range(count)]
        for slice_id in ids:
            image, mask = synthetic_slice(rng)
            np.save(data / "images" / f"{slice_id}.npy", image)
            write_png(data / "masks" / f"{slice_id}.png", mask)
            if split == "train":
                write_png(labels / "masks" / f"{slice_id}.png", noisy_version(mask, rng))
        (data / "splits" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    info = {
        "name": "tiny",
        "classes": CLASSES,
        "ignore_index": 255,
        "modality": "CT",
        "image_format": "npy",
        "patients": {s: [p] for s, (p, _) in patients.items()},
    }
    (data / "dataset.json").write_text(json.dumps(info))
    return data, labels


def tiny_config(folders: tuple[Path, Path], out: Path, *overrides: str) -> TrainConfig:
    data, labels = folders
    return build_config(
        None,
        [
            f"data={data}",
            f"labels={labels}",
            f"out={out}",
            "epochs=2",
            "batch_size=3",
            "quiet=true",
            "optim.lr=0.01",
            "optim.momentum=0.9",
            f"loss.backend={REFERENCE_LOSS}",
            *TINY_MODEL,
            *overrides,
        ],
    )


def tree_digest(*folders: Path) -> dict[str, str]:
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest()
        for folder in folders
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def read_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# Forces ADELE's trigger at epoch 3 (the first epoch with 3 points: r = 0 and no minimum rise
# fire on any fitted curve whose slope is not rising) and makes corrections likely (low tau).
EARLY_CORRECTION = ["adele.r=0.0", "adele.min_rise=0.0", "adele.tau=0.3", "arm.warmup_fraction=0.1"]


@pytest.fixture(scope="module")
def straight_run(folders: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """adele+arm, 5 epochs, uninterrupted, with label correction from epoch 4 on."""
    out = tmp_path_factory.mktemp("straight") / "run"
    train(tiny_config(folders, out, "method=adele+arm", "epochs=5", *EARLY_CORRECTION))
    return out


def test_outputs_follow_the_contract(straight_run: Path) -> None:
    records = read_records(straight_run)
    assert [r["epoch"] for r in records] == [1, 2, 3, 4, 5]
    last = records[-1]
    assert {
        "epoch",
        "iteration",
        "method",
        "lr",
        "loss",
        "train_iou",
        "val",
        "test",
        "trigger",
        "labels_changed_fraction",
        "iou_el",
        "iou_m",
    } <= set(last)
    assert last["iteration"] == 5 * 3  # 8 slices in batches of 3
    assert set(last["train_iou"]) == set(last["iou_el"]) == set(last["iou_m"]) == {"1", "2", "3", "4"}
    assert {"total", "ce", "consistency"} <= set(last["loss"])
    assert len(last["val"]["per_class_iou"]) == len(CLASSES)
    assert set(last["trigger"]["1"]) == {"triggered", "epoch", "fit", "guard_epoch"}
    summary = json.loads((straight_run / "summary.json").read_text())
    for key in ("test_miou", "test_miou_fg"):
        assert set(summary[key]) == {"best_val", "last", "max"}
        assert all(0.0 <= v <= 1.0 for v in summary[key].values())
        assert summary[key]["last"] == records[-1]["test"][key.replace("test_", "")]
        assert summary[key]["max"] == max(r["test"][key.replace("test_", "")] for r in records)
    best_epoch = max(records, key=lambda r: r["val"]["miou"])["epoch"]
    assert summary["test_miou"]["best_val"] == records[best_epoch - 1]["test"]["miou"]
    assert summary["trigger_epoch"] == {c: t["epoch"] for c, t in last["trigger"].items()}
    assert 3 in summary["trigger_epoch"].values()  # the first epoch with 3 points to fit
    model, info = load_model(resolve_model_file(straight_run))
    assert info.method == "adele+arm" and info.extra["epoch"] == best_epoch


def test_label_correction_changes_the_store_but_never_the_files(
    folders: tuple[Path, Path], straight_run: Path, tmp_path: Path
) -> None:
    records = read_records(straight_run)
    assert records[2]["labels_changed_fraction"] == 0.0  # triggered at 3, iteration timing corrects from 4
    assert records[4]["labels_changed_fraction"] > 0.0
    store = np.load(straight_run / "checkpoint" / "labels.npy")
    original = load_split(*folders[:1], "train", labels_root=folders[1]).masks
    assert np.count_nonzero(store != original) / store.size == pytest.approx(records[4]["labels_changed_fraction"])
    # A second run on the same folders: every file in them is byte-identical afterwards.
    before = tree_digest(*folders)
    train(tiny_config(folders, tmp_path / "again", "method=adele", "epochs=4", *EARLY_CORRECTION))
    assert tree_digest(*folders) == before


def test_the_review_of_an_adele_run_corrects_with_its_label_store(
    folders: tuple[Path, Path], straight_run: Path, tmp_path: Path
) -> None:
    from noisyseg.data.folder import read_mask
    from noisyseg.review.runner import ReviewOptions, run_review
    from noisyseg.review.sources import RunSource

    source = RunSource(straight_run, "train", "cpu", tmp_path)
    assert source.correction == "label store"
    summary = run_review(source, tmp_path / "review", ReviewOptions(top=2, formats=["png"]))
    store = np.load(straight_run / "checkpoint" / "labels.npy")
    original = load_split(folders[0], "train", labels_root=folders[1])
    for index, slice_id in enumerate(original.ids):
        assert np.array_equal(read_mask(tmp_path / "review" / "corrected" / f"{slice_id}.png"), store[index])
    moved = np.array(summary["transitions"])
    changed = np.bincount(
        original.masks.astype(np.int64).ravel() * len(CLASSES) + store.ravel(), minlength=len(CLASSES) ** 2
    ).reshape(moved.shape)
    assert (
        np.array_equal(moved, changed)
        and moved.sum() - np.trace(moved) == np.count_nonzero(store != original.masks) > 0
    )


def train_until_crash(config: TrainConfig, epoch: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Train `config` and stop it as a crash would, right after the checkpoint of `epoch`."""
    save = Trainer.save_checkpoint

    def crash_after(self: Trainer) -> None:
        save(self)
        if self.epoch == epoch:
            raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(Trainer, "save_checkpoint", crash_after)
    with pytest.raises(KeyboardInterrupt):
        train(config)
    monkeypatch.setattr(Trainer, "save_checkpoint", save)


def test_interrupted_and_resumed_run_ends_with_the_same_state(
    folders: tuple[Path, Path], straight_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    config = tiny_config(folders, out, "method=adele+arm", "epochs=5", *EARLY_CORRECTION)
    train_until_crash(config, 4, monkeypatch)
    interrupted = json.loads((out / "checkpoint" / "state.json").read_text())
    assert interrupted["epoch"] == 4
    assert interrupted["history"][-1]["labels_changed_fraction"] > 0.0  # the store is part of what resumes
    train(config, resume=True)
    straight = load_file(str(straight_run / "checkpoint" / "state.safetensors"))
    resumed = load_file(str(out / "checkpoint" / "state.safetensors"))
    assert straight.keys() == resumed.keys()
    assert any(k.startswith("arm.") for k in straight) and any(k.startswith("opt.arm.") for k in straight)
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    assert np.array_equal(
        np.load(straight_run / "checkpoint" / "labels.npy"), np.load(out / "checkpoint" / "labels.npy")
    )
    assert (straight_run / "metrics.jsonl").read_text() == (out / "metrics.jsonl").read_text()


@pytest.mark.parametrize("method", [m for m in METHODS if m != "adele+arm"])
def test_every_method_trains(folders: tuple[Path, Path], tmp_path: Path, method: str) -> None:
    summary = train(tiny_config(folders, tmp_path / method, f"method={method}", "epochs=1", "loss.ohem_min_kept=100"))
    record = read_records(tmp_path / method)[0]
    assert np.isfinite(record["loss"]["total"])
    assert 0.0 <= summary["test_miou"]["last"] <= 1.0
    # By default (adele.consistency_start=first_trigger) a method that corrects labels adds the
    # term only after a trigger, which epoch 1 never has.
    spec = METHOD_SPECS[method]
    assert ("consistency" in record["loss"]) == (spec.consistency and not spec.correction)
    assert ("arm" in record) == METHOD_SPECS[method].arm


def test_arm_runs_record_the_weight_function_and_its_inputs(folders: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "arm"
    train(tiny_config(folders, out, "method=arm", "epochs=1"))
    record = read_records(out)[0]["arm"]
    # Every valid training pixel is counted once; wrong = the noisy label differs from the clean mask.
    data, labels = folders
    ids = (data / "splits" / "train.txt").read_text().split()
    noisy = np.stack([np.asarray(Image.open(labels / "masks" / f"{i}.png")) for i in ids])
    clean = np.stack([np.asarray(Image.open(data / "masks" / f"{i}.png")) for i in ids])
    assert sum(record["pixels"]) + sum(record["pixels_wrong"]) == noisy.size
    assert sum(record["pixels_wrong"]) == int((noisy != clean).sum())
    # w(v^) is the trained ARM's output at the bin centres.
    tensors, _ = read_checkpoint(find_checkpoint(out))
    arm = checkpoint_arm(tensors)
    expected = arm(torch.tensor(record["v"])).tolist()
    assert record["w"] == pytest.approx(expected, abs=1e-6)


def checkpoint_arm(tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The reference ARM with the checkpoint's `arm.*` parameters."""
    arm = ARM()
    arm.load_state_dict({k.removeprefix("arm."): v for k, v in tensors.items() if k.startswith("arm.")})
    return arm


def test_deeplab_trains(folders: tuple[Path, Path], tmp_path: Path) -> None:
    """The coarse-label setting's network (regression: channels_last crashed its backward)."""
    config = tiny_config(
        folders,
        tmp_path / "deeplab",
        "method=gce+arm",
        "epochs=1",
        "model.architecture=deeplabv3plus",
        "model.kwargs={base_width: 4}",
    )
    summary = train(config)
    assert np.isfinite(read_records(tmp_path / "deeplab")[0]["loss"]["total"])
    assert 0.0 <= summary["test_miou"]["last"] <= 1.0


def test_arm_warm_up_trains_the_network_on_plain_ce_and_arm_alone(folders: tuple[Path, Path], tmp_path: Path) -> None:
    config = tiny_config(folders, tmp_path / "arm", "method=arm", "epochs=1")
    trainer = make_trainer(config, load_run_data(config))
    images = trainer.data.train_images[:2]
    target = torch.from_numpy(trainer.data.train_labels.stacked()[:2]).long()
    assert (
        trainer.arm.warming_up(trainer.iteration, trainer.total_iterations)
        and trainer.arm.optimizer.defaults["maximize"]
    )

    def gradients(loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        trainer.model.zero_grad()
        trainer.arm.arm.zero_grad()
        loss.backward()
        net = torch.cat([p.grad.flatten() for p in trainer.model.parameters()])
        arm = torch.cat(
            [torch.zeros(p.numel()) if p.grad is None else p.grad.flatten() for p in trainer.arm.arm.parameters()]
        )
        return net, arm

    loss, _ = trainer.loss_terms([trainer.model(images)], target)
    net_warm, arm_warm = gradients(loss)
    net_ce, _ = gradients(F.cross_entropy(trainer.model(images), target))
    assert torch.allclose(net_warm, net_ce, atol=1e-6), "during warm-up the network sees uniform weights"
    assert arm_warm.abs().sum() > 0, "ARM learns during warm-up"
    trainer.iteration = trainer.total_iterations  # past the warm-up: jointly
    loss, _ = trainer.loss_terms([trainer.model(images)], target)
    net_joint, arm_joint = gradients(loss)
    assert not torch.allclose(net_joint, net_ce, atol=1e-6) and arm_joint.abs().sum() > 0


def test_adam_option_builds_adam_for_network_and_ascending_arm(folders: tuple[Path, Path], tmp_path: Path) -> None:
    config = tiny_config(
        folders,
        tmp_path / "adam",
        "method=arm",
        "epochs=1",
        "optim.optimizer=adam",
        "optim.lr=0.001",
        "optim.momentum=0.8",
    )
    trainer = make_trainer(config, load_run_data(config))
    assert isinstance(trainer.optimizer, torch.optim.Adam) and trainer.optimizer.defaults["betas"] == (0.8, 0.999)
    assert isinstance(trainer.arm.optimizer, torch.optim.Adam) and trainer.arm.optimizer.defaults["maximize"]
    summary = train(config)
    assert 0.0 <= summary["test_miou"]["last"] <= 1.0
    with pytest.raises(ValueError, match="optim.optimizer"):
        tiny_config(folders, tmp_path / "bad", "optim.optimizer=rmsprop").validate()


def test_arm_learning_rate_option_follows_the_networks_schedule(folders: tuple[Path, Path], tmp_path: Path) -> None:
    config = tiny_config(
        folders, tmp_path / "armlr", "method=arm", "optim.lr=0.2", "arm.lr=0.01", "optim.schedule=poly", "epochs=4"
    )
    trainer = make_trainer(config, load_run_data(config))
    trainer.iteration = trainer.total_iterations // 2
    factor = 0.5**config.optim.poly_power
    assert trainer.set_learning_rate() == pytest.approx(0.2 * factor)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.2 * factor)
    assert trainer.arm.optimizer is not None and trainer.arm.optimizer.param_groups[0]["lr"] == pytest.approx(
        0.01 * factor
    )


def test_multistep_schedule_is_the_arm_papers() -> None:
    # ARM paper, section 4.1: from lr/100 up to lr over the first 0.05T, lr/10 from 0.6T, lr/100 from 0.9T.
    total = 1000
    assert lr_factor("multistep", 0, total) == pytest.approx(0.01)
    assert lr_factor("multistep", 25, total) == pytest.approx(0.01 + 0.99 * 0.5)
    assert [lr_factor("multistep", i, total) for i in (50, 599, 600, 899, 900, 999)] == pytest.approx(
        [1.0, 1.0, 0.1, 0.1, 0.01, 0.01]
    )
    assert lr_factor("constant", 500, total) == 1.0


def saturating(a: float, b: float, epochs: int) -> list[float]:
    return [a * (1 - np.exp(-b * t)) for t in range(1, epochs + 1)]


@pytest.mark.parametrize("adaptive", [True, False], ids=["adaptive", "nonadaptive"])
def test_trigger_state_fires_per_class_or_all_at_once(adaptive: bool) -> None:
    # Class 1 saturates fast (trigger at 1 + ln10/1.0 -> 4), class 2 slowly (1 + ln10/0.25 -> 11),
    # classes 3 and 4 in between (0.5 -> 6). The mean of the four curves decides for all classes.
    rates = {1: 1.0, 2: 0.25, 3: 0.5, 4: 0.5}
    curves = {c: saturating(0.8, b, 15) for c, b in rates.items()}
    state = adele.TriggerState(num_classes=5)
    for epoch in range(1, 16):
        state.update(
            epoch,
            np.array([0.9, *(curves[c][epoch - 1] for c in range(1, 5))]),
            AdeleConfig(r=0.9, min_fit_points=3, min_rise=0.05),
            detect=True,
            adaptive=adaptive,
        )
    if adaptive:
        assert state.trigger_epoch == {1: 4, 2: 11, 3: 6, 4: 6}
    else:
        mean_curve = np.mean([curves[c] for c in range(1, 5)], axis=0).tolist()
        expected = next(e for e in range(1, 16) if adele.correction_started(mean_curve[:e]))
        assert set(state.trigger_epoch.values()) == {expected}
    assert state.fits[1] is not None and state.fits[1]["b"] == pytest.approx(1.0, rel=1e-3)


def test_correction_schedule_follows_timing_and_frequency(folders: tuple[Path, Path], tmp_path: Path) -> None:
    def due_epochs(timing: str, every: int) -> list[int]:
        config = tiny_config(
            folders,
            tmp_path / "schedule",
            "method=adele",
            f"adele.correction_timing={timing}",
            f"adele.correction_every={every}",
        )
        trainer = make_trainer(config, load_run_data(config))
        trainer.labels.triggers.trigger_epoch.update({1: 3, 2: 5})
        return [e for e in range(1, 25) if trainer.labels.correction_classes(e) is not None]

    assert due_epochs("iteration", 1) == list(range(4, 25))  # from the epoch after the trigger
    assert due_epochs("epoch", 1) == list(range(3, 25))  # at the end of the trigger epoch itself
    assert due_epochs("iteration", 10) == [4, 6, 10, 20]  # starts and multiples of 10 (reference code)
    assert due_epochs("epoch", 10) == [3, 5, 10, 20]


def test_epoch_timing_corrects_at_the_end_of_the_trigger_epoch(folders: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "epoch_timing"
    train(tiny_config(folders, out, "method=adele", "epochs=3", "adele.correction_timing=epoch", *EARLY_CORRECTION))
    records = read_records(out)
    assert records[2]["corrected_pixels"] > 0 and records[2]["labels_changed_fraction"] > 0.0
    assert records[1]["labels_changed_fraction"] == 0.0


def test_consistency_from_the_first_trigger_leaves_the_term_out_until_then(
    folders: tuple[Path, Path], tmp_path: Path
) -> None:
    # EARLY_CORRECTION triggers at epoch 3: the term is left out in epochs 1-3 and added from 4
    # on; a low rho keeps the tiny network's images in the term.
    options = [*EARLY_CORRECTION, "adele.rho=0.2"]
    late = tmp_path / "late"
    train(tiny_config(folders, late, "method=adele", "epochs=4", "adele.consistency_start=first_trigger", *options))
    records = read_records(late)
    assert [r["trigger"]["1"]["epoch"] for r in records] == [None, None, 3, 3]
    assert ["consistency" in r["loss"] for r in records] == [False, False, False, True]
    assert records[3]["loss"]["consistency"] > 0.0
    # Until the trigger, adele without the term trains exactly as baseline-ms does; with the term
    # (the paper's `always`) it does not.
    runs = {name: tmp_path / name for name in ("baseline-ms", "first_trigger", "always")}
    train(tiny_config(folders, runs["baseline-ms"], "method=baseline-ms", *options))
    for start in ("first_trigger", "always"):
        train(tiny_config(folders, runs[start], "method=adele", f"adele.consistency_start={start}", *options))
    weights = {name: load_file(str(out / "model.safetensors")) for name, out in runs.items()}
    base = weights["baseline-ms"]
    assert all(torch.equal(base[k], weights["first_trigger"][k]) for k in base)
    assert not all(torch.equal(base[k], weights["always"][k]) for k in base)
    # The consistency-only ablation corrects nothing, so it never triggers: its term is on at once.
    ablation = tmp_path / "ablation"
    start = "adele.consistency_start=first_trigger"
    train(tiny_config(folders, ablation, "method=adele-consistency", "epochs=1", start, *options))
    assert read_records(ablation)[0]["loss"]["consistency"] > 0.0


def collapse_onto_background(model: torch.nn.Module, num_classes: int) -> None:
    """The failure of ladder level 4: the network's prediction of every organ collapses to a
    confident background (the classifier answers background at 0.98 everywhere)."""
    head = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.out_channels == num_classes][-1]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([5.0] + [0.0] * (num_classes - 1)))


@pytest.mark.parametrize("guard", [True, False])
def test_guard_stops_and_undoes_a_correction_that_erases_a_class(
    folders: tuple[Path, Path], tmp_path: Path, guard: bool
) -> None:
    config = tiny_config(
        folders,
        tmp_path / "guard",
        "method=adele",
        "epochs=1",
        "optim.lr=1e-6",
        "adele.correction_timing=epoch",
        f"adele.guard={str(guard).lower()}",
    )
    trainer = make_trainer(config, load_run_data(config))
    collapse_onto_background(trainer.model, trainer.data.num_classes)
    trainer.labels.triggers.trigger_epoch[2] = 1  # class 2 triggered, then its prediction collapsed
    annotated = trainer.data.train_labels.class_counts(trainer.data.num_classes)
    record = trainer.finish_epoch(trainer.run_epoch())
    areas = trainer.labels.store.maps.class_counts(trainer.data.num_classes)
    assert areas[1] == annotated[1] and areas[3] == annotated[3]  # untriggered classes untouched
    if guard:
        assert areas[2] == annotated[2] and int(trainer.labels.corrections.labels.eq(2).sum()) == annotated[2]
        assert record["trigger"]["2"]["guard_epoch"] == 1
        assert trainer.labels.correction_classes(2) is None  # stopped for good
    else:
        assert areas[2] == 0 and record["trigger"]["2"]["guard_epoch"] is None


def test_noise_diagnostics_of_the_training_pass_on_a_hand_made_case(folders: tuple[Path, Path], tmp_path: Path) -> None:
    config = tiny_config(folders, tmp_path / "diag", "method=baseline")
    data = load_run_data(config)
    # Two 1x4 slices; only slice 1 is looked at. clean = [1,1,0,0], noisy = [1,0,1,0]:
    # wrong pixels are 1 (clean 1, noisy 0) and 2 (clean 0, noisy 1).
    clean = np.array([[[0, 0, 0, 0]], [[1, 1, 0, 0]]], dtype=np.uint8)
    noisy = np.array([[[0, 0, 0, 0]], [[1, 0, 1, 0]]], dtype=np.uint8)
    tiny = RunData(data.info, torch.zeros(2, 1, 1, 4), noisy, ["x", "y"], clean, data.val, data.test)
    trainer = make_trainer(config, tiny)
    counters = EpochCounters.zeros(5, 255, torch.device("cpu"), noise=True)
    prediction = torch.tensor([[[1, 1, 1, 0]]])  # predicts class 1 on both wrong pixels
    logits = F.one_hot(prediction, 5).permute(0, 3, 1, 2).float()
    trainer.count_training_pass(trainer.batches.next(torch.tensor([1])), logits, counters)
    iou_el, iou_m = early_learning_memorization_iou(counters.noise.counts())
    # vs clean on wrong pixels: pixel 1 pred 1 = clean 1 (hit), pixel 2 pred 1 vs clean 0:
    # class 1: intersection 1, union |pred 1| 2 + |clean 1| 1 - 1 = 2 -> 0.5.
    assert iou_el[1] == pytest.approx(0.5)
    # vs noisy on wrong pixels: pixel 1 pred 1 vs noisy 0, pixel 2 pred 1 = noisy 1:
    # class 1: intersection 1, union 2 + 1 - 1 = 2 -> 0.5; class 0: |noisy 0| 1, |pred 0| 0 -> 0.
    assert iou_m[1] == pytest.approx(0.5) and iou_m[0] == 0.0
    # Training IoU against the labels trained on (noisy), whole slice: class 1 pred {0,1,2}, label {0,2}.
    assert iou_per_class(counters.train_meter.matrix)[1] == pytest.approx(2 / 3)


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(
    folders: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "nan"
    terms = Trainer.loss_terms

    def nan_in_epoch_2(self: Trainer, logits: list[torch.Tensor], target: torch.Tensor):  # type: ignore[no-untyped-def]
        loss, logged = terms(self, logits, target)
        return (loss * float("nan"), logged) if self.epoch == 1 else (loss, logged)

    monkeypatch.setattr(Trainer, "loss_terms", nan_in_epoch_2)
    with pytest.raises(RuntimeError, match=r"non-finite loss .* epoch 2, iteration 4"):
        train(tiny_config(folders, out, "method=baseline", "epochs=3"))
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["epoch"] == 1 and len(read_records(out)) == 1
    model, _ = load_model(resolve_model_file(out))
    assert all(torch.isfinite(p).all() for p in model.state_dict().values() if p.is_floating_point())


# ----------------------------------------------------------------------------- commands


def cli_train(folders: tuple[Path, Path], out: Path, *extra: str) -> int:
    data, labels = folders
    return main(
        [
            "train",
            "--data",
            str(data),
            "--labels",
            str(labels),
            "--out",
            str(out),
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--quiet",
            "--loss-backend",
            REFERENCE_LOSS,
            *[f"--set={o}" for o in TINY_MODEL],
            *extra,
        ]
    )


def test_cli_train_resume_and_refusals(
    folders: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    config_file = tmp_path / "run.yaml"
    config_file.write_text("method: baseline-ms\nepochs: 5\nadele: {scales: [1.0, 0.5]}\n", encoding="utf-8")
    assert cli_train(folders, out, "--config", str(config_file)) == 0  # --epochs 1 beats the file
    assert json.loads(capsys.readouterr().out)["epochs"] == 1
    stored = RunDir(out).read_config()
    assert (stored.method, stored.adele.scales, stored.model.kwargs["base_width"]) == ("baseline-ms", [1.0, 0.5], 4)
    # Resume with more epochs continues from the checkpoint.
    assert main(["train", "--resume", str(out), "--epochs", "2", "--quiet"]) == 0
    assert [r["epoch"] for r in read_records(out)] == [1, 2]
    before = tree_digest(out)
    # Another configuration in the same directory: refused, nothing overwritten.
    assert cli_train(folders, out, "--method", "adele") == 2
    assert "another configuration (differs in adele.scales, method)" in capsys.readouterr().err
    assert main(["train", "--resume", str(out), "--method", "arm"]) == 2
    assert "differs in method" in capsys.readouterr().err
    # The same configuration again without --resume: refused too.
    assert cli_train(folders, out, "--config", str(config_file)) == 2
    assert "--resume" in capsys.readouterr().err
    assert tree_digest(out) == before


def test_a_run_stored_before_a_field_existed_resumes_as_it_ran(
    folders: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """config.json and the checkpoint of an ADELE run written before `adele.guard`,
    `adele.consistency_start` and `adele.fork` existed: it ran without the guard, with the
    consistency term from the first step and without a fork, and resumes that way, not with
    today's defaults."""
    out = tmp_path / "run"
    assert cli_train(folders, out, "--method", "adele") == 0
    capsys.readouterr()
    for path, key in ((out / "config.json", "config"), (out / "checkpoint" / "state.json", "config")):
        stored = json.loads(path.read_text())
        for field in ("guard", "consistency_start", "fork"):
            del stored[key]["adele"][field]
        path.write_text(json.dumps(stored))
    old = RunDir(out).read_config()
    assert (old.adele.guard, old.adele.consistency_start, old.adele.fork) == (False, "always", False)
    assert AdeleConfig().guard and AdeleConfig().consistency_start == "first_trigger" and AdeleConfig().fork
    assert main(["train", "--resume", str(out), "--epochs", "2", "--quiet"]) == 0
    assert [r["epoch"] for r in read_records(out)] == [1, 2]
    # Today's `adele` in that directory is another configuration: refused, named.
    assert cli_train(folders, out, "--method", "adele") == 2
    assert "differs in adele.consistency_start, adele.fork, adele.guard" in capsys.readouterr().err


def test_resume_refuses_a_label_store_that_does_not_match_the_data(
    folders: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, labels = folders
    changed_labels = tmp_path / "noisy_copy"
    (changed_labels / "masks").mkdir(parents=True)
    for mask_file in (labels / "masks").iterdir():
        (changed_labels / "masks" / mask_file.name).write_bytes(mask_file.read_bytes())
    out = tmp_path / "run"
    assert cli_train((data, changed_labels), out, "--method", "baseline") == 0
    first = sorted((changed_labels / "masks").iterdir())[0]
    mask = np.asarray(Image.open(first)).copy()
    mask[0, 0] = 1 - min(mask[0, 0], 1)
    write_png(first, mask)
    before = tree_digest(out)
    assert main(["train", "--resume", str(out), "--epochs", "2", "--quiet"]) == 2
    assert "fingerprint" in capsys.readouterr().err
    assert tree_digest(out) == before


def test_eval_and_predict_agree_with_an_independent_computation(
    folders: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, _ = folders
    out = tmp_path / "run"
    assert cli_train(folders, out, "--method", "baseline") == 0
    capsys.readouterr()
    assert main(["eval", "--run", str(out), "--split", "val", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    model, _ = load_model(resolve_model_file(out))
    val_ids = (data / "splits" / "val.txt").read_text().split()
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    intersection, union = np.zeros(len(CLASSES)), np.zeros(len(CLASSES))
    for slice_id in val_ids:
        raw = np.load(data / "images" / f"{slice_id}.npy")
        np.save(inputs / f"{slice_id}.npy", raw)
        normalised = (raw - raw.mean()) / (raw.std() + 1e-6)
        with torch.no_grad():
            prediction = model(torch.from_numpy(normalised.astype(np.float32))[None, None]).argmax(1)[0].numpy()
        truth = np.asarray(Image.open(data / "masks" / f"{slice_id}.png"))
        for c in range(len(CLASSES)):
            intersection[c] += np.sum((prediction == c) & (truth == c))
            union[c] += np.sum((prediction == c) | (truth == c))
        np.save(tmp_path / f"expected_{slice_id}.npy", prediction)
    expected_iou = np.where(union > 0, intersection / np.maximum(union, 1), np.nan)
    got = np.array([np.nan if v is None else v for v in result["per_class_iou"]])
    assert np.allclose(got, expected_iou, equal_nan=True)
    assert result["miou"] == pytest.approx(np.nanmean(expected_iou))
    masks = tmp_path / "masks"
    assert main(["predict", "--run", str(out), "--input", str(inputs), "--out", str(masks), "--quiet"]) == 0
    for slice_id in val_ids:
        assert np.array_equal(
            np.asarray(Image.open(masks / f"{slice_id}.png")), np.load(tmp_path / f"expected_{slice_id}.npy")
        )


def test_commands_report_bad_input_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--run", str(tmp_path / "nowhere")]) == 2
    assert "not a noisyseg run directory" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "nowhere")]) == 2
    assert "not a noisyseg run directory" in capsys.readouterr().err


def test_checkpoint_survives_a_crash_between_the_directory_renames(tmp_path: Path) -> None:
    def write(epoch: int) -> None:
        write_checkpoint(
            tmp_path,
            {"w": torch.full((2,), float(epoch))},
            {"epoch": epoch},
            lambda d: (d / "extra.txt").write_text(str(epoch)),
        )

    write(1)
    write(2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_DIR]
    # A crash after `checkpoint` became `checkpoint.old` and before `checkpoint.tmp` was renamed:
    (tmp_path / CHECKPOINT_DIR).rename(tmp_path / f"{CHECKPOINT_DIR}.old")
    (tmp_path / f"{CHECKPOINT_DIR}.tmp").mkdir()  # a half-written next checkpoint
    found = find_checkpoint(tmp_path)
    assert found == tmp_path / f"{CHECKPOINT_DIR}.old"
    tensors, state = read_checkpoint(found)
    assert state["epoch"] == 2 and torch.equal(tensors["w"], torch.full((2,), 2.0))
    write(3)  # the next save cleans up both leftovers
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_DIR]
    assert read_checkpoint(find_checkpoint(tmp_path))[1]["epoch"] == 3


# ----------------------------------------------------------------------------- device and precision

CUDA = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device: torch.cuda.is_available() is False here"
)


def spy_logit_dtypes(monkeypatch: pytest.MonkeyPatch) -> list[torch.dtype]:
    """Record the dtype of the logits each training step hands to the loss."""
    seen: list[torch.dtype] = []
    terms = Trainer.loss_terms

    def recording(self: Trainer, logits: list[torch.Tensor], target: torch.Tensor):  # type: ignore[no-untyped-def]
        seen.append(logits[0].dtype)
        return terms(self, logits, target)

    monkeypatch.setattr(Trainer, "loss_terms", recording)
    return seen


def test_bf16_autocast_trains_on_the_cpu_close_to_fp32(
    folders: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = spy_logit_dtypes(monkeypatch)
    fp32 = train(tiny_config(folders, tmp_path / "fp32", "method=adele+arm", "epochs=1", "precision=fp32"))
    assert set(seen) == {torch.float32}
    seen.clear()
    bf16 = train(tiny_config(folders, tmp_path / "bf16", "method=adele+arm", "epochs=1", "precision=bf16"))
    assert set(seen) == {torch.bfloat16}
    loss32, loss16 = (read_records(tmp_path / name)[0]["loss"]["total"] for name in ("fp32", "bf16"))
    # Same seed, same batches: bf16 rounds activations to 8 bits of mantissa (about 0.4%), so the
    # first epoch's mean loss moves by a few percent at most.
    assert loss16 == pytest.approx(loss32, rel=0.05)
    assert bf16["test_miou"]["last"] is not None and fp32["test_miou"]["last"] is not None
    weights = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.float32}


def test_a_run_resumes_in_another_precision_and_fp16_keeps_its_loss_scale(
    folders: tuple[Path, Path], tmp_path: Path
) -> None:
    out = tmp_path / "fp16"
    train(tiny_config(folders, out, "method=baseline", "epochs=1", "precision=fp16"))
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["grad_scaler"]["scale"] > 0  # torch.amp.GradScaler's own state
    summary = train(tiny_config(folders, out, "method=baseline", "epochs=2", "precision=fp32"), resume=True)
    assert summary["epochs"] == 2 and [r["epoch"] for r in read_records(out)] == [1, 2]


def test_compiled_network_trains_and_saves_the_plain_modules_weights(
    folders: tuple[Path, Path], tmp_path: Path
) -> None:
    out = tmp_path / "compiled"
    # Batches of 4 over the 8 slices: one graph (a smaller last batch would recompile it with
    # dynamic shapes, which took as long again with a cold inductor cache).
    train(tiny_config(folders, out, "method=baseline", "epochs=1", "batch_size=4", "model.compile=true"))
    model, _ = load_model(resolve_model_file(out))  # keys without torch.compile's `_orig_mod.` prefix
    assert all(torch.isfinite(p).all() for p in model.parameters())


@CUDA
def test_cuda_bf16_run_uses_the_triton_loss_and_resumes_on_the_cpu(
    folders: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from noisyseg.kernels import functional

    backends: list[str] = []
    resolve = functional.resolve_backend
    monkeypatch.setattr(
        functional, "resolve_backend", lambda name, example: backends.append(resolve(name, example)) or backends[-1]
    )
    out = tmp_path / "cuda"
    train(
        tiny_config(folders, out, "method=adele+arm", "epochs=1", "device=cuda", "precision=auto", "loss.backend=auto")
    )
    assert "triton" in backends and "numba" not in backends
    summary = train(
        tiny_config(folders, out, "method=adele+arm", "epochs=2", "device=cpu", "precision=auto", "loss.backend=auto"),
        resume=True,
    )
    assert summary["epochs"] == 2

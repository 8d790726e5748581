"""A run's TensorBoard event files, read back with tensorboard's own EventAccumulator and checked
against metrics.jsonl, the data folder's masks and the checkpointed network's prediction."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_trainer import CLASSES, EARLY_CORRECTION, folders, read_records, tiny_config  # noqa: F401 (fixture)

from noisyseg.data.colors import PALETTE
from noisyseg.data.run_data import load_split
from noisyseg.models import create_model
from noisyseg.training.tensorboard_log import TENSORBOARD_DIR
from noisyseg.training.trainer import Trainer, train

EPOCHS = 5


def events(run_dir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(run_dir / TENSORBOARD_DIR), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def scalar_series(accumulator: EventAccumulator, tag: str) -> dict[int, float]:
    series = accumulator.Scalars(tag)
    steps = [e.step for e in series]
    assert len(steps) == len(set(steps)), f"{tag}: an epoch written twice ({steps})"
    return {e.step: e.value for e in series}


@pytest.fixture(scope="module")
def arm_run(folders: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """adele+arm with ADELE's trigger forced at epoch 3 (EARLY_CORRECTION)."""
    out = tmp_path_factory.mktemp("tb") / "run"
    train(tiny_config(folders, out, "method=adele+arm", f"epochs={EPOCHS}", *EARLY_CORRECTION))
    return out


def test_scalars_are_the_metrics_records(arm_run: Path) -> None:
    records = read_records(arm_run)
    accumulator = events(arm_run)
    epochs = list(range(1, EPOCHS + 1))

    def series(tag: str) -> list[float]:
        values = scalar_series(accumulator, tag)
        assert sorted(values) == epochs, tag
        return [values[e] for e in epochs]

    f32 = {"rel": 1e-6, "abs": 1e-7}  # event files hold float32
    terms = {term for r in records for term in r["loss"]}
    assert {
        "total",
        "ce",
        "consistency",
        "arm_objective",
    } <= terms  # arm_objective: ARM's warm-up only
    for term in terms:
        written = scalar_series(accumulator, f"loss/{term}")
        assert written == pytest.approx({r["epoch"]: r["loss"][term] for r in records if term in r["loss"]}, **f32)
    assert series("lr") == pytest.approx([r["lr"] for r in records], **f32)
    for split in ("val", "test"):
        assert series(f"{split}/miou") == pytest.approx([r[split]["miou"] for r in records], **f32)
        for c, name in enumerate(CLASSES):
            assert series(f"{split}_iou/{name}") == pytest.approx(
                [r[split]["per_class_iou"][c] for r in records], **f32
            )
    assert series("labels/corrected_fraction") == pytest.approx([r["labels_changed_fraction"] for r in records], **f32)
    assert series("labels/corrected_pixels") == [r["corrected_pixels"] for r in records]
    assert any(r["corrected_pixels"] for r in records)
    # correcting/<class> rises at the class's trigger epoch and falls where the guard stopped it.
    triggers = records[-1]["trigger"]
    for c, name in enumerate(CLASSES[1:], start=1):
        start, stop = (
            triggers[str(c)]["epoch"] or EPOCHS + 1,
            triggers[str(c)]["guard_epoch"] or EPOCHS + 1,
        )
        assert series(f"correcting/{name}") == [float(start <= e < stop) for e in epochs]
    assert 3 in {t["epoch"] for t in triggers.values()}
    # ARM's effective sample fraction, (sum w n)^2 / (sum w^2 n * sum n), by hand from the record.
    expected = []
    for record in records:
        w = np.array(record["arm"]["w"])
        n = np.array(record["arm"]["pixels"]) + np.array(record["arm"]["pixels_wrong"])
        expected.append((w * n).sum() ** 2 / ((w**2 * n).sum() * n.sum()))
    assert series("arm/effective_sample_fraction") == pytest.approx(expected, rel=1e-5)


def test_validation_images_show_image_mask_and_prediction(
    folders: tuple[Path, Path],  # noqa: F811
    arm_run: Path,
) -> None:
    accumulator = events(arm_run)
    val = load_split(folders[0], "val")
    tags = accumulator.Tags()["images"]
    assert sorted(tags) == sorted(f"val_images/{i}" for i in val.ids)
    # The last epoch's weights, from the checkpoint, predict independently of the trainer.
    state = load_file(str(arm_run / "checkpoint" / "state.safetensors"))
    model = create_model("unet", in_channels=1, num_classes=len(CLASSES), base_width=4, depth=2)
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    model.eval()
    for index, slice_id in enumerate(val.ids):
        shots = accumulator.Images(f"val_images/{slice_id}")
        assert [s.step for s in shots] == list(range(1, EPOCHS + 1))  # every epoch for a 5-epoch run
        panels = np.asarray(Image.open(io.BytesIO(shots[-1].encoded_image_string)).convert("RGB"))
        height, width = val.masks[index].shape
        assert panels.shape == (height, 3 * width, 3)
        image, mask, prediction = np.split(panels, 3, axis=1)
        assert np.array_equal(mask, PALETTE[val.masks[index]])
        with torch.no_grad():
            expected = model(torch.from_numpy(val.images[index][None])).argmax(dim=1)[0].numpy()
        assert np.array_equal(prediction, PALETTE[expected])
        # The image panel is the slice, stretched: brighter pixels stay brighter.
        grey = image[..., 0].astype(float).ravel()
        assert np.corrcoef(grey, val.images[index][0].ravel())[0, 1] > 0.9


def test_a_resumed_run_shows_each_epoch_once(
    folders: tuple[Path, Path],  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A crash after epoch 3's events but before its checkpoint: the resumed run writes epoch 3
    again, and TensorBoard shows the rewritten point alone."""
    out = tmp_path / "run"
    config = tiny_config(folders, out, "method=adele", "epochs=4")
    save = Trainer.save_checkpoint

    def crash_before_epoch_3(self: Trainer) -> None:
        if self.epoch == 3:
            raise KeyboardInterrupt("simulated crash")
        save(self)

    monkeypatch.setattr(Trainer, "save_checkpoint", crash_before_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        train(config)
    assert sorted(scalar_series(events(out), "loss/total")) == [1, 2, 3]
    monkeypatch.setattr(Trainer, "save_checkpoint", save)
    train(config, resume=True)
    losses = scalar_series(events(out), "loss/total")
    assert sorted(losses) == [1, 2, 3, 4]
    assert [losses[e] for e in (1, 2, 3, 4)] == pytest.approx([r["loss"]["total"] for r in read_records(out)], rel=1e-6)

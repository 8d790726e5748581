"""TensorBoard event files for a run: `RUN/tensorboard/`, one point per epoch.

`tensorboard --logdir runs` then shows every run under `runs/` side by side (each run's tags are
the same, so the experiments' runs overlay). From each epoch's metrics record
(`Trainer.finish_epoch`, the object `metrics.jsonl` holds):

    loss/<term>                 the epoch's mean loss terms (total, ce, consistency, ...)
    lr                          the network's learning rate at the epoch's end
    val/miou, val/miou_fg       validation mIoU with and without background; likewise test/...
    val_iou/<class>             per-class IoU (background included); likewise test_iou/...
    train_iou/<class>           foreground IoU of the training passes against the labels trained on
    labels/corrected_fraction   share of training label pixels that differ from the annotations
    labels/corrected_pixels     label pixels corrected during the epoch
    correcting/<class>          1 from the epoch ADELE's trigger fired for the class, 0 before it
                                (and again after the guard stopped it): the step is the trigger epoch
    arm/effective_sample_fraction, arm/wrong_relative_weight   ARM methods (`arm_analysis.py`;
                                the second only when clean training masks are known)
    iou_el/<class>, iou_m/<class>   early-learning and memorisation IoU (clean masks known)

and every `image_every(epochs)` epochs (and at the last), for the first `IMAGES` validation
items, one image `val_images/<id>`: the image, its mask and the model's prediction side by side
(masks in the review's colours, `data/colors.py`; ignored pixels white).

Rank 0 writes; a resumed run purges the events of epochs after its checkpoint, so a run that
stopped between its event files and its checkpoint shows each epoch once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from noisyseg.data.colors import color_mask, display_image
from noisyseg.evaluation.inference import predict_image
from noisyseg.methods.hooks import arm_epoch

TENSORBOARD_DIR = "tensorboard"
# Validation items shown, and about how many times over a run (the images are the bulk of the
# event file: 3 items of 3 panels at 256 px are about 100 kB a time as PNG).
IMAGES = 3
IMAGE_TIMES = 10
# Longest side of a panel; larger images are shown subsampled (Cityscapes' 2048 px).
PANEL_MAX = 512


def image_every(epochs: int) -> int:
    """Epochs between image snapshots: about IMAGE_TIMES over a run of `epochs`."""
    return max(1, math.ceil(epochs / IMAGE_TIMES))


class TensorBoardLog:
    """Writes one run's event files; `write_epoch` once per epoch, `close` at the end."""

    def __init__(
        self,
        run_dir: str | Path,
        class_names: Sequence[str],
        ignore_index: int,
        epochs: int,
        resume_after: int = 0,
    ) -> None:
        self.path = Path(run_dir) / TENSORBOARD_DIR
        self.class_names = list(class_names)
        self.ignore_index = ignore_index
        self.epochs = epochs
        # Imported here: torch.utils.tensorboard imports the tensorboard package (and protobuf).
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events at or after the first epoch still to train are dropped from earlier files.
        self.writer = SummaryWriter(str(self.path), purge_step=resume_after + 1 if resume_after else None)

    def write_epoch(self, record: dict[str, Any], model: nn.Module | None = None, val: Any = None) -> None:
        """The scalars of one epoch's `record`; with `model` and `val` (the validation split:
        (image, mask) items and their `ids`), the validation images when this epoch is due."""
        epoch = int(record["epoch"])
        scalars = dict(self.scalars(record))
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, epoch)
        if model is not None and val is not None and len(val) and self.images_due(epoch):
            for index in range(min(IMAGES, len(val))):
                image, mask = val[index]
                self.writer.add_image(
                    f"val_images/{val.ids[index]}",
                    self.panels(model, image, mask),
                    epoch,
                    dataformats="HWC",
                )
        self.writer.flush()

    def images_due(self, epoch: int) -> bool:
        return epoch % image_every(self.epochs) == 0 or epoch == self.epochs or epoch == 1

    def scalars(self, record: dict[str, Any]) -> list[tuple[str, float]]:
        """(tag, value) of every finite number in `record` that the module docstring lists."""
        names = self.class_names
        out: list[tuple[str, Any]] = [(f"loss/{term}", value) for term, value in record["loss"].items()]
        out.append(("lr", record["lr"]))
        for split in ("val", "test"):
            result = record[split]
            out += [(f"{split}/miou", result["miou"]), (f"{split}/miou_fg", result["miou_fg"])]
            out += [(f"{split}_iou/{names[c]}", iou) for c, iou in enumerate(result["per_class_iou"])]
        for key in ("train_iou", "iou_el", "iou_m"):
            out += [(f"{key}/{names[int(c)]}", iou) for c, iou in record.get(key, {}).items()]
        out += [
            ("labels/corrected_fraction", record["labels_changed_fraction"]),
            ("labels/corrected_pixels", record["corrected_pixels"]),
        ]
        for c, trigger in record["trigger"].items():
            active = trigger["triggered"] and (trigger.get("guard_epoch") is None)
            out.append((f"correcting/{names[int(c)]}", float(active)))
        if "arm" in record:
            arm = arm_epoch(record["arm"])
            out += [
                ("arm/effective_sample_fraction", arm.effective_fraction),
                ("arm/wrong_relative_weight", arm.wrong_relative_weight),
            ]
        return [(tag, float(value)) for tag, value in out if value is not None and math.isfinite(float(value))]

    def panels(self, model: nn.Module, image: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
        """(H, 3W, 3) uint8: the image, its mask and the model's single-scale prediction."""
        device = next(model.parameters()).device
        prediction = predict_image(model, image[None].to(device), [1.0]).argmax(dim=1)[0].cpu().numpy()
        step = max(1, math.ceil(max(mask.shape[-2:]) / PANEL_MAX))
        shown = [
            display_image(image.float().numpy()),
            color_mask(mask.numpy(), self.ignore_index),
            color_mask(prediction, self.ignore_index),
        ]
        return np.concatenate([panel[::step, ::step] for panel in shown], axis=1)

    def close(self) -> None:
        self.writer.close()

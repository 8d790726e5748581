"""Label Wave's input: the fraction of training pixels whose predicted class changed since the
previous epoch (`selection.py` smooths it and picks its first minimum).

The cheapest honest measure: every epoch's training pass already computes each training pixel's
scale-1.0 logits, so their argmax is compared with the same pixel's argmax in the previous epoch's
training pass, as the Label Wave paper counts changes of the predictions made while training (no
extra inference pass; the network moves within the epoch, as it does there). One uint8 map per
training image holds each pixel's last prediction (`UNSEEN` = none yet), the label store's size:

- cached runs: the maps live on the training device, indexed by row: no host wait per step;
- streamed runs: memory-mapped in the run directory like the label store; each crop is mapped
  back through its flip and crop (`pipeline.region_of_crop`) when the host looks; the pixels of a
  rescaled crop (`loader.augment.rescale`) cannot be mapped back without resampling and are not
  compared, so such runs count the changes of their unrescaled items only;
- several ranks, cached: each rank compares the rows of its shard (disjoint within an epoch) and
  the maps are exchanged at the epoch's end, so every rank holds the single-process maps;
  streamed with several ranks the changes are not measured (None: `label-free` then keeps the
  last epoch).

The maps are part of the checkpoint (`predictions.npy` and `.json`), so a resumed run measures the
same changes as an uninterrupted one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from noisyseg.data.folder import read_json_object
from noisyseg.data.label_store import CHUNK, LabelMaps
from noisyseg.data.pipeline import GEOMETRY_FIELDS, region_of_crop
from noisyseg.io import atomic_write_json
from noisyseg.runtime.distributed import DistContext, all_gather_rows, all_reduce_sum

log = logging.getLogger(__name__)

UNSEEN = 255  # no prediction stored yet (class ids are below 255)
ARRAY_FILE = "predictions.npy"
INFO_FILE = "predictions.json"
FORMAT_VERSION = 1
# Streamed batches queued on the device before the host maps them back (the trainer's host
# looks come every 10 steps too).
FLUSH_EVERY = 10
RESCALED = GEOMETRY_FIELDS.index("rescaled")


class PredictionChanges:
    """Each training pixel's last training-pass prediction, and the changes counted this epoch."""

    def __init__(
        self,
        shapes: Sequence[tuple[int, int]],
        device: torch.device,
        cached: bool,
        ctx: DistContext,
        workdir: str | Path | None = None,
    ) -> None:
        self.device, self.cached, self.ctx = device, cached, ctx
        self.measured = cached or not ctx.enabled
        if not self.measured and ctx.is_main:
            log.warning(
                "prediction changes (Label Wave's input) are not measured when several "
                "ranks stream their data; the label-free rule keeps the last epoch"
            )
        self.maps = LabelMaps.allocate(shapes, workdir)
        self.maps.flat[:] = UNSEEN
        self.maps.release()
        self.on_device = torch.from_numpy(self.maps.stacked()).to(device, copy=True) if cached else None
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (geometry, predictions) of streamed crops
        self.zero_counts()

    def zero_counts(self) -> None:
        self.changed = torch.zeros((), dtype=torch.int64, device=self.device)
        self.compared = torch.zeros((), dtype=torch.int64, device=self.device)

    def observe(self, prediction: torch.Tensor, rows: torch.Tensor, geometry: torch.Tensor | None = None) -> None:
        """Compare a training step's scale-1.0 `prediction` (N, h, w class ids, the argmax the
        trainer's training-IoU counts already computed) with the last prediction of the same
        pixels and store it: `rows` of the cached split (on the device), or streamed crops with
        their `geometry` (N, 7)."""
        if not self.measured:
            return
        predicted = prediction.to(torch.uint8)
        if geometry is None:
            assert self.on_device is not None, "rows are observed in cached runs only"
            previous = self.on_device[rows]
            seen = previous != UNSEEN
            self.changed += (seen & (previous != predicted)).sum()
            self.compared += seen.sum()
            self.on_device[rows] = predicted
            return
        self.pending.append((geometry, predicted))
        if len(self.pending) >= FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        """Map the queued crops back onto their images' maps, counting the changed pixels."""
        changed = compared = 0
        for geometry, predicted in self.pending:
            for item, crop in zip(geometry.numpy(), predicted.cpu().numpy(), strict=True):
                if item[RESCALED]:
                    continue
                previous, current = region_of_crop(self.maps, crop, item)
                seen = previous != UNSEEN
                changed += int(np.count_nonzero(seen & (previous != current)))
                compared += int(np.count_nonzero(seen))
                previous[...] = current
                self.maps.release(int(item[0]))
        self.pending = []
        self.changed += changed
        self.compared += compared

    def end_epoch(self) -> float | None:
        """The epoch's fraction of compared pixels whose prediction changed, over all ranks (None
        when nothing was compared: the first epoch, or not measured); resets the counts."""
        if not self.measured:
            return None
        self.flush()
        if self.on_device is not None:
            self.sync()
        counts = all_reduce_sum(
            self.ctx, torch.stack([self.changed, self.compared]), "the prediction-change all-reduce"
        ).tolist()
        self.zero_counts()
        return counts[0] / counts[1] if counts[1] else None

    def sync(self) -> None:
        """Bring the device maps into the host maps (what checkpoints hold); with several ranks,
        every rank takes the rows the others predicted this epoch."""
        assert self.on_device is not None
        current, stored = self.on_device.cpu().numpy(), self.maps.stacked()
        changed = np.flatnonzero((current != stored).reshape(len(current), -1).any(axis=1))
        rows, maps = all_gather_rows(
            self.ctx, changed.astype(np.int64), current[changed], "the prediction-map exchange"
        )
        if len(rows):
            stored[rows] = maps
            if self.ctx.enabled:
                self.on_device[torch.from_numpy(rows).to(self.device)] = torch.from_numpy(maps).to(self.device)

    def save(self, directory: str | Path) -> None:
        """Write the maps into a checkpoint directory (after `end_epoch`)."""
        directory = Path(directory)
        self.maps.save_npy(directory / ARRAY_FILE)
        atomic_write_json(
            directory / INFO_FILE,
            {
                "format_version": FORMAT_VERSION,
                "shapes": [list(s) for s in self.maps.shapes],
                "sha256": self.maps.digest(),
            },
        )

    def load(self, directory: str | Path) -> None:
        """Restore the maps of a checkpoint directory; one written before they existed leaves
        them unseen (the first resumed epoch then measures no changes)."""
        directory = Path(directory)
        info_path, array_path = directory / INFO_FILE, directory / ARRAY_FILE
        if not (info_path.is_file() and array_path.is_file()):
            log.warning(
                "%s: no stored training predictions (a checkpoint from before Label "
                "Wave's measure); the first resumed epoch measures no prediction changes",
                directory,
            )
            return
        try:
            info = read_json_object(info_path, "prediction-map description")
            array = np.load(array_path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as err:
            raise ValueError(f"{directory}: unreadable training predictions ({err})") from err
        if (
            info.get("shapes") != [list(s) for s in self.maps.shapes]
            or array.dtype != np.uint8
            or array.size != len(self.maps.flat)
        ):
            raise ValueError(
                f"{array_path}: stored training predictions do not match the training "
                f"split ({array.size} pixels stored, {len(self.maps.flat)} in the data)"
            )
        flat = array.reshape(-1)
        for start in range(0, len(flat), CHUNK):
            self.maps.flat[start : start + CHUNK] = flat[start : start + CHUNK]
        if info.get("sha256") != self.maps.digest():
            raise ValueError(
                f"{array_path}: stored training predictions do not match their "
                f"description in {INFO_FILE} (damaged or from another save)"
            )
        if self.on_device is not None:
            self.on_device.copy_(torch.from_numpy(self.maps.stacked()))

"""Where ADELE's corrected labels go and how they reach the label store (method-spec section 3).

Cached runs keep a device copy of the store (`labels`): a step's corrections are written there
with no host wait and brought into the store at the epoch's end (`sync`). Streamed runs queue
each batch's corrected crops on the device and paste them into the memory-mapped store through
each crop's flip and crop at the host's looks (`flush`). With several ranks, each rank's changed
items go to every rank at the epoch's end: within an epoch each item belongs to exactly one
rank's shard, so the rows are disjoint and no rank has read a row that another corrected; the
copies end equal to the store a single process would build.
"""

from __future__ import annotations

import numpy as np
import torch

from noisyseg.config import AdeleConfig
from noisyseg.data.label_store import LabelMaps, LabelStore
from noisyseg.data.pipeline import paste_back
from noisyseg.methods import adele
from noisyseg.runtime.distributed import DistContext, all_gather_rows


class LabelCorrections:
    """The label store of a run and the corrections on their way into it."""

    def __init__(
        self,
        store: LabelStore,
        ctx: DistContext,
        device: torch.device,
        cached: bool,
        config: AdeleConfig,
        ignore_index: int,
    ) -> None:
        self.ctx, self.device, self.cached = ctx, device, cached
        self.config, self.ignore_index = config, ignore_index
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (geometry, corrected crops) not yet in the store
        self.changed_rows: set[int] = set()  # streamed items this rank corrected since the last exchange
        self.replace_store(store)

    def replace_store(self, store: LabelStore) -> None:
        """Take `store` (a fresh one, or one restored from a checkpoint) as the current labels."""
        self.store = store
        self.labels = torch.from_numpy(store.labels).to(self.device, copy=True) if self.cached else None

    def correct(self, labels: torch.Tensor, probs: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        return adele.correct_labels(
            labels, probs, classes, self.config.tau, self.config.refuse_absent_classes, self.ignore_index
        )

    def correct_rows(
        self, rows: torch.Tensor, labels: torch.Tensor, probs: torch.Tensor, classes: torch.Tensor
    ) -> torch.Tensor:
        """Correct rows `rows` of the device copy from `probs`; the number of changed pixels as a
        device tensor (`sync` brings the rows into the store)."""
        corrected = self.correct(labels, probs, classes)
        assert self.labels is not None, "rows are corrected in cached runs only"
        self.labels[rows] = corrected.to(torch.uint8)
        return (corrected != labels).sum()

    def correct_crops(
        self, geometry: torch.Tensor, labels: torch.Tensor, probs: torch.Tensor, classes: torch.Tensor
    ) -> torch.Tensor:
        """Correct a streamed batch's crops; queued on the device until `flush`."""
        corrected = self.correct(labels, probs, classes)
        self.pending.append((geometry, corrected.to(torch.uint8)))
        return (corrected != labels).sum()

    def correct_item(self, index: int, probs: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Correct streamed item `index`'s whole map in the store from `probs` (1, K, H, W)."""
        labels = torch.from_numpy(self.store.maps[index]).to(self.device).long()[None]
        corrected = self.correct(labels, probs, classes)
        count = (corrected != labels).sum()
        if int(count):
            self.store.maps[index] = corrected[0].to(torch.uint8).cpu().numpy()
            self.changed_rows.add(index)
        self.store.maps.release(index)
        return count

    def flush(self) -> None:
        """Write the queued crop corrections into the host store through each crop's geometry
        (a host wait; done at the logging points and at the epoch's end)."""
        for geometry, corrected in self.pending:
            for item, crop in zip(geometry.numpy(), corrected.cpu().numpy(), strict=True):
                if paste_back(self.store, crop, item):
                    self.changed_rows.add(int(item[0]))
        self.pending = []

    def give_back(self, class_id: int, original: np.ndarray | LabelMaps) -> int:
        """Restore the pixels correction erased from `class_id` (`LabelStore.give_back`), in the
        store and the device copy. Call after `sync`: every rank holds the same store and
        restores the same pixels, so nothing needs exchanging."""
        restored = self.store.give_back(class_id, original)
        if self.labels is not None and restored:
            self.labels.copy_(torch.from_numpy(self.store.labels))
        return restored

    def sync(self) -> None:
        """Bring every correction into the store (what checkpoints hold), on every rank."""
        if self.labels is None:
            self.exchange_streamed()
            return
        current = self.labels.cpu().numpy()
        changed = np.flatnonzero((current != self.store.labels).reshape(len(current), -1).any(axis=1))
        rows, labels = all_gather_rows(self.ctx, changed.astype(np.int64), current[changed], "the label-store exchange")
        if len(rows):
            self.store.update(rows, labels)
            if self.ctx.enabled:
                self.labels[torch.from_numpy(rows).to(self.device)] = torch.from_numpy(labels).to(self.device)

    def exchange_streamed(self) -> None:
        """Streamed store: every rank applies every rank's corrected maps (disjoint items)."""
        self.flush()
        rows = np.array(sorted(self.changed_rows), dtype=np.int64)
        self.changed_rows = set()
        if not self.ctx.enabled:
            return
        what = "the label-store exchange"
        flat = np.concatenate([self.store.maps[r].reshape(-1) for r in rows]) if len(rows) else np.zeros(0, np.uint8)
        all_rows, _ = all_gather_rows(self.ctx, rows, np.zeros((len(rows), 1), np.uint8), what)
        _, all_flat = all_gather_rows(self.ctx, np.zeros(len(flat), np.int64), flat[:, None], what)
        offset = 0
        for row in all_rows.tolist():
            height, width = self.store.maps.shapes[row]
            self.store.maps[row] = all_flat[offset : offset + height * width, 0].reshape(height, width)
            offset += height * width
            self.store.maps.release(row)

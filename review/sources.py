"""Where the review's probabilities come from: a model over the items of a dataset split.

`ProbabilitySource` pairs a `SegmentationSource` (raw images and the given masks, read one at a
time) with a model that gives class probabilities for one image; `RunSource` is a training run
directory (its selected model in PyTorch and, for a method that corrects labels, the label store
it now trains on). `noisyseg.review.onnx_source.OnnxSource` runs an exported model instead.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from noisyseg.data.datasets import SegmentationSource
from noisyseg.data.label_store import LabelStore
from noisyseg.run.run_dir import RunDir


@dataclass
class ReviewItem:
    index: int
    slice_id: str
    given: np.ndarray  # uint8 (H, W) class ids, the source's ignore index unlabelled
    probs: torch.Tensor  # float (K, H, W) on the source's device
    corrected: np.ndarray | None  # the labels the run trains on now, when it corrects them


class ProbabilitySource(ABC):
    """The items of one split with a model's class probabilities for each."""

    def __init__(
        self,
        data: SegmentationSource,
        class_names: Sequence[str],
        device: torch.device,
        correction: str = "prediction",
        allow_class_mismatch: bool = False,
        model: str | Path = "the model",
    ) -> None:
        if len(class_names) != data.info.num_classes:
            raise ValueError(
                f"{data.root}: the data has {data.info.num_classes} classes {data.info.classes}, "
                f"the model {len(class_names)} {list(class_names)}"
            )
        # Same number, other names: the model's class i would be scored as the data's class i.
        if list(class_names) != list(data.info.classes) and not allow_class_mismatch:
            raise ValueError(
                f"{model}: the model's classes {list(class_names)} are not the classes of {data.root} "
                f"{data.info.classes}; its scores would be of other classes (pass --allow-class-mismatch "
                "to review with them matched by index)"
            )
        self.data = data
        self.class_names = list(class_names)
        self.device = device
        self.correction = correction  # what the corrected masks are: "prediction" or "label store"

    @property
    def ids(self) -> list[str]:
        return list(self.data.ids)

    @property
    def ignore_index(self) -> int:
        return self.data.info.ignore_index

    @abstractmethod
    def probabilities(self, image: np.ndarray) -> torch.Tensor:
        """Class probabilities (K, H, W) on `device` of one raw (C, H, W) image."""

    def corrected(self, index: int) -> np.ndarray | None:
        """The labels a run trains on now for item `index` (None: the prediction decides)."""
        return None

    def items(self) -> Iterator[ReviewItem]:
        """Every item in order, read and predicted one at a time."""
        for index, slice_id in enumerate(self.data.ids):
            image, given = self.data.read(index)
            yield ReviewItem(index, slice_id, given, self.probabilities(image), self.corrected(index))

    def mask_suffix(self, index: int) -> str:
        """The file suffix of item `index`'s given mask (.png or .npy: the dataset's own format)."""
        suffix = self.data.mask_path(index).suffix
        return suffix if suffix in (".png", ".npy") else ".png"


class RunSource(ProbabilitySource):
    """A run directory's model (`model.safetensors`, fp32 on `device`) over `split` of its data;
    the training split's given masks are the ones the run was trained from (`--labels`), and a
    run whose method corrects labels supplies its label store as the corrected masks."""

    def __init__(
        self, run_dir: str | Path, split: str = "train", device: str | None = None, workdir: str | Path | None = None
    ) -> None:
        from noisyseg.method_table import METHOD_SPECS
        from noisyseg.run.finished import open_run

        run = RunDir(run_dir)
        config = run.read_config()
        if not run.model_file.is_file():
            raise FileNotFoundError(
                f"{run.model_file}: the run has no selected model yet (it writes one after its first epoch)"
            )
        finished = open_run(run_dir, device or config.device)
        data = finished.source(split, given_labels=True)
        target = finished.device
        self.model = finished.model
        info = finished.info
        self.normalization = info.normalization
        self.store: LabelStore | None = None
        # The store goes with the model trained on it: not when `adele.fork` kept its branch's.
        if split == "train" and METHOD_SPECS[config.method].correction and info.method == config.method:
            self.store = read_store(run, data, workdir)
        super().__init__(
            data,
            info.class_names,
            target,
            "label store" if self.store is not None else "prediction",
            model=run.model_file,
        )

    def probabilities(self, image: np.ndarray) -> torch.Tensor:
        from noisyseg.data.folder import normalize_image
        from noisyseg.evaluation.inference import predict_image

        tensor = torch.from_numpy(normalize_image(image, self.normalization))[None].to(self.device)
        return predict_image(self.model, tensor, [1.0])[0]

    def corrected(self, index: int) -> np.ndarray | None:
        if self.store is None:
            return None
        labels = np.array(self.store.maps[index])
        self.store.maps.release(index)  # keep the pass's resident memory flat
        return labels


def read_store(run: RunDir, data: SegmentationSource, workdir: str | Path | None) -> LabelStore:
    """The run's label store, checked against the masks it was made from (memory-mapped in `workdir`)."""
    from noisyseg.data.pipeline import read_label_maps
    from noisyseg.run.checkpoint import find_checkpoint

    checkpoint = find_checkpoint(run.path)
    if checkpoint is None:
        raise FileNotFoundError(f"{run}: no checkpoint with a label store (the run has not finished an epoch)")
    work = None if workdir is None else str(workdir)
    return LabelStore.load(checkpoint, read_label_maps(data, work), data.ids, work)

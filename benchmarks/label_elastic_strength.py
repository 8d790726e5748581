"""How strongly NSegment's label-only elastic deformation moves the phantom's masks at the
experiments' scale (`python -m noisyseg.benchmarks.label_elastic_strength`; docs/method.md).

For each (alpha, sigma) pair of the authors' list (`loader.augment.label_elastic_alpha/sigma`
defaults), every training mask of the experiments' phantom is warped once: the mean displacement
in pixels and the foreground IoU of the warped labels against the input, per class.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from noisyseg.config import AugmentConfig
from noisyseg.data.folder import read_dataset_info, read_mask, read_split_ids
from noisyseg.data.phantom import generate_phantom
from noisyseg.data.pipeline import elastic_displacement, warp_nearest
from noisyseg.evaluation.metrics import confusion_matrix, iou_per_class
from noisyseg.experiments.experiment import Scale


def main() -> None:
    scale, augment = Scale(), AugmentConfig()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "phantom"
        generate_phantom(root, scale.patients, scale.phantom_seed, scale.phantom_config())
        classes = read_dataset_info(root).classes
        masks = [read_mask(root / "masks" / f"{i}.png") for i in read_split_ids(root, "train")]
    rng = np.random.default_rng(0)
    print(f"{len(masks)} training masks of {masks[0].shape[0]} px; classes {', '.join(classes[1:])}")
    print("| alpha | sigma | mean displacement (px) | foreground IoU vs the input | per class |")
    print("| --- | --- | --- | --- | --- |")
    for alpha in augment.label_elastic_alpha:
        for sigma in augment.label_elastic_sigma:
            shifts, confusion = [], np.zeros((len(classes), len(classes)), np.int64)
            for mask in masks:
                dy, dx = elastic_displacement(mask.shape, alpha, sigma, rng)
                shifts.append(float(np.hypot(dy, dx).mean()))
                confusion += confusion_matrix(warp_nearest(mask, dy, dx).ravel(), mask.ravel(), len(classes))
            iou = iou_per_class(confusion)[1:]
            print(
                f"| {alpha:g} | {sigma:g} | {np.mean(shifts):.2f} | "
                f"{np.nanmean(iou):.2f} | {' '.join(f'{v:.2f}' for v in iou)} |"
            )


if __name__ == "__main__":
    main()

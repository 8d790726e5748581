"""What one training step, and so one epoch, of a recipe costs on this machine.

Usage: ``python benchmarks/recipe_step.py RECIPE [--batch B] [--steps N] [--device D] [--set K=V ...]``

The recipe's configuration (`noisyseg.recipes`) builds the trainer as `noisyseg train --recipe`
does: its network (random weights: `pretrained` is set to false, which costs the same), method,
scales, loss and optimisers. Its step (`Trainer.train_step`) runs on random images of the recipe's
input size (its crop, or the SegTHOR slices' 256 x 256) with random labels, one warm-up step then
`--steps` timed ones. Reading and augmenting items is left out (DataLoader workers do it beside
the step). Printed as one JSON object: per step (median) the wall-clock seconds and the process's
CPU seconds (what the step costs one idle core: on a shared machine the wall clock also counts
the waits for a core), and one epoch's estimate from each: the step time scaled linearly from
`--batch` to the recipe's batch size, times the batches of an epoch for the dataset size the
recipe names (`DATASETS`; SegTHOR's depends on the slices kept, so it is given per 1,000 slices).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time

import numpy as np
import torch

from noisyseg.config import build_config
from noisyseg.data.folder import DatasetInfo
from noisyseg.data.run_data import RunData
from noisyseg.recipes import read_recipe
from noisyseg.training.counters import EpochCounters
from noisyseg.training.trainer import make_trainer

# recipe: (input channels, classes, normalisation, training images of the dataset it names)
DATASETS = {
    "segthor-adele": (1, 5, "zscore", 1000),  # per 1,000 slices
    "cityscapes-coarse-arm": (3, 19, "imagenet", 2975),
    "voc-weak-adele": (3, 21, "imagenet", 10582),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", choices=sorted(DATASETS))
    parser.add_argument("--batch", type=int, help="images per measured step (default: the recipe's batch size)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up (default 2)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    channels, num_classes, normalization, images = DATASETS[args.recipe]
    recipe = read_recipe(args.recipe)
    with tempfile.TemporaryDirectory() as out:
        overrides = [
            f"data={out}",
            f"out={out}",
            f"device={args.device}",
            "loss.backend=auto",
            *args.overrides,
        ]
        config = build_config(recipe.path, overrides)
        if "pretrained" in config.model.kwargs:
            config.model.kwargs["pretrained"] = False
        batch = args.batch or config.batch_size
        height, width = config.loader.augment.crop_size or [256, 256]
        rng = np.random.default_rng(0)
        data = RunData(
            info=DatasetInfo(
                name=args.recipe,
                classes=[f"class{c}" for c in range(num_classes)],
                normalization=normalization,
            ),
            train_images=torch.from_numpy(rng.standard_normal((batch, channels, height, width), dtype=np.float32)),
            train_labels=rng.integers(0, num_classes, (batch, height, width), dtype=np.uint8),
            train_ids=[str(i) for i in range(batch)],
            clean_train_labels=None,
            val=None,
            test=None,
        )
        torch.set_num_threads(config.threads or torch.get_num_threads())
        trainer = make_trainer(config, data)
        counters = EpochCounters.zeros(
            num_classes,
            trainer.ignore_index,
            trainer.device,
            noise=False,
            confidence=trainer.arm is not None,
        )
        rows = torch.arange(batch)
        wall, cpu = [], []
        for _ in range(args.steps + 1):
            started, started_cpu = time.perf_counter(), time.process_time()
            trainer.train_step(trainer.batches.next(rows), counters, None)
            if trainer.device.type == "cuda":
                torch.cuda.synchronize(trainer.device)
            wall.append(time.perf_counter() - started)
            cpu.append(time.process_time() - started_cpu)
        assert torch.isfinite(counters.loss_sums["total"]), "the measured steps must train"
    batches = math.ceil(images / config.batch_size)
    report = {
        "recipe": args.recipe, "device": str(trainer.device), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "input": [batch, channels, height, width], "scales": trainer.scales,
        "recipe_batch": config.batch_size,
        "epoch_images": images, "epoch_batches": batches,
    }  # fmt: skip
    for name, seconds in (("wall", wall), ("cpu", cpu)):
        step = statistics.median(seconds[1:])
        recipe_step = step * config.batch_size / batch
        report[f"{name}_steps_s"] = [round(s, 2) for s in seconds]
        report[f"{name}_recipe_step_s"] = round(recipe_step, 2)
        report[f"{name}_epoch_h"] = round(recipe_step * batches / 3600, 2)
    print(json.dumps(report))


if __name__ == "__main__":
    main()

"""The paper-reproduction experiments on the phantom, resumable and safe to run in parallel.

Three experiments (the issue's "Reproduce the papers, measured"):

- `table1`: ADELE's Table 1 on the phantom with the reference `erode-dilate` noise:
  baseline-ms, adele-nonadaptive, adele, arm and adele+arm over several noise seeds, the paper's
  adele (`PAPER_ADELE`), the rivals (`RIVALS`): tloss, and NSegment's label-only elastic
  deformation with baseline-ms and adele; baseline-ms and adele in bf16 (`BF16_RUNS`); and adele
  with its fork (`FORKED_ADELE`; every other run trains without it).
- `ladder`: ADELE's Table 6: baseline-ms, each half of ADELE (adele-correction,
  adele-consistency) and adele over erode-dilate noise levels and noise seeds, the paper's adele,
  the rivals and the forked adele.

The noise also corrupts the validation split (`NoiseSpec.noisy_val`, the default): a run keeps the
checkpoint its noisy validation masks choose, as a user's would, and its summary gives the test
mIoU at every selection rule's epoch, the clean-validation one (the oracle) among them
(`selection.py`). `noisy_val=False` names the settings as before and reproduces the clean-selected runs.
- `coarse`: the ARM paper's coarse-label setting: the DeepLab-style model on `coarse` noise
  with plain CE (`baseline`), gce, ohem, arm and gce+arm.
- `armstudy`: `baseline` and `arm` in the coarse setting under a constant lr, ARM's optimiser varied (`ARM_STUDY`).

Layout under the experiment root `ROOT`:

    ROOT/data/phantom-<scale>/                  the phantom (one per scale)
    ROOT/data/phantom-<scale>-<noise>-<level>-s<seed>[-noisyval]/  its noisy training (and validation) labels
    ROOT/runs/<experiment>/<setting>/<method>[@<override>...]/  one training run (the trainer's run directory)

Every step is idempotent: a dataset folder is built in a temporary folder and renamed into place
(a concurrent builder that loses the race discards its copy), a run whose `summary.json` exists is
skipped, a run with a configuration but no summary is resumed from its last checkpoint, and a run
another live process is training (its lock file names that process) is left to it. So the
experiment can run in pieces, be interrupted at any time, and run as several processes at once.
`write_results` turns whatever summaries exist into `docs/results.md` tables and plots.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm import tqdm

from noisyseg.config import AdeleConfig, ModelConfig, OptimConfig, TrainConfig, apply_overrides, config_from_dict
from noisyseg.data.noise import LEVEL_ITERATIONS, NOISE_FILE, corrupt_dataset
from noisyseg.data.phantom import PhantomConfig, generate_phantom
from noisyseg.io import atomic_write_json
from noisyseg.method_table import method_names
from noisyseg.run.run_dir import RunDir

log = logging.getLogger(__name__)

TIMING_FILE = "experiment_timing.json"  # written beside a run's files by this module
EXPERIMENTS = ("table1", "ladder", "coarse", "armstudy")

# `baseline` (single-scale CE) is not in ADELE's Table 1; it is the reference ARM improves on.
TABLE1_METHODS = method_names(["baseline-ms", "adele-nonadaptive", "adele", "arm", "adele+arm", "baseline"])
# Table 6's columns: the multiscale baseline, each half of ADELE alone, and ADELE.
LADDER_METHODS = method_names(["baseline-ms", "adele-correction", "adele-consistency", "adele"])
# The simplest robust alternatives (issue 23): the T-Loss, and NSegment's label-only elastic
# deformation with the multiscale baseline and with ADELE. (method, overrides) as `RunSpec` takes them.
LABEL_ELASTIC = "loader.augment.label_elastic=true"
# The T-Loss trains under Adam, as its authors' code does (Adam; their lr is 1e-3 for nu, 1e-2 for
# the network with plateau decay; one lr of 1e-3 here). Under these experiments' SGD at lr 0.2 it
# stayed at all-background for 30 epochs (docs/results.md).
TLOSS_OPTIMISER = ("optim.optimizer=adam", "optim.lr=0.001")
RIVALS = (("tloss", TLOSS_OPTIMISER), ("baseline-ms", (LABEL_ELASTIC,)), ("adele", (LABEL_ELASTIC,)))
# ADELE as its paper has it, the consistency term from the first step, beside noisyseg's default
# (the term from the first trigger on, docs/method.md), so the paper's form stays measured.
PAPER_ADELE = ("adele", ("adele.consistency_start=always",))
# bf16 autocast beside fp32 on Table 1 (issue 23, part 4): on CPUs with native bf16 a run takes
# 1.3-1.5x less CPU time at this scale; paired over seeds, these runs measure its accuracy.
BF16_RUNS = (("baseline-ms", ("precision=bf16",)), ("adele", ("precision=bf16",)))
# ADELE with its fork, as `noisyseg train` runs it (`training/fork.py`): its branch is the
# `baseline-ms` run of the same seed, so the pair measures the fork; these runs check that.
FORKED_ADELE = ("adele", ("adele.fork=true",))
TABLE1_RUNS = (*((m, ()) for m in TABLE1_METHODS), PAPER_ADELE, *RIVALS, *BF16_RUNS, FORKED_ADELE)
LADDER_RUNS = (*((m, ()) for m in LADDER_METHODS), PAPER_ADELE, *RIVALS, FORKED_ADELE)
COARSE_METHODS = method_names(["baseline", "gce", "ohem", "arm", "gce+arm"])
# The ARM paper's setting trains under its lr policy (warm-up, x0.1 at 0.6T, x0.01 at 0.9T);
# ADELE's (table1, ladder) under a constant lr, as ADELE's SegTHOR code.
SCHEDULES = {"coarse": "multistep"}
# How the optimiser shapes what ARM learns: the coarse setting under ADELE's constant lr (the
# policy Table 1's arm and adele+arm train under), with ARM's optimiser varied: the paper's
# absolute ARM lr (its DeepLab lr), a longer warm-up, no momentum; and the baseline from another
# training seed, which measures how far two trainings on the same labels differ.
ARM_STUDY = (
    ("baseline", ()),
    ("arm", ()),
    ("arm", ("arm.lr=0.01",)),
    ("arm", ("arm.warmup_fraction=0.2",)),
    ("arm", ("arm.momentum=0.0",)),
    ("baseline", ("seed=1",)),
)


@dataclass(frozen=True)
class Scale:
    """How big the data and every run are. The papers use 256 px slices of 40 patients, a UNet of
    width 64 and 100 epochs; the defaults here keep the papers' 100 epochs and shrink the rest
    until two CPU cores finish the experiments in about an hour (measured times in
    docs/results.md).

    The field of view is cropped to the mediastinum (0.6 of the body's width), as a mediastinal
    reconstruction would be: at 96 px of the whole body the esophagus and trachea are about 4 px
    across (at the papers' 256 px about 10), and the width-8 UNet never learned them within 60
    epochs even from clean labels (measured: test IoU 0 for both, 49 mIoU). At 0.6 they are
    about 7 px across and it learns them (clean labels, 60 epochs: 23 and 44 IoU, 70 mIoU).

    The optimiser deviates from the ADELE reference code's SGD lr 0.01, momentum 0.99: with a
    width-8 UNet at 96 px that setting predicts only background for about the first 450
    iterations (measured), most of a CPU-sized run; lr 0.2 with momentum 0.9 (the same
    effective step, lr / (1 - momentum)) learns the heart within about 200 iterations.
    """

    patients: int = 8
    size: int = 96
    field_of_view: float = 0.6
    slices_per_patient: int = 16
    phantom_seed: int = 0
    epochs: int = 100
    batch_size: int = 4
    lr: float = 0.2
    momentum: float = 0.9
    unet: dict[str, Any] = field(default_factory=lambda: {"base_width": 8, "depth": 3})
    deeplab: dict[str, Any] = field(default_factory=lambda: {"base_width": 8})

    def model(self, architecture: str) -> ModelConfig:
        kwargs = self.unet if architecture == "unet" else self.deeplab
        return ModelConfig(architecture=architecture, kwargs=dict(kwargs))

    @property
    def phantom_name(self) -> str:
        """Names the phantom folder, so data of different scales never mix."""
        fov = "" if self.field_of_view == 1.0 else f"-fov{self.field_of_view:g}"
        return f"phantom-{self.patients}p-{self.slices_per_patient}z-{self.size}px{fov}-s{self.phantom_seed}"

    def phantom_config(self) -> PhantomConfig:
        return PhantomConfig(
            size=self.size, slices_per_patient=self.slices_per_patient, field_of_view=self.field_of_view
        )


@dataclass(frozen=True)
class NoiseSpec:
    """Noisy training labels: a noise family, its erode-dilate level (None: the reference
    setting, 2 to 4 iterations per slice) and the seed of the noise draw; `noisy_val`: the
    validation masks get the same noise (independent draws), so checkpoints are chosen as a
    user's would be. The training masks are the same either way."""

    family: str = "erode-dilate"
    level: int | None = None
    seed: int = 0
    noisy_val: bool = True

    @property
    def training_seed(self) -> int:
        """The seed the network trains with: 0, except on clean labels (level 0), where a noise
        seed would change nothing and so seeds the training instead: level 0's spread over seeds
        is the training's own."""
        return self.seed if self.level == 0 else 0

    @property
    def name(self) -> str:
        level = "ref" if self.level is None else f"L{self.level}"
        return f"{self.family}-{level}-s{self.seed}" + ("-noisyval" if self.noisy_val else "")

    @property
    def splits(self) -> tuple[str, ...]:
        """The splits `data corrupt` corrupts."""
        return ("train", "val") if self.noisy_val else ("train",)


@dataclass(frozen=True)
class RunSpec:
    """One training run of an experiment."""

    experiment: str
    method: str
    noise: NoiseSpec
    architecture: str = "unet"
    overrides: tuple[str, ...] = ()  # configuration overrides of a variant (`--set` syntax)

    @property
    def name(self) -> str:
        """The method, with a variant's overrides: `arm` or `arm@arm.lr=0.01`."""
        return "@".join([self.method, *self.overrides])

    @property
    def relative_dir(self) -> Path:
        return Path(self.experiment) / self.noise.name / self.name


# ----------------------------------------------------------------------------- the plan


def experiment_runs(
    experiment: str, seeds: Sequence[int], levels: Sequence[int], noisy_val: bool = True
) -> list[RunSpec]:
    """The runs of one experiment: `seeds` are noise seeds, `levels` the ladder's levels;
    `noisy_val`: checkpoints chosen on noisy validation masks (else on the clean ones)."""
    if experiment == "table1":
        return [
            RunSpec("table1", m, NoiseSpec(seed=s, noisy_val=noisy_val), overrides=v)
            for s in seeds
            for m, v in TABLE1_RUNS
        ]
    if experiment == "ladder":
        return [
            RunSpec("ladder", m, NoiseSpec(level=lv, seed=s, noisy_val=noisy_val), overrides=v)
            for s in seeds
            for lv in levels
            for m, v in LADDER_RUNS
        ]
    if experiment == "coarse":
        return [
            RunSpec("coarse", m, NoiseSpec("coarse", seed=s, noisy_val=noisy_val), "deeplabv3plus")
            for s in seeds
            for m in COARSE_METHODS
        ]
    if experiment == "armstudy":
        return [
            RunSpec("armstudy", m, NoiseSpec("coarse", seed=s, noisy_val=noisy_val), "deeplabv3plus", v)
            for s in seeds
            for m, v in ARM_STUDY
        ]
    raise ValueError(f"unknown experiment {experiment!r}; choose from {', '.join(EXPERIMENTS)}")


def check_levels(levels: Sequence[int]) -> None:
    bad = [level for level in levels if not 0 <= level < len(LEVEL_ITERATIONS)]
    if bad:
        raise ValueError(f"--levels: erode-dilate levels are 0..{len(LEVEL_ITERATIONS) - 1}, got {bad}")


# ----------------------------------------------------------------------------- data, built once


def _build_once(target: Path, build: Callable[[Path], Any]) -> Path:
    """Build a folder with `build(tmp)` beside `target` and rename it into place, unless it
    exists. Two processes may race: the first rename wins and the loser drops its copy."""
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        build(tmp / "out")
        try:
            os.rename(tmp / "out", target)
        except OSError as err:
            if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            log.info("%s was built by another process meanwhile; using it", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def data_paths(root: Path, scale: Scale, noise: NoiseSpec) -> tuple[Path, Path]:
    """(phantom folder, noisy-label folder) of `scale` and `noise` under `root/data`."""
    phantom = root / "data" / scale.phantom_name
    return phantom, phantom.with_name(f"{scale.phantom_name}-{noise.name}")


def ensure_data(root: Path, scale: Scale, noise: NoiseSpec) -> tuple[Path, Path]:
    """The phantom and the noisy training labels of a run, each generated once."""
    phantom, labels = data_paths(root, scale, noise)
    _build_once(phantom, lambda out: generate_phantom(out, scale.patients, scale.phantom_seed, scale.phantom_config()))
    _build_once(
        labels,
        lambda out: corrupt_dataset(
            phantom, out, noise.family, level=noise.level, seed=noise.seed, splits=noise.splits
        ),
    )
    return phantom, labels


def annotation_quality(root: Path, scale: Scale, noise: NoiseSpec) -> dict[str, Any] | None:
    """The measured annotation IoUs of a noisy-label folder (its noise.json), once built."""
    path = data_paths(root, scale, noise)[1] / NOISE_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


# ----------------------------------------------------------------------------- runs


def train_config(
    scale: Scale,
    method: str,
    data: Path,
    labels: Path | None,
    out: Path,
    architecture: str = "unet",
    quiet: bool = True,
    seed: int = 0,
    schedule: str = "constant",
) -> TrainConfig:
    """The trainer configuration of one run at `scale` (every other field keeps its default,
    except `adele.fork`: a method is measured alone, and `FORKED_ADELE` measures the fork)."""
    return TrainConfig(
        data=str(data),
        labels=None if labels is None else str(labels),
        out=str(out),
        method=method,
        epochs=scale.epochs,
        batch_size=scale.batch_size,
        seed=seed,
        quiet=quiet,
        model=scale.model(architecture),
        optim=replace(OptimConfig(), lr=scale.lr, momentum=scale.momentum, schedule=schedule),
        adele=AdeleConfig(fork=False),
    )


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def run_lock(lock_path: Path) -> Iterator[bool]:
    """Hold `lock_path` (created exclusively, holding our pid) for one run; yields False when a
    live process holds it. A lock left by a dead process is taken over."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = int(lock_path.read_text().strip() or 0)
            except (OSError, ValueError):
                holder = 0
            if holder and _process_alive(holder):
                yield False
                return
            log.warning("%s: removing a stale lock of process %s", lock_path, holder or "?")
            with contextlib.suppress(FileNotFoundError):
                lock_path.unlink()
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(f"{os.getpid()}\n")
        try:
            yield True
        finally:
            with contextlib.suppress(FileNotFoundError):
                lock_path.unlink()
        return
    yield False


# "done": the summary existed; "trained": trained or resumed now; "busy": another process has it.
RunStatus = Literal["done", "trained", "busy"]


def run_experiment_step(
    spec: RunSpec, root: Path, scale: Scale, train: Callable[[TrainConfig, bool], Any], quiet: bool = True
) -> RunStatus:
    """Make sure `spec` has a summary: skip it, resume it, or train it; `train(config, resume)`."""
    run_dir = root / "runs" / spec.relative_dir
    if RunDir(run_dir).is_finished():
        return "done"
    with run_lock(run_dir.parent / f".{spec.name}.lock") as acquired:
        if not acquired:
            log.info("%s: another process is training it; skipped", run_dir)
            return "busy"
        if RunDir(run_dir).is_finished():  # finished while we waited for the lock
            return "done"
        phantom, labels = ensure_data(root, scale, spec.noise)
        config = train_config(
            scale,
            spec.method,
            phantom,
            labels,
            run_dir,
            spec.architecture,
            quiet,
            spec.noise.training_seed,
            SCHEDULES.get(spec.experiment, "constant"),
        )
        if spec.overrides:
            config = config_from_dict(apply_overrides(config.to_dict(), list(spec.overrides)))
        resume = RunDir(run_dir).has_config()
        log.info("%s %s", "resuming" if resume else "training", run_dir)
        train(config, resume)
        return "trained"


def run_experiments(
    root: Path, specs: Sequence[RunSpec], scale: Scale, train: Callable[[TrainConfig, bool], Any], quiet: bool = True
) -> dict[str, int]:
    """Bring every run of `specs` to a summary, in order; returns counts per status. Runs that
    another process holds are retried once at the end (it may have died meanwhile)."""
    counts = {"done": 0, "trained": 0, "busy": 0}
    busy = []
    for spec in tqdm(specs, desc="experiment runs", unit="run", disable=quiet):
        status = _timed_step(spec, root, scale, train, quiet)
        if status == "busy":
            busy.append(spec)
        else:
            counts[status] += 1
    for spec in busy:
        counts[_timed_step(spec, root, scale, train, quiet)] += 1
    return counts


def _timed_step(
    spec: RunSpec, root: Path, scale: Scale, train: Callable[[TrainConfig, bool], Any], quiet: bool
) -> RunStatus:
    """`run_experiment_step`, recording the wall and CPU time of a run it trains."""
    wall, cpu = time.monotonic(), time.process_time()
    status = run_experiment_step(spec, root, scale, train, quiet)
    if status == "trained":
        timing = {
            "wall_seconds": round(time.monotonic() - wall, 1),
            "cpu_seconds": round(time.process_time() - cpu, 1),
            "torch_threads": torch.get_num_threads(),
        }
        atomic_write_json(root / "runs" / spec.relative_dir / TIMING_FILE, timing)
        log.info("%s: %s", spec.relative_dir, timing)
    return status

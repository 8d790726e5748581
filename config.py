"""Training configuration: typed dataclasses, read from YAML, overridden by `key.sub=value`.

Every hyperparameter of the ADELE and ARM papers is a field with the paper's default; where the
paper is silent the default follows the ADELE reference code and the docstring says so (see
`docs/architecture.md` and the shared method specification, sections 2 to 5).

A YAML file mirrors the dataclasses::

    method: adele
    epochs: 100
    adele: {r: 0.9, tau: 0.7, correction_timing: iteration}
    model: {architecture: unet, kwargs: {base_width: 16}}

and overrides use dotted keys: `adele.r=0.8`, `optim.lr=0.005`, `model.kwargs.base_width=8`.
Unknown keys and values of the wrong type are errors naming the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from noisyseg.io import read_text
from noisyseg.method_table import METHODS

# Fields that may differ between a run and its resumption: they change nothing already computed.
# `--device` and `--precision` values (resolved to torch objects by `runtime/device.py`; kept
# here so that reading a configuration does not import torch).
DEVICES = ("auto", "cpu", "cuda", "cuda:N")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def valid_device_name(name: str) -> bool:
    """`auto`, `cpu`, `cuda` or `cuda:N` (syntax only; availability is checked when resolved)."""
    if name in ("auto", "cpu", "cuda"):
        return True
    prefix, _, index = name.partition(":")
    return prefix == "cuda" and index.isdigit()


# A checkpoint written on one device or precision resumes on another (`device`, `precision`,
# `model.compile` change speed and rounding, not the method).
RESUMABLE_FIELDS = (
    "epochs",
    "quiet",
    "out",
    "threads",
    "device",
    "precision",
    "model.compile",
    "distributed.timeout_s",
    "distributed.verify_replicas",
)


@dataclass
class ModelConfig:
    """The network: a `noisyseg.models` name and its constructor arguments.

    The default is a CPU-sized UNet (the paper's is base_width 64 at 256 px). `compile` runs the
    network through `torch.compile` (off by default: compiling costs tens of seconds up front,
    and on the CPU it measured slower than eager for this UNet, docs/benchmarks.md).
    """

    architecture: str = "unet"
    kwargs: dict[str, Any] = field(default_factory=lambda: {"base_width": 16, "depth": 4})
    compile: bool = False


@dataclass
class OptimConfig:
    """SGD for the network. lr 0.01 is the ADELE paper's (searched) value. Momentum 0.9 (the
    ARM paper's and ADELE's VOC setting); the ADELE SegTHOR reference code uses 0.99, which made
    the CPU-sized UNet diverge on the phantom (training loss rising from epoch 2 on, where 0.9
    falls steadily). No weight decay, as the ADELE reference code.

    schedule: `constant` (ADELE SegTHOR), `poly` (lr * (1 - it / T)^poly_power) or `multistep`
        (the ARM paper's: linear warm-up from lr / 100 over 0.05T, x0.1 at 0.6T, x0.01 at 0.9T).
    optimizer: `sgd` (both papers) or `adam` (momentum then sets Adam's beta1; beta2 0.999).
        ARM's optimiser is of the same kind, ascending (`maximize=True`).
    """

    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "constant"
    poly_power: float = 0.9


# How the trigger's curve fit weighs the epochs (`adele.fit_sigma`), and when the consistency term starts.
FIT_WEIGHTS = ("equal", "reference")
CONSISTENCY_STARTS = ("always", "first_trigger")


def _choice(value: str, field_name: str, options: tuple[str, ...]) -> tuple[bool, str, str]:
    """A check of `validate`'s list for a field that takes one of `options` ('a', 'b' or 'c')."""
    quoted = [f"'{option}'" for option in options]
    return value in options, field_name, ", ".join(quoted[:-1]) + " or " + quoted[-1]


@dataclass
class AdeleConfig:
    """ADELE (method-spec sections 2 to 4); defaults are the paper's SegTHOR values (Table 7).

    lam, rho: consistency weight and confidence threshold; rho_mask `image` (paper and reference
        code) or `pixel`.
    scales: input scales for multiscale training (the paper's 1.0, 0.7, 1.5).
    r: relative slope drop that starts correction of a class; min_fit_points: fewest epochs fitted;
    min_rise: the fitted curve must have risen this much since epoch 1 (noisyseg's guard against
        triggering on a class the network does not predict yet; 0 = the papers' rule alone).
    trigger_epochs: epochs in a row the rule must hold before a class triggers, each judged on the
        fit of the history up to it (1 = the paper: the first epoch it holds). A fit on the first
        few points can take a temporary plateau for the end of early learning: on clean phantom
        labels the heart triggered at epochs 6 and 9 and lost 10 points (docs/results.md).
    fit_weights: `equal` (every epoch alike, the default) or `reference` (the reference code's
        sigma = geomspace(1, 0.1): the latest epoch weighs 100x the first; it fires at epoch 5
        or earlier on noisy slow rises, `docs/method.md`).
    tau: confidence above which a pixel's label may be replaced by the prediction.
    correction_timing: `iteration` (paper, SegTHOR: the batch's own outputs after each step) or
        `epoch` (outputs recomputed at the end of the epoch without augmentation). `auto` (the
        default) is `iteration` without random augmentation and `epoch` with it: that is the
        ADELE paper's rule (its VOC experiments correct after the epoch), because an augmented
        view's prediction is of a rescaled, cropped, jittered image, so it is less confident and
        covers only part of the image, while the clean whole-image multiscale pass corrects every
        pixel from the view the correction is meant for. `iteration` with augmentation maps each
        crop's corrections back through its flip and crop (exact); with random rescaling that
        inversion would resample the labels, so it is refused with a clear message.
    correction_every: correct at every epoch after the trigger (1, the paper) or only at the
        trigger epoch and at epochs that are multiples of this (10 in the reference code).
    correction_prediction: `multiscale` (paper: the average of the scales' softmax) or `single`
        (reference code: the scale-1.0 softmax).
    correction_flip: `epoch` timing also averages each scale's horizontally flipped view (as
        multiscale-and-flip testing does; off by default: the SegTHOR setting has no flips).
    refuse_absent_classes: never add an organ that is absent from the slice's current label
        (reference code behaviour, on by default). With `iteration` timing on random crops the
        check sees the crop, not the whole image: stricter (a class outside the crop is refused).
    guard: stop a class's correction for good, and give back the pixels it erased, when the
        class's labelled area falls below `guard_min_area` of its annotated area (noisyseg's guard
        against erasing a class the network has learned; on by default, `adele.py` says why).
    logit_divisor: the reference code divides logits by 3 before its CE, and only there (the
        consistency term, its rho mask and the correction see the undivided logits; a temperature
        the paper never mentions); 1.0 = off, the default.
    consistency_start: `first_trigger` (noisyseg's default): in a method that corrects labels,
        the consistency term only from the epoch after the first class triggered; `always`: the
        paper's, from the first step (docs/method.md and docs/results.md say why).
    fork: at the first trigger, also continue the run as the method's `branch` (`method_table.py`)
        and keep the model that scores higher on the validation masks (`training/fork.py`).
    """

    lam: float = 1.0
    rho: float = 0.8
    rho_mask: str = "image"
    scales: list[float] = field(default_factory=lambda: [1.0, 0.7, 1.5])
    r: float = 0.9
    min_fit_points: int = 3
    min_rise: float = 0.05
    trigger_epochs: int = 1
    fit_weights: str = "equal"
    tau: float = 0.7
    correction_timing: str = "auto"
    correction_every: int = 1
    correction_prediction: str = "multiscale"
    correction_flip: bool = False
    refuse_absent_classes: bool = True
    guard: bool = True
    guard_min_area: float = 0.5
    logit_divisor: float = 1.0
    consistency_start: str = "first_trigger"
    fork: bool = True


@dataclass
class ArmConfig:
    """ARM (method-spec section 5). Its SGD ascends (`maximize=True`) with the network's lr.

    warmup_fraction: the first fraction of all iterations trains network and ARM in isolation.
    lr: ARM's learning rate (following the network's schedule); None = the network's (the ARM
        paper's rule, with its DeepLab lr 0.01). A network lr raised for a small model raises
        ARM's steps with it; this keeps them where the paper had them.
    momentum: ARM's SGD momentum; None = the network's (the ARM paper gives no separate value).
    """

    warmup_fraction: float = 0.05
    lr: float | None = None
    momentum: float | None = None


@dataclass
class LossConfig:
    """Loss alternatives and the loss backend passed to `noisyseg.kernels` (`auto`, `torch`, ...).

    tloss_log_nu: the T-Loss's learned log-tolerance at the start (nu = exp(log_nu); 1.0, the
        authors' code's default, starts at nu = 2.72); the network's optimiser trains it.
    """

    backend: str = "auto"
    gce_q: float = 0.7
    ohem_threshold: float = 0.7
    # Per image; 15% of a 256x256 slice as in `noisyseg.methods.losses`.
    ohem_min_kept: int = 10_000
    tloss_log_nu: float = 1.0


@dataclass
class AugmentConfig:
    """Random augmentation of training items (mmsegmentation's recipe; every switch off by
    default, so the phantom trains on whole, untouched slices as before).

    rescale: resize by a factor drawn uniformly from `scale_range` (bilinear image, nearest
        labels), as mmsegmentation's `RandomResize` with `ratio_range`.
    crop_size: [height, width] of a random crop; an image smaller than that is padded (image with
        0 after normalisation, labels with the ignore index). Needed when the images of the
        training split differ in size (batches are stacked crops). Empty = no crop.
    flip: horizontal flip with probability 0.5.
    jitter: photometric jitter after normalisation: brightness (an added offset up to
        `brightness`) and contrast (a factor in [1 - contrast, 1 + contrast]), per image.
    label_elastic: NSegment's label-only elastic deformation (Kim et al., 2025): with probability
        `label_elastic_p` the mask trained on (never the image, never the annotations and clean
        masks the diagnostics compare with) is warped, nearest neighbour, by a displacement field
        of uniform noise in [-1, 1] per pixel and axis, Gaussian-smoothed with a sigma drawn from
        `label_elastic_sigma` and scaled by an alpha drawn from `label_elastic_alpha` (pixels of
        the image at its own size, before any rescale or crop). The default lists are the
        authors' code's (alpha 1 to 100, sigma 3 to 10, for 512 px and larger images). Their code's
        suppression of deformations on components under 1000 pixels is not applied: it would
        freeze every organ of a 96 px phantom.
    """

    rescale: bool = False
    scale_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    crop_size: list[int] = field(default_factory=list)
    flip: bool = False
    jitter: bool = False
    brightness: float = 0.2
    contrast: float = 0.2
    label_elastic: bool = False
    label_elastic_p: float = 0.5
    label_elastic_alpha: list[float] = field(default_factory=lambda: [1.0, 15.0, 30.0, 50.0, 100.0])
    label_elastic_sigma: list[float] = field(default_factory=lambda: [3.0, 5.0, 10.0])

    @property
    def random(self) -> bool:
        """Whether any random augmentation is switched on."""
        return self.rescale or bool(self.crop_size) or self.flip or self.jitter or self.label_elastic


@dataclass
class LoaderConfig:
    """How training items reach the network (`data/pipeline.py`).

    cache: `true` loads each split into memory once (every image of one size, no random
        augmentation; the training split then lives on the training device as one array, the
        fastest path for small sets); `false` reads every item from disk when a batch needs it,
        through a `torch.utils.data.DataLoader`, so memory does not grow with the dataset.
        Empty (the default): cached for noisyseg's folder layout (the phantom and SegTHOR slices)
        unless augmentation is on, streamed for every other layout.
    num_workers: DataLoader worker processes; -1 (the default) = the CPU count minus one, at
        most 8; 0 reads in the training process. Workers persist across epochs.
    pin_memory: page-locked batches for faster copies to a CUDA device (ignored on the CPU).
    eval_window: evaluate images larger than this (height or width, pixels) with a sliding
        window of this size (overlap `eval_overlap`, probabilities averaged); 0 = whole images.
    """

    cache: bool | None = None
    num_workers: int = -1
    pin_memory: bool = True
    eval_window: int = 0
    eval_overlap: float = 0.33
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class DistributedConfig:
    """Multi-process training under torchrun (`docs/distributed.md`); ignored by one process.

    backend: `auto` (nccl when the ranks train on CUDA GPUs, else gloo), `gloo` or `nccl`.
    timeout_s: bound on every collective; a rank that dies or hangs makes the others stop with
        an error after at most this long instead of waiting forever.
    sync_batchnorm: normalise batch-norm layers over the global batch instead of each rank's shard.
    verify_replicas: after every epoch, check that all ranks hold identical weights, ARM, trigger
        state and label store (a digest each; a mismatch stops the run).
    """

    backend: str = "auto"
    timeout_s: float = 300.0
    sync_batchnorm: bool = False
    verify_replicas: bool = True


@dataclass
class TrainConfig:
    """One training run. `data`: the data folder; `labels`: a folder of training masks replacing
    those in `data` (which then serve as clean references); `out`: the run directory.

    batch_size 5 and 100 epochs are the ADELE paper's SegTHOR values. `threads`: torch CPU
    threads; 1 by default because on a shared 2-core machine a second (spinning) thread made
    training steps several times slower; 0 keeps torch's default.

    device: `auto` (CUDA when this torch sees a GPU, else the CPU; the local rank's GPU under
        torchrun), `cpu`, `cuda` or `cuda:N`. precision: `auto` (bf16 on a CUDA GPU that has it,
        else fp32), `fp32`, `bf16` or `fp16` (autocast for the network; `runtime/device.py`).
    layout: the layout of `data`: `auto` (detected from its structure) or a name in
        `noisyseg.data.datasets.LAYOUTS` (`folder`, `cityscapes`, `voc`).
    layout_options: keyword arguments of that layout's reader, for example
        `{annotations: gtCoarse}` (Cityscapes: train on the coarse masks), `{aug: true}` (VOC:
        SBD's SegmentationClassAug with trainaug.txt) or `{pseudo_labels: DIR}` (VOC).
    """

    data: str = ""
    out: str = ""
    labels: str | None = None
    method: str = "adele"
    epochs: int = 100
    batch_size: int = 5
    eval_batch_size: int = 16
    seed: int = 0
    deterministic: bool = True
    threads: int = 1
    quiet: bool = False
    device: str = "auto"
    precision: str = "auto"
    layout: str = "auto"
    layout_options: dict[str, Any] = field(default_factory=dict)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    adele: AdeleConfig = field(default_factory=AdeleConfig)
    arm: ArmConfig = field(default_factory=ArmConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)

    def correction_timing(self) -> str:
        """`adele.correction_timing` with `auto` resolved (`epoch` under random augmentation)."""
        if self.adele.correction_timing != "auto":
            return self.adele.correction_timing
        return "epoch" if self.loader.augment.random else "iteration"

    def validate(self) -> TrainConfig:
        """Raise ValueError naming the first field with an impossible value; return self."""
        checks = [
            (self.method in METHODS, "method", f"one of {', '.join(METHODS)}"),
            (bool(self.data), "data", "a data folder"),
            (bool(self.out), "out", "a run directory"),
            (self.epochs >= 1, "epochs", "at least 1"),
            (self.batch_size >= 1, "batch_size", "at least 1"),
            (self.eval_batch_size >= 1, "eval_batch_size", "at least 1"),
            (self.threads >= 0, "threads", "0 (torch default) or more"),
            (valid_device_name(self.device), "device", f"one of {', '.join(DEVICES)}"),
            (self.precision in PRECISIONS, "precision", f"one of {', '.join(PRECISIONS)}"),
            (
                all(isinstance(key, str) for key in self.layout_options),
                "layout_options",
                "a mapping of option names to values",
            ),
            (self.optim.lr > 0, "optim.lr", "positive"),
            _choice(self.optim.schedule, "optim.schedule", ("constant", "poly", "multistep")),
            _choice(self.optim.optimizer, "optim.optimizer", ("sgd", "adam")),
            (0.0 <= self.optim.momentum < 1.0, "optim.momentum", "in [0, 1)"),
            (
                1.0 in self.adele.scales and all(s > 0 for s in self.adele.scales),
                "adele.scales",
                "positive scales including 1.0 (the unscaled view)",
            ),
            (0.0 <= self.adele.r < 1.0, "adele.r", "in [0, 1)"),
            (self.adele.min_fit_points >= 3, "adele.min_fit_points", "at least 3"),
            (0.0 <= self.adele.min_rise < 1.0, "adele.min_rise", "in [0, 1)"),
            (self.adele.trigger_epochs >= 1, "adele.trigger_epochs", "at least 1"),
            _choice(self.adele.fit_weights, "adele.fit_weights", FIT_WEIGHTS),
            (0.0 <= self.adele.tau < 1.0, "adele.tau", "in [0, 1)"),
            _choice(self.adele.rho_mask, "adele.rho_mask", ("image", "pixel")),
            _choice(self.adele.consistency_start, "adele.consistency_start", CONSISTENCY_STARTS),
            _choice(self.adele.correction_timing, "adele.correction_timing", ("auto", "iteration", "epoch")),
            (self.adele.correction_every >= 1, "adele.correction_every", "at least 1"),
            _choice(self.adele.correction_prediction, "adele.correction_prediction", ("multiscale", "single")),
            (self.adele.logit_divisor > 0, "adele.logit_divisor", "positive"),
            (0.0 < self.adele.guard_min_area < 1.0, "adele.guard_min_area", "in (0, 1)"),
            (0.0 <= self.arm.warmup_fraction <= 1.0, "arm.warmup_fraction", "in [0, 1]"),
            (self.arm.lr is None or self.arm.lr > 0, "arm.lr", "positive (or null: the network's)"),
            (0.0 < self.loss.gce_q <= 1.0, "loss.gce_q", "in (0, 1]"),
            (math.isfinite(self.loss.tloss_log_nu), "loss.tloss_log_nu", "a finite number (nu = exp(log_nu))"),
            _choice(self.distributed.backend, "distributed.backend", ("auto", "gloo", "nccl")),
            (self.distributed.timeout_s > 0, "distributed.timeout_s", "positive (seconds)"),
            (self.loader.num_workers >= -1, "loader.num_workers", "-1 (from the CPU count), 0 or more"),
            (self.loader.eval_window >= 0, "loader.eval_window", "0 (whole images) or a window size in pixels"),
            (0.0 <= self.loader.eval_overlap < 1.0, "loader.eval_overlap", "in [0, 1)"),
            (
                len(self.loader.augment.scale_range) == 2
                and 0 < self.loader.augment.scale_range[0] <= self.loader.augment.scale_range[1],
                "loader.augment.scale_range",
                "[low, high] with 0 < low <= high",
            ),
            (
                len(self.loader.augment.crop_size) in (0, 2) and all(s > 0 for s in self.loader.augment.crop_size),
                "loader.augment.crop_size",
                "[] or [height, width], positive",
            ),
            (
                self.loader.augment.brightness >= 0 and 0 <= self.loader.augment.contrast < 1,
                "loader.augment.brightness",
                "brightness >= 0 and contrast in [0, 1)",
            ),
            (
                not (self.loader.cache and self.loader.augment.random),
                "loader.cache",
                "false (or empty) when random augmentation is on: the cached split is the unaugmented one",
            ),
            (
                not (self.correction_timing() == "iteration" and self.loader.augment.rescale),
                "adele.correction_timing",
                "'epoch' (or 'auto') with loader.augment.rescale: a rescaled crop's predictions "
                "cannot be mapped back onto the stored labels without resampling them",
            ),
            (
                not (self.correction_timing() == "iteration" and self.loader.augment.label_elastic),
                "adele.correction_timing",
                "'epoch' (or 'auto') with loader.augment.label_elastic: "
                "corrections of a deformed mask would write the deformation into the stored labels",
            ),
            (0.0 <= self.loader.augment.label_elastic_p <= 1.0, "loader.augment.label_elastic_p", "in [0, 1]"),
            (
                bool(self.loader.augment.label_elastic_alpha)
                and all(a >= 0 for a in self.loader.augment.label_elastic_alpha),
                "loader.augment.label_elastic_alpha",
                "a non-empty list of displacement scales >= 0 (pixels)",
            ),
            (
                bool(self.loader.augment.label_elastic_sigma)
                and all(s > 0 for s in self.loader.augment.label_elastic_sigma),
                "loader.augment.label_elastic_sigma",
                "a non-empty list of smoothing sigmas > 0 (pixels)",
            ),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise ValueError(f"config field '{name}': expected {expected}, got {_lookup(self, name)!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def semantic_hash(self) -> str:
        """Hash of every field that shapes the results (all but RESUMABLE_FIELDS)."""
        return hashlib.sha256(json.dumps(semantic_fields(self), sort_keys=True).encode()).hexdigest()[:16]


def semantic_fields(config: TrainConfig) -> dict[str, Any]:
    """The configuration without RESUMABLE_FIELDS (dotted names reach into sections)."""
    values = config.to_dict()
    for name in RESUMABLE_FIELDS:
        *sections, key = name.split(".")
        node = values
        for section in sections:
            node = node[section]
        node.pop(key)
    return values


def _lookup(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check (and gently convert) `value` to the field type `annotation`; ValueError names `key`."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(value, option, key)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0])
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ValueError(f"config key '{key}': expected a mapping, got {value!r}")
        return _build(annotation, value, prefix=f"{key}.")
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        # YAML 1.1 reads exponent notation without a dot (1e-6) as a string.
        if (isinstance(value, (int, float)) and not isinstance(value, bool)) or (
            isinstance(value, str) and re.fullmatch(r"[-+]?\d+[eE][-+]?\d+", value.strip())
        ):
            try:
                number = float(value)
            except OverflowError:  # an integer beyond the float range
                number = math.inf
            # NaN passes every range check (all comparisons are false) and would surface much
            # later, blamed on another field; infinity is no setting either.
            if not math.isfinite(number):
                raise ValueError(f"config key '{key}': expected a finite number, got {value!r}")
            return number
    elif annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # a path or name YAML happened to read as a number
    elif origin is list:
        if isinstance(value, (list, tuple)):
            (item_type,) = typing.get_args(annotation)
            return [_coerce(item, item_type, f"{key}[{i}]") for i, item in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            return dict(value)
    else:  # pragma: no cover - a field type this module does not know is a programming error
        raise TypeError(f"config key '{key}': unsupported field type {annotation!r}")
    raise ValueError(f"config key '{key}': expected {getattr(annotation, '__name__', annotation)}, got {value!r}")


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
            f"known: {', '.join(sorted(prefix + n for n in names))}"
        )
    return cls(**{name: _coerce(value, hints[name], prefix + name) for name, value in values.items()})


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from a (possibly partial) nested mapping; missing fields keep defaults."""
    if not isinstance(values, dict):
        raise ValueError(f"configuration must be a mapping of keys to values, got {type(values).__name__}")
    return _build(TrainConfig, values)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """The nested mapping of a YAML (or JSON) configuration file."""
    path = Path(path)
    try:
        values = yaml.safe_load(read_text(path, "configuration file"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: configuration file not found") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({err})") from err
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of config keys at the top level, got {type(values).__name__}")
    return values


def parse_override(text: str) -> tuple[list[str], Any]:
    """`adele.r=0.8` -> (["adele", "r"], 0.8); the value is read as YAML (numbers, bools, lists)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override '{text}': expected KEY=VALUE, for example adele.r=0.8")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ValueError(f"override '{text}': value is not valid YAML ({err})") from err
    return key.strip().split("."), value


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys in a copy of the nested mapping `values` (validated later by the types)."""
    result = json.loads(json.dumps(values))
    for text in overrides:
        path, value = parse_override(text)
        node = result
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"override '{text}': '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return result


def build_config(config_file: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Defaults <- YAML file <- overrides, then validated.

    Overrides apply to the complete configuration, so `model.kwargs.base_width=8` changes one
    constructor argument and keeps the others.
    """
    from_file = config_from_dict(load_config_file(config_file) if config_file else {})
    return config_from_dict(apply_overrides(from_file.to_dict(), overrides or [])).validate()

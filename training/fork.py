"""`adele.fork`: an ADELE run that ends with the better of itself and the baseline it starts as.

Until its first trigger, `adele` (with `adele.consistency_start=first_trigger`, the default)
trains exactly as `baseline-ms`: the same steps and the same weights, bit for bit. So at the
first trigger (epoch t) the run keeps the checkpoint and the selected model of epoch t - 1
(`fork_point/`), and when it has trained all its epochs a run of the method's `branch`
(`method_table.py`: `baseline-ms`) continues from them in `branch/` to the same end. The
`baseline-ms` run of the same seed is the branch (`tests/test_fork.py` checks it). The run then
keeps ADELE's model unless the branch's selected model scores higher on the validation masks
it selects on (noisy-val or clean-val, `selection.py`) beyond their sampling noise: in at least
`FORK_CONFIDENCE` (95%) of paired bootstrap resamples of the validation images
(`metrics.bootstrap_win_probability`). `model.safetensors` then becomes a copy of the branch's,
and `summary.json`'s `fork` says which run was kept and why.

Why: on clean or lightly noisy labels ADELE's early triggers can only make labels wrong, and no
user knows their noise level. Over 31 paired phantom runs (docs/results.md, seventh session) the
validation masks chose the better of `adele` and `baseline-ms` in 24, were never more than 1.5
points below `baseline-ms`, and kept ADELE's gains at medium noise. The higher score alone gave
up ADELE's gain in 5 of 31 pairs, four of them (levels 4 to 6) on 0.3 to 1.9 points: noisy
validation masks understate ADELE's advantage (2.0 points on average over 22 pairs, against the
clean masks of the same images), and 30 validation images order two close models as the test
set does only by chance (eighth session). Hence the test: ADELE, the method asked for, is given
up only on clear evidence.

Cost: the branch's epochs, from the first trigger to the end (epochs 6 to 33 of 100 on the
phantom at low and medium noise: 1.68 to 1.95 trainings' epochs; heavy noise triggers late or
never), and two evaluations of the validation split. With no validation masks nothing can judge
the two runs, so no fork is made (`label-free` rules); with `consistency_start=always` the
branch leaves out the correction and the consistency term from epoch t on.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from noisyseg.config import TrainConfig
from noisyseg.evaluation.inference import per_image_confusion
from noisyseg.evaluation.metrics import bootstrap_win_probability
from noisyseg.io import atomic_write_bytes
from noisyseg.method_table import METHOD_SPECS
from noisyseg.models.model_file import load_model
from noisyseg.run.checkpoint import adopt_checkpoint, find_checkpoint
from noisyseg.run.run_dir import CHECKPOINT_DIR, MODEL_FILE, RunDir
from noisyseg.training.selection import RULE_SPLITS

if TYPE_CHECKING:
    from noisyseg.training.loop import Trainer

log = logging.getLogger(__name__)

# The branch replaces ADELE's model only when it scores higher in this fraction of the paired
# bootstrap resamples of the validation images (a one-sided test at the conventional 5%).
FORK_CONFIDENCE = 0.95
BOOTSTRAP_DRAWS = 2000


def forks(config: TrainConfig, rule: str) -> bool:
    """Whether a run of `config` selecting its model by `rule` forks at its first trigger."""
    return config.adele.fork and METHOD_SPECS[config.method].branch is not None and rule in RULE_SPLITS


def keep_fork_point(run: RunDir) -> None:
    """Copy the run's last checkpoint and selected model (those of the epoch before the first
    trigger; there is one: a class triggers at epoch `adele.min_fit_points` >= 3 at the earliest)
    into `fork_point/`, replacing it whole."""
    checkpoint = find_checkpoint(run.path)
    assert checkpoint is not None, f"{run}: no checkpoint before the first trigger"
    final = run.fork_point_dir
    staging = final.with_name(final.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(checkpoint, staging / CHECKPOINT_DIR)
    shutil.copy2(run.model_file, staging / MODEL_FILE)
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    log.info("adele.fork: the first trigger; %s holds the state the branch starts from", final)


def branch_config(config: TrainConfig) -> TrainConfig:
    branch = METHOD_SPECS[config.method].branch
    assert branch is not None
    return replace(config, method=branch, out=str(RunDir(config.out).branch_dir))


def start_branch(run: RunDir, config: TrainConfig) -> None:
    """Make the branch (`config`, from `branch_config`) start from `fork_point/`, then remove
    that; once it is gone, the branch has started (and resumes from its own checkpoint)."""
    branch, point = RunDir(config.out), run.fork_point_dir
    if not point.is_dir():
        return
    if not branch.has_config():
        branch.prepare(config, resume=False)
    adopt_checkpoint(point / CHECKPOINT_DIR, branch, config)
    atomic_write_bytes(branch.model_file, (point / MODEL_FILE).read_bytes())
    shutil.rmtree(point)


def selected_models_confusion(trainer: Trainer, run: RunDir, rule: str) -> np.ndarray:
    """(2, images, C, C): the per-image confusion matrices of ADELE's selected model and then the
    branch's on the validation split that `rule` selects on, predicted as the trainer evaluates
    (its device, precision, window)."""
    split = trainer.data.noisy_val if rule == "noisy-val" else trainer.data.val
    loader, matrices = trainer.config.loader, []
    for path in (run.model_file, RunDir(run.branch_dir).model_file):
        model = load_model(path)[0].to(trainer.device)
        with trainer.precision.autocast(trainer.device):
            matrices.append(
                per_image_confusion(
                    model,
                    split,
                    trainer.data.num_classes,
                    trainer.ignore_index,
                    trainer.config.eval_batch_size,
                    loader.eval_window,
                    loader.eval_overlap,
                )
            )
    return np.stack(matrices)


def fork_summary(
    summary: dict[str, Any],
    branch_summary: dict[str, Any],
    method: str,
    branch: str,
    fork_epoch: int,
    confusion: np.ndarray,
) -> dict[str, Any]:
    """`summary.json`'s `fork` entry: where the branch started, both runs' scores on the
    validation masks and on the test masks at their selected epochs, how often the branch
    scored higher over bootstrap resamples of the validation images (`confusion`, from
    `selected_models_confusion`; None when a run has no validation score) and the run kept."""
    runs = {method: summary, branch: branch_summary}
    val = {name: s["selection"]["val_miou"] for name, s in runs.items()}
    test = {name: s["test_miou_at"][s["selection"]["rule"]] for name, s in runs.items()}
    scored = None not in val.values()
    p_branch = bootstrap_win_probability(confusion[0], confusion[1], BOOTSTRAP_DRAWS) if scored else None
    return {
        "epoch": fork_epoch,
        "branch": branch,
        "kept": branch if p_branch is not None and p_branch >= FORK_CONFIDENCE else method,
        "val_miou": val,
        "test_miou": test,
        "p_branch_better": p_branch,
        "confidence": FORK_CONFIDENCE,
    }


def keep_branch_model(run: RunDir) -> None:
    """`model.safetensors` becomes a copy of the branch's (its metadata names its method and epoch)."""
    atomic_write_bytes(run.model_file, RunDir(run.branch_dir).model_file.read_bytes())

"""The numba loss kernels of several commits side by side in one process, against plain CE.

``.venv/bin/python benchmarks/kernel_commits.py REV [REV ...] [--classes 5] [--scales 3]
[--logit-scale 1] [--rounds 15]`` copies `kernels/numba_*.py` of each REV (``git show``) into a
temporary folder as a package of its own, and times forward + backward of the loss through each
copy's public function (`multiscale_loss` for several scales, the benchmark's ADELE+ARM terms;
`arm_cross_entropy` for one), at (4, C, 256, 256) on one thread, beside three (or one) plain
`F.cross_entropy`. Name the first REV twice to get a control: two copies of the same code.

Every variant runs right after a plain CE, in an order that rotates each round: a fused call that
follows plain CE ran up to 8% slower than one that follows another fused call, which biased the
first scripts of this kind (docs/benchmarks.md, "Thirteenth session"). Prints each variant's
median, its ratio to plain CE and to the first REV's, and the median minor page faults per call.
"""

from __future__ import annotations

import argparse
import importlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_kernels import make_inputs, seeded_arm

from noisyseg.kernels.contract import LossTerms

ROOT = Path(__file__).resolve().parents[1]
KERNEL_PREFIX = "noisyseg.kernels.numba_"


def snapshot(rev: str, package: str, folder: Path) -> None:
    """The numba kernel files of `rev` as package `package` under `folder`."""
    names = subprocess.run(
        ["git", "ls-tree", "--name-only", rev, "kernels/"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    target = folder / package
    target.mkdir()
    (target / "__init__.py").write_text("")
    for name in names:
        if Path(name).name.startswith("numba_"):
            text = subprocess.run(
                ["git", "show", f"{rev}:{name}"], cwd=ROOT, capture_output=True, text=True, check=True
            )
            (target / Path(name).name).write_text(text.stdout.replace(KERNEL_PREFIX, f"{package}.numba_"))


def timed(loss: Callable, logits: list[torch.Tensor]) -> tuple[float, int]:
    """Milliseconds and minor page faults of one forward + backward."""
    leaves = [z.detach().requires_grad_(True) for z in logits]
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    started = time.perf_counter()
    loss(leaves).backward()
    return (time.perf_counter() - started) * 1e3, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("revs", nargs="+")
    parser.add_argument("--classes", type=int, default=5)
    parser.add_argument("--scales", type=int, default=3)
    parser.add_argument("--logit-scale", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    logits, target = make_inputs((4, args.classes, 256, 256), args.scales)
    logits = [z * args.logit_scale for z in logits]
    arm = seeded_arm()
    several = args.scales > 1
    terms = LossTerms.adele_arm(args.scales) if several else LossTerms.cross_entropy()
    cases: dict[str, Callable] = {}
    with tempfile.TemporaryDirectory() as folder:
        sys.path.insert(0, folder)
        for number, rev in enumerate(args.revs):
            package = f"kernels_{number}"
            snapshot(rev, package, Path(folder))
            module = importlib.import_module(f"{package}.numba_adele_arm")
            name = f"{number}:{rev}"
            cases[name] = (
                (lambda z, m=module: m.multiscale_loss(z, target, arm, terms))
                if several
                else (lambda z, m=module: m.arm_cross_entropy(z, target, arm, terms))
            )

        def plain(z: list[torch.Tensor]) -> torch.Tensor:
            return sum(F.cross_entropy(x, target, ignore_index=255) for x in z)

        for loss in (plain, *cases.values()):  # compiles each copy (numba caches it in the folder)
            timed(loss, logits)
        times: dict[str, list[float]] = {"plain": [], **{name: [] for name in cases}}
        faults: dict[str, list[int]] = {name: [] for name in times}
        names = list(cases)
        for round_ in range(args.rounds):
            for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
                for case, loss in (("plain", plain), (name, cases[name])):
                    ms, faulted = timed(loss, logits)
                    times[case].append(ms)
                    faults[case].append(faulted)
    plain_ms, first = statistics.median(times["plain"]), statistics.median(times[names[0]])
    for name, values in times.items():
        median = statistics.median(values)
        print(
            f"{name:24s} {median:8.2f} ms  {median / plain_ms:6.3f}x plain  {median / first:6.3f}x first"
            f"  faults/call {int(statistics.median(faults[name]))}"
        )


if __name__ == "__main__":
    main()

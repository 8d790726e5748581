"""A Python that imports only what the GPU machines this project borrows have installed.

The machines (docs/benchmarks.md, "GPU check"; ../shared/notes/stack-notes.md) have Python with
torch, Triton, numpy, scipy, pyyaml, safetensors, pillow, tqdm, matplotlib, onnx, onnxruntime
(CPU), numba, timm, torchvision, pytest, pytest-benchmark and tensorboard, and nothing else:
no fastapi, nibabel, tritonclient, onnxscript, cityscapesscripts. `restricted_python` makes a
virtual environment holding this interpreter's copies of those packages and of their own
requirements, and nothing else, so a command run with it shows what a GPU machine would lack.
"""

from __future__ import annotations

import importlib.metadata as metadata
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

GPU_MACHINE_PACKAGES = (
    "torch", "triton", "numpy", "scipy", "pyyaml", "safetensors", "pillow", "tqdm", "matplotlib", "onnx",
    "onnxruntime", "numba", "timm", "torchvision", "pytest", "pytest-benchmark", "tensorboard",
    "pip", "setuptools", "wheel",  # Python's own installers
)  # fmt: skip


def _installed() -> dict[str, metadata.Distribution]:
    return {canonicalize_name(dist.metadata["Name"]): dist for dist in metadata.distributions()}


def allowed_distributions() -> set[str]:
    """The GPU machines' packages and, transitively, their requirements that are installed here
    (extras left out, environment markers evaluated for this interpreter), and noisyseg itself
    (`make gpu-check` installs it without its dependencies)."""
    installed = _installed()
    allowed: set[str] = set()
    pending = [canonicalize_name(name) for name in GPU_MACHINE_PACKAGES]
    while pending:
        name = pending.pop()
        if name in allowed or name not in installed:
            continue
        allowed.add(name)
        for line in installed[name].requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                pending.append(canonicalize_name(requirement.name))
    return allowed | {"noisyseg"}


def _top_level_entries(dist: metadata.Distribution) -> set[str]:
    """The names a distribution puts at the top of site-packages (packages, modules, its
    .dist-info, bundled shared libraries such as numpy.libs); scripts outside it are left out."""
    entries = set()
    for file in dist.files or []:
        first = Path(file).parts[0]
        if first not in ("..", "__pycache__") and not first.endswith(".pth"):
            entries.add(first)
    return entries


def missing_modules() -> list[str]:
    """Top-level modules installed here that a GPU machine lacks (for the report and tests)."""
    allowed = allowed_distributions()
    return sorted(
        module
        for module, dists in metadata.packages_distributions().items()
        if not any(canonicalize_name(dist) in allowed for dist in dists)
    )


def restricted_python(directory: Path) -> Path:
    """A virtual environment at `directory` whose site-packages holds links to the allowed
    distributions of this interpreter's (the others are not there at all, as on a GPU machine:
    a probe such as importlib.util.find_spec sees them missing); returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(directory)], check=True)
    python = directory / "bin" / "python"
    purelib = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    installed = _installed()
    for name in allowed_distributions() - {"noisyseg"}:  # noisyseg comes from the checkout or an install
        dist = installed[name]
        root = Path(dist.locate_file(""))
        for entry in _top_level_entries(dist):
            link = purelib / entry
            if not link.exists() and (root / entry).exists():
                link.symlink_to(root / entry)
    return python

"""`make kernels-compile OUT=DIR`: every Triton kernel the package launches, compiled for A100
(sm_80) and H100 (sm_90) without a GPU, with its register, spill and shared-memory use.

``python -m noisyseg.kernels.compile_report --out DIR [--jobs N] [--subset]``

Which specializations: the launchers are run (forward and backward, through the public loss
functions) on small CPU tensors with every kernel launch intercepted and recorded instead of
run, for logits in fp32, bf16 and fp16, NCHW and channels-last layouts, C in `CLASS_COUNTS`,
and every switch a caller can flip (ARM or none, ARM's table or exact path, the gradient
written or not, 1 to `contract.MAX_SCALES` scales, the consistency term on or off, both rho
masks). So block sizes, warps and constexpr flags are what `LaunchGeometry.for_shape` and the
launchers pick, never a copy of them. Each distinct specialization (argument types, the
divisibility and value-1 specializations Triton's own launcher makes, constexprs, warps) is
compiled once per architecture with ``triton.compile(ASTSource(...), target=GPUTarget("cuda",
arch, 32))``, and its figures are read from the compiled kernel: registers, stack and shared
memory from the cubin (``cuobjdump --dump-resource-usage``, shipped with Triton), spill stores
and loads from the ``ptxas -v`` log of that very compilation (Triton's cache is bypassed so
ptxas always runs). Integer arguments take the divisibility of a 64 x 64 image (other sizes
can differ only in those hints); images narrower than a tile pick narrower tiles, which use
fewer registers.

``DIR/report.json``: {"triton": version, "entries": [{kernel, arch, registers, spill_bytes
(stores + loads), spill_store_bytes, spill_load_bytes, stack_bytes, shared_bytes,
max_warps_per_sm, num_warps, constexprs, signature, cases, status}]}; ``DIR/report.md`` the
same as a table. Exit status 1 when a kernel fails to compile or spills. ``--subset`` compiles
the representative few `tests/test_kernels_compile.py` checks (bf16, C = 19, NCHW, ARM's table:
ARM-weighted CE and ADELE+ARM at 3 scales, forward and backward); ``--arch 90`` one target.

Nothing in the package imports this module.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ARCHS = (80, 90)
CLASS_COUNTS = (2, 5, 19, 21, 150)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LAYOUTS = ("nchw", "channels_last")
IMAGE = (2, 64, 64)  # N, H, W of the recorded launches (wider than every tile)
# What an SM offers (CUDA occupancy rules; identical on sm_80 and sm_90 except shared memory).
REGISTERS_PER_SM = 65536
REGISTER_ALLOCATION_UNIT = 256  # registers, per warp
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
SHARED_PER_SM = {80: 164 * 1024, 90: 228 * 1024}
SHARED_RESERVED_PER_BLOCK = 1024  # the driver's own shared memory per block


# ---------------------------------------------------------------------------------------------
# Recording the launches


@dataclass
class Specialization:
    """One compiled variant of one kernel, and every case that launches it."""

    module: str
    kernel: str
    signature: dict[str, str]
    constexprs: dict[str, Any]
    attrs: dict[str, list]
    options: dict[str, Any]
    cases: list[str] = field(default_factory=list)

    def key(self) -> str:
        return json.dumps(
            [self.module, self.kernel, self.signature, self.constexprs, self.attrs, self.options],
            sort_keys=True,
            default=str,
        )


def _specialize(fn, args: tuple, kwargs: dict) -> tuple[dict, dict, dict, dict]:
    """(signature, constexprs, attrs, options) exactly as Triton's launcher derives them."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    names = [p.name for p in fn.params]
    bound = dict(zip(names, args))
    options = {}
    for name, value in kwargs.items():
        if name in names:
            bound[name] = value
        else:
            options[name] = value
    signature, constexprs, attrs = {}, {}, {}
    for param in fn.params:
        value = bound[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[param.name] = "constexpr", value
            continue
        kind, attr = native_specialize_impl(
            BaseBackend,
            value,
            param.is_const,
            not param.do_not_specialize,
            not param.do_not_specialize_on_alignment,
        )
        signature[param.name] = kind
        if kind == "constexpr":  # an integer equal to 1
            constexprs[param.name] = attr
        elif isinstance(attr, str) and attr:
            attrs[param.name] = BaseBackend.parse_attr(attr)
    return signature, constexprs, attrs, options


@contextlib.contextmanager
def recorded_launches(record: Callable[[Any, tuple, dict], None]) -> Iterator[None]:
    """Every ``kernel[grid](*args, **kwargs)`` calls `record` instead of launching. The
    launchers validate devices with `triton_common.check_device`, which accepts CPU tensors
    while TRITON_INTERPRET=1: set here only, after the kernels were built as real JIT functions."""
    from triton.runtime.jit import JITFunction

    original = JITFunction.__getitem__
    interpret = os.environ.get("TRITON_INTERPRET")
    JITFunction.__getitem__ = lambda self, grid: lambda *args, **kwargs: record(self, args, kwargs)
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        JITFunction.__getitem__ = original
        if interpret is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = interpret


def _logits(num_classes: int, dtype: torch.dtype, layout: str, gen: torch.Generator) -> torch.Tensor:
    n, h, w = IMAGE
    z = torch.randn(n, num_classes, h, w, generator=gen).to(dtype)
    return z.to(memory_format=torch.channels_last) if layout == "channels_last" else z


def loss_cases(
    num_classes: int, dtype: torch.dtype, layout: str, subset: bool
) -> Iterator[tuple[str, Callable[[], None]]]:
    """(label, call) for every switch of the public losses on the Triton backend: each call runs
    forward and, where a gradient is asked for, backward."""
    from noisyseg.kernels import contract, functional
    from noisyseg.kernels.reference import ARM

    fused = functional.losses_on("triton")
    gen = torch.Generator().manual_seed(num_classes)
    n, h, w = IMAGE
    target = torch.randint(0, num_classes, (n, h, w), generator=gen)
    arm = ARM()

    def leaves(count: int, grad: bool) -> list[torch.Tensor]:
        return [_logits(num_classes, dtype, layout, gen).requires_grad_(grad) for _ in range(count)]

    def backward(loss: torch.Tensor) -> None:
        if loss.requires_grad:
            loss.backward()

    if subset:  # ARM's table on the two launch paths: ARM-weighted CE, and ADELE+ARM at 3 scales
        yield (
            "ce arm=table grad",
            lambda: backward(fused.arm_cross_entropy(leaves(1, True)[0], target, arm)),
        )
        yield (
            "adele S=3 arm=table lam=1 mask=image",
            lambda: backward(fused.adele_arm_loss(leaves(3, True), target, arm)),
        )
        return
    for mode in contract.ARM_MODES:
        for module in (arm, None) if mode == "table" else (arm,):
            label = f"ce arm={mode if module is not None else 'none'}"
            yield (
                f"{label} grad",
                lambda m=module, mode=mode: backward(
                    fused.arm_cross_entropy(leaves(1, True)[0], target, m, arm_mode=mode)
                ),
            )
            yield (
                f"{label} no-grad",
                lambda m=module, mode=mode: fused.arm_cross_entropy(leaves(1, False)[0], target, m, arm_mode=mode),
            )
        # ARM's own step: logits detached, ARM's parameters get the gradient
        yield (
            f"ce arm={mode} arm-step",
            lambda mode=mode: backward(fused.arm_cross_entropy(leaves(1, False)[0], target, arm, arm_mode=mode)),
        )
        for scales in range(1, contract.MAX_SCALES + 1):
            for module in (arm, None) if mode == "table" else (arm,):
                for lam in (1.0, 0.0):
                    for mask in contract.MASK_MODES if lam else ("image",):
                        label = f"adele S={scales} arm={mode if module is not None else 'none'} lam={lam:g} mask={mask}"
                        yield (
                            label,
                            lambda s=scales, m=module, lam=lam, mask=mask, mode=mode: backward(
                                fused.adele_arm_loss(leaves(s, True), target, m, lam=lam, mask=mask, arm_mode=mode)
                            ),
                        )
    for scales in range(1, contract.MAX_SCALES + 1):
        for mask in contract.MASK_MODES:
            yield (
                f"consistency S={scales} mask={mask}",
                lambda s=scales, mask=mask: backward(fused.multiscale_consistency(leaves(s, True), target, mask=mask)),
            )


def collect_specializations(subset: bool = False) -> list[Specialization]:
    """Run every case with launches recorded; the distinct specializations, in first-seen order."""
    found: dict[str, Specialization] = {}
    current = [""]

    def record(fn, args: tuple, kwargs: dict) -> None:
        signature, constexprs, attrs, options = _specialize(fn, args, kwargs)
        spec = Specialization(fn.fn.__module__, fn.fn.__name__, signature, constexprs, attrs, options)
        spec = found.setdefault(spec.key(), spec)
        spec.cases.append(current[0])

    # Import (and so build) the kernels as real JIT functions before the interpreter flag is set.
    from noisyseg.kernels import triton_adele_arm, triton_arm_cross_entropy  # noqa: F401

    # The subset: Cityscapes' 19 classes in bf16 (the GPU training dtype), NCHW, ARM's table.
    dtypes = (torch.bfloat16,) if subset else DTYPES
    class_counts = (19,) if subset else CLASS_COUNTS
    layouts = ("nchw",) if subset else LAYOUTS
    with recorded_launches(record):
        for dtype in dtypes:
            for num_classes in class_counts:
                for layout in layouts:
                    for label, call in loss_cases(num_classes, dtype, layout, subset):
                        current[0] = f"{str(dtype).removeprefix('torch.')} C={num_classes} {layout} {label}"
                        call()
    return list(found.values())


# ---------------------------------------------------------------------------------------------
# Compiling one specialization and reading its resources


def occupancy(arch: int, registers: int, shared_bytes: int, num_warps: int) -> int:
    """Resident warps per SM for blocks of `num_warps` warps (CUDA's occupancy rules)."""
    per_warp = -(-registers * 32 // REGISTER_ALLOCATION_UNIT) * REGISTER_ALLOCATION_UNIT
    blocks = min(MAX_BLOCKS_PER_SM, MAX_WARPS_PER_SM // num_warps, REGISTERS_PER_SM // per_warp // num_warps)
    blocks = min(blocks, SHARED_PER_SM[arch] // (shared_bytes + SHARED_RESERVED_PER_BLOCK))
    return blocks * num_warps


_RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def compile_one(spec: Specialization, arch: int, cache_dir: str) -> dict[str, Any]:
    """Compile `spec` for sm_`arch`; its report entry (status: "ok", "spills" or the error)."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    triton.knobs.cache.dir = cache_dir  # a fresh cache: ptxas runs, so its log is there to read
    triton.knobs.nvidia.dump_ptxas_log = True
    fn = getattr(importlib.import_module(spec.module), spec.kernel)
    entry: dict[str, Any] = {
        "kernel": spec.kernel,
        "arch": f"sm_{arch}",
        "num_warps": spec.options.get("num_warps", 4),
        "constexprs": spec.constexprs,
        "signature": {name: kind for name, kind in spec.signature.items() if kind != "constexpr"},
        "cases": spec.cases,
    }
    names = [p.name for p in fn.params]
    constexprs = {(names.index(name),): value for name, value in spec.constexprs.items()}
    attrs = {(names.index(name),): value for name, value in spec.attrs.items()}
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(
                ASTSource(fn, spec.signature, constexprs, attrs),
                target=GPUTarget("cuda", arch, 32),
                options=spec.options,
            )
    except Exception as error:  # the compiler's own message is the report
        message = str(error).strip().splitlines()
        return {**entry, "status": f"{type(error).__name__}: {message[0] if message else ''}"[:500]}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        usage = subprocess.run(
            [_tool("cuobjdump"), "--dump-resource-usage", cubin.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    registers, stack, static_shared, _ = (int(x) for x in _RESOURCES.search(usage).groups())
    spills = _SPILLS.search(log.getvalue())
    if spills is None:
        return {**entry, "status": "no ptxas log to read spills from"}
    stores, loads = (int(x) for x in spills.groups())
    shared = int(kernel.metadata.shared) + static_shared
    return {
        **entry,
        "registers": registers,
        "spill_bytes": stores + loads,
        "spill_store_bytes": stores,
        "spill_load_bytes": loads,
        "stack_bytes": stack,
        "shared_bytes": shared,
        "max_warps_per_sm": occupancy(arch, registers, shared, entry["num_warps"]),
        "status": "spills" if stores + loads else "ok",
    }


def _compile_job(job: tuple[Specialization, int, str]) -> dict[str, Any]:
    return compile_one(*job)


def build_report(subset: bool = False, jobs: int = 1, archs: tuple[int, ...] = ARCHS) -> dict[str, Any]:
    import triton

    specs = collect_specializations(subset)
    with tempfile.TemporaryDirectory(prefix="noisyseg-triton-cache-") as cache_dir:
        work = [(spec, arch, cache_dir) for spec in specs for arch in archs]
        with ProcessPoolExecutor(jobs) if jobs > 1 else contextlib.nullcontext() as pool:
            results = pool.map(_compile_job, work) if pool is not None else map(_compile_job, work)
            entries = []
            for count, entry in enumerate(results, 1):  # progress: a full report takes a while
                print(
                    f"[{count}/{len(work)}] {entry['kernel']} {entry['arch']} {entry['status']}",
                    file=sys.stderr,
                    flush=True,
                )
                entries.append(entry)
    return {
        "triton": triton.__version__,
        "torch": torch.__version__,
        "image": IMAGE,
        "entries": entries,
    }


def _layout(entry: dict[str, Any]) -> str:
    constexprs = entry["constexprs"]
    if constexprs.get("stride_c") == 1:
        return "channels-last"
    return "NCHW" if constexprs.get("stride_l") == 1 else "-"


ARM_NAMES = {0: "none", 1: "table", 2: "exact"}


def summary_rows(report: dict[str, Any]) -> list[str]:
    """One row per kernel, architecture, logits layout and ARM mode: how many specializations,
    and the range of their registers, spills and resident warps."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for e in report["entries"]:
        arm = ARM_NAMES.get(e["constexprs"].get("ARM"), "-")
        groups.setdefault((e["kernel"], e["arch"], _layout(e), arm), []).append(e)
    rows = [
        "| kernel | arch | layout | ARM | specializations | warps | registers | spill bytes | warps/SM | not ok |",
        "| --- | --- | --- | --- | ---: | --- | --- | ---: | --- | ---: |",
    ]

    def span(values: list[int]) -> str:
        return f"{min(values)}-{max(values)}" if min(values) != max(values) else str(values[0])

    for (kernel, arch, layout, arm), entries in sorted(groups.items()):
        compiled = [e for e in entries if "registers" in e]
        figures = (
            [span([e[key] for e in compiled]) for key in ("num_warps", "registers")]
            + [
                str(max(e["spill_bytes"] for e in compiled)),
                span([e["max_warps_per_sm"] for e in compiled]),
            ]
            if compiled
            else ["", "", "", ""]
        )
        bad = sum(e["status"] != "ok" for e in entries)
        rows.append(f"| {kernel} | {arch} | {layout} | {arm} | {len(entries)} | {' | '.join(figures)} | {bad} |")
    return rows


def markdown(report: dict[str, Any]) -> str:
    """The summary, then one row per kernel, architecture and specialization."""
    lines = [
        f"Triton {report['triton']}; {len(report['entries'])} compiled kernels",
        "",
        *summary_rows(report),
        "",
        "| kernel | arch | constexprs | warps | registers | spill bytes | shared bytes | warps/SM | status | cases |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for e in report["entries"]:
        flags = ", ".join(f"{k}={v}" for k, v in e["constexprs"].items())
        dtype = e["signature"].get("logits") or e["signature"].get("z0") or e["signature"].get("grad") or ""
        lines.append(
            f"| {e['kernel']} | {e['arch']} | {dtype} {flags} | {e['num_warps']} | {e.get('registers', '')} | "
            f"{e.get('spill_bytes', '')} | {e.get('shared_bytes', '')} | {e.get('max_warps_per_sm', '')} | "
            f"{e['status']} | {len(e['cases'])} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for report.json and report.md")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes (default: CPUs)")
    parser.add_argument("--subset", action="store_true", help="the representative subset the test suite compiles")
    parser.add_argument(
        "--arch",
        type=int,
        action="append",
        choices=ARCHS,
        help="compute capability (default: 80 and 90)",
    )
    args = parser.parse_args(argv)
    report = build_report(args.subset, args.jobs, tuple(args.arch or ARCHS))
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in (
        ("report.json", json.dumps(report, indent=1, default=str) + "\n"),
        ("report.md", markdown(report)),
    ):
        tmp = args.out / (name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, args.out / name)
    bad = [e for e in report["entries"] if e["status"] != "ok"]
    for e in bad:
        print(f"{e['kernel']} {e['arch']} {e['constexprs']}: {e['status']}", file=sys.stderr)
    print(
        f"triton {report['triton']}: {len(report['entries'])} kernels compiled, "
        f"{len(bad)} failing or spilling; {args.out / 'report.json'}"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

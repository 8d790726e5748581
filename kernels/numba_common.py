"""What the numba loss kernels share: threads, vectorisable exp/log/sigmoid, block scheduling.

* Threads: the kernels run on no more threads than torch's intra-op pool
  (`threads_like_torch`, restoring both settings after), and the workqueue layer's workers are
  bound one per CPU when they fill the process's CPUs (`bind_worker_threads`).
* `fast_exp`, `fast_log`, `fast_sigmoid`: float32 polynomials that LLVM can vectorise (libm's
  expf/logf are scalar calls), with FMAs where the CPU has them.
* Denormals: the kernels' threads flush them to zero while they run (`flush_denormals`,
  `restore_denormals`; x86).
* Prefetching: `prefetch_line` and `prefetch_row` ask for cache lines a kernel will read soon
  (prefetcht0 on x86).
* Streaming stores: `stream_row` copies a staged row out with non-temporal stores, and
  `stream_fence` orders them before the parallel region ends.
* Scheduling: pixels are processed in blocks of one image (`block_size`, `block_span`), one run
  of consecutive blocks per thread (`parallel_chunks`); host buffers come from torch's
  allocator (`float32_buffer`).
* `HELPER_JIT` / `PARALLEL_JIT`: the numba options every kernel and helper compiles with, and
  512-bit vectors allowed on AVX-512 hosts (`allow_512_bit_vectors`).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform
from collections.abc import Iterator

import numba
import numpy as np
import torch
from llvmlite import ir as llvm_ir
from numba import prange, types
from numba.core.codegen import get_host_cpu_features
from numba.extending import intrinsic

# numba picks its threading layer as usual (TBB, else OpenMP, else workqueue). Measured on the
# 2-core machine: the workqueue layer's threads poll for work with 1 us naps, which here
# stretched to milliseconds for stretches of calls (ARM CE at the Cityscapes shape 9 or 16 ms a
# call); OpenMP's were steady, and training steps took the same time with either (one or two
# threads, one or two processes). OpenMP's spinning workers once slowed torch's operators down,
# but only while numba ran more threads than torch; `threads_like_torch` now prevents that.

# Where the workqueue layer is used (chosen, or the only one installed): its workers sleep between
# parallel regions, and on waking them Linux put both on one core for stretches of calls on the
# 2-core machine (seen with sched_getcpu inside the workers), each such call taking twice as long.
# Binding each worker to a CPU of its own ends that; done only when the workers are exactly the
# process's CPUs (fewer threads mean the machine is shared, and binding would stack every
# process's first worker on one CPU). Opt out with NOISYSEG_BIND_NUMBA_THREADS=0.
BIND_THREADS_VARIABLE = "NOISYSEG_BIND_NUMBA_THREADS"


@functools.cache
def bind_worker_threads(num_threads: int) -> bool:
    """Bind numba's `num_threads` workqueue workers to one CPU each, once per thread count;
    returns whether they are bound."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    gettid = getattr(ctypes.CDLL(None), "gettid", None)  # glibc >= 2.30
    if os.environ.get(BIND_THREADS_VARIABLE, "1") == "0" or gettid is None:
        return False
    if num_threads < 2 or num_threads != len(cpus):
        return False
    numba.get_num_threads()  # starts numba's threads, so the layer is known
    if numba.threading_layer() != "workqueue":
        return False  # OpenMP's and TBB's workers spin or come and go: left to their runtime
    thread_ids = _worker_thread_ids(gettid, num_threads)
    if len(set(thread_ids)) != num_threads:
        return False
    for thread_id, cpu in zip(thread_ids, cpus):
        os.sched_setaffinity(thread_id, {cpu})
    return True


@contextlib.contextmanager
def threads_like_torch() -> Iterator[None]:
    """Run the kernels on no more threads than torch's intra-op pool (torch.set_num_threads), so
    one setting governs a training process: two processes of one thread each then keep one
    numba thread each instead of four on two cores. numba's own setting still caps it."""
    torch_threads, previous = torch.get_num_threads(), numba.get_num_threads()
    threads = max(1, min(torch_threads, previous))
    numba.set_num_threads(threads)
    try:
        bind_worker_threads(threads)
        yield
    finally:
        numba.set_num_threads(previous)
        # numba's OpenMP layer and torch share one OpenMP runtime (one libgomp.so.1 is loaded),
        # so numba's setting just moved torch's too.
        torch.set_num_threads(torch_threads)


def _worker_thread_ids(gettid, num_threads: int) -> list[int]:
    """The OS thread id of each worker, in worker order (a prange of num_threads iterations gives
    worker i iteration i). Compiled per process: numba cannot cache code holding a C pointer."""
    gettid.restype, gettid.argtypes = ctypes.c_int, []

    @numba.njit(parallel=True)
    def record(out):
        for worker in prange(out.shape[0]):
            out[worker] = gettid()

    ids = np.zeros(num_threads, np.int64)
    record(ids)
    return [int(i) for i in ids]


# Vector width. LLVM tunes Intel's AVX-512 server CPUs (Skylake-SP to Emerald Rapids) to prefer
# 256-bit vectors, for the clock drop 512-bit code caused on the first of them, and numba compiles
# for the host CPU with that tuning: its loops ran 8 floats wide where torch's CPU kernels run 16.
# Allowing 512 bits took ARM-CE at C = 5 from 1.29-1.32x to 1.11-1.14x plain CE on an Emerald
# Rapids Xeon (docs/benchmarks.md). numba reads its target features once, when the process
# compiles or loads its first function, so this runs on import, before any kernel does. A
# NUMBA_CPU_FEATURES of the user's is kept as it is; where numba had already compiled something,
# the process keeps the 256-bit preference (only slower).
PREFER_256_BIT = "prefer-256-bit"


def allow_512_bit_vectors() -> bool:
    """Let numba's LLVM use 512-bit vectors on an AVX-512 host; returns whether it was set."""
    if numba.config.CPU_FEATURES is not None:
        return False
    features = get_host_cpu_features()  # numba's own reading (honours NUMBA_ENABLE_AVX)
    if "+avx512f" not in features.split(","):
        return False
    numba.config.CPU_FEATURES = f"{features},-{PREFER_256_BIT}"
    return True


allow_512_bit_vectors()

# error_model "numpy": IEEE division. numba's default checks every float division for zero and
# raises, and that branch keeps the loops from vectorising.
HELPER_JIT = {"fastmath": False, "cache": True, "error_model": "numpy"}
PARALLEL_JIT = {**HELPER_JIT, "parallel": True}

# Per-block buffer of exponentials: scales x classes x pixels, kept near L2-cache size.
BLOCK_FLOATS = 32768
MIN_BLOCK, MAX_BLOCK = 16, 1024


# ---------------------------------------------------------------------------------------------
# Vectorisable exp and log: libm's expf and logf are scalar calls that stop LLVM from vectorising
# the class and pixel loops, so they are Cephes' polynomials (about 1 ulp), with 2^n and the
# exponent split done on the float's bits through a register bitcast. exp clamps its input to
# [-87.3, 88.3], where 2^n stays a normal fp32 number: exp(-87.3) ~ 1e-38 stands in for 0, far
# below every tolerance. log takes positive normal numbers.


@intrinsic
def _float32_from_bits(typingctx, bits):
    """The low 32 bits of the integer `bits` read as a float32 (a bitcast, no memory round
    trip; numba widens int32 arithmetic to int64, hence the truncation)."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        low = builder.trunc(args[0], llvm_ir.IntType(32)) if bits.bitwidth > 32 else args[0]
        return builder.bitcast(low, llvm_ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def _bits_of_float32(typingctx, value):
    """The bits of the float32 `value` as an int32."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], llvm_ir.IntType(32))

    return types.int32(types.float32), codegen


def _array_data(context, builder, signature, args, position):
    """In an intrinsic's codegen: the data pointer of its array argument at `position`."""
    return context.make_array(signature.args[position])(context, builder, args[position]).data


def _element_address(context, builder, signature, args, array=0, index=1):
    """In an intrinsic's codegen: the address of element args[index] of the 1-D array
    args[array]."""
    data = _array_data(context, builder, signature, args, array)
    position = context.cast(builder, args[index], signature.args[index], types.intp)
    return builder.gep(data, [position])


@intrinsic
def add_float64x4(typingctx, flat, at, a, b, c, d):
    """flat[at : at + 4] += (a, b, c, d) as one 256-bit load, add and store, for scattered
    read-modify-writes of four adjacent float64 sums (scalar code does four). `flat` is a 1-D
    C-contiguous float64 array and `at + 4 <= len(flat)` (not checked). The kernels' ARM bins used
    it until they staged their rows (`add_widened_float32x4`); benchmarks/arm_bins_layouts.py's
    scalar loops, which they are compared with, still do."""
    if not (isinstance(flat, types.Array) and flat.dtype == types.float64 and flat.ndim == 1):
        return None
    if not isinstance(at, types.Integer) or any(x != types.float64 for x in (a, b, c, d)):
        return None

    def codegen(context, builder, signature, args):
        vector_type = llvm_ir.VectorType(llvm_ir.DoubleType(), 4)
        pointer = builder.bitcast(_element_address(context, builder, signature, args), vector_type.as_pointer())
        vector = llvm_ir.Constant(vector_type, llvm_ir.Undefined)
        for lane, value in enumerate(args[2:]):
            vector = builder.insert_element(vector, value, llvm_ir.Constant(llvm_ir.IntType(32), lane))
        builder.store(builder.fadd(builder.load(pointer, align=8), vector), pointer, align=8)
        return context.get_dummy_value()

    return types.void(flat, at, a, b, c, d), codegen


@intrinsic
def add_widened_float32x4(typingctx, flat, at, rows, row_at):
    """flat[at : at + 4] += rows[row_at : row_at + 4] widened to float64: one 128-bit load, one
    conversion and one 256-bit read-modify-write. `flat` is a 1-D C-contiguous float64 array,
    `rows` float32; neither range is bounds-checked."""
    if not (isinstance(flat, types.Array) and flat.dtype == types.float64 and flat.ndim == 1):
        return None
    if not (isinstance(rows, types.Array) and rows.dtype == types.float32 and rows.ndim == 1):
        return None
    if not (isinstance(at, types.Integer) and isinstance(row_at, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        wide_type = llvm_ir.VectorType(llvm_ir.DoubleType(), 4)
        narrow_type = llvm_ir.VectorType(llvm_ir.FloatType(), 4)
        pointer = builder.bitcast(_element_address(context, builder, signature, args), wide_type.as_pointer())
        row_pointer = _element_address(context, builder, signature, args, array=2, index=3)
        row = builder.load(builder.bitcast(row_pointer, narrow_type.as_pointer()), align=4)
        total = builder.fadd(builder.load(pointer, align=8), builder.fpext(row, wide_type))
        builder.store(total, pointer, align=8)
        return context.get_dummy_value()

    return types.void(flat, at, rows, row_at), codegen


# Denormal numbers. Confident logits (differences of tens of nats, as a trained network gives)
# make exponentials near 1e-30 whose squares and products fall below float32's normal range;
# Intel CPUs handle every such operation in microcode, about a hundred cycles each: with the
# benchmark's logits scaled by 10, the three-scale loss at C = 5 took 1.92-1.99x three plain CEs
# before this flush and 0.98-1.02x with it (docs/benchmarks.md, "Tenth session"). The kernels'
# threads flush them to zero (MXCSR's FTZ and DAZ bits) and restore the caller's setting after;
# what is flushed is below 1.2e-38, far under every tolerance. Elsewhere than x86 the setting is
# left alone.
X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
_FLUSH_DENORMALS = 0x8040  # FTZ (bit 15) and DAZ (bit 6)


def _mxcsr_intrinsic(builder, name):
    pointer = llvm_ir.IntType(8).as_pointer()
    return builder.module.declare_intrinsic(
        f"llvm.x86.sse.{name}", fnty=llvm_ir.FunctionType(llvm_ir.VoidType(), [pointer])
    )


@intrinsic
def flush_denormals(typingctx):
    """Set this thread's FTZ and DAZ; returns the previous control word for `restore_denormals`."""

    def codegen(context, builder, signature, args):
        word = llvm_ir.IntType(32)
        if not X86:
            return llvm_ir.Constant(word, 0)
        slot = builder.alloca(word)
        pointer = builder.bitcast(slot, llvm_ir.IntType(8).as_pointer())
        builder.call(_mxcsr_intrinsic(builder, "stmxcsr"), [pointer])
        previous = builder.load(slot)
        builder.store(builder.or_(previous, llvm_ir.Constant(word, _FLUSH_DENORMALS)), slot)
        builder.call(_mxcsr_intrinsic(builder, "ldmxcsr"), [pointer])
        return previous

    return types.int32(), codegen


@intrinsic
def restore_denormals(typingctx, previous):
    """Put back the control word `flush_denormals` returned."""
    if previous != types.int32:
        return None

    def codegen(context, builder, signature, args):
        if X86:
            slot = builder.alloca(llvm_ir.IntType(32))
            builder.store(args[0], slot)
            builder.call(_mxcsr_intrinsic(builder, "ldmxcsr"), [builder.bitcast(slot, llvm_ir.IntType(8).as_pointer())])
        return context.get_dummy_value()

    return types.void(previous), codegen


# Prefetching rows the kernels are about to read. A pass reads the logits in rows of one block
# (4 KiB at 1024 pixels), each a fresh page to the hardware prefetchers, which stop at page
# boundaries; asking for the next block's logits when a block starts lets those reads overlap the
# block's arithmetic instead of stalling its loops (docs/benchmarks.md, "Eleventh session"). The
# gradient rows were prefetched the same way until they were streamed out (below).
_CACHE_LINE_FLOATS = 16


@intrinsic
def prefetch_line(typingctx, array, at):
    """A read prefetch of ``array[at]``'s cache line into every level (prefetcht0 on x86); a
    hint only. `array` is a 1-D contiguous array and `at` within it (not checked)."""
    if not (isinstance(array, types.Array) and array.ndim == 1) or not isinstance(at, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        byte_pointer = llvm_ir.IntType(8).as_pointer()
        address = builder.bitcast(_element_address(context, builder, signature, args), byte_pointer)
        word = llvm_ir.IntType(32)
        function = builder.module.declare_intrinsic(
            "llvm.prefetch", fnty=llvm_ir.FunctionType(llvm_ir.VoidType(), [byte_pointer, word, word, word])
        )
        # read (0), highest locality (3), data cache (1)
        builder.call(
            function, [address, llvm_ir.Constant(word, 0), llvm_ir.Constant(word, 3), llvm_ir.Constant(word, 1)]
        )
        return context.get_dummy_value()

    return types.void(array, at), codegen


@numba.njit(**HELPER_JIT)
def prefetch_row(row, width):
    """Prefetch the cache lines of ``row[:width]`` (float32)."""
    for j in range(0, width, _CACHE_LINE_FLOATS):
        prefetch_line(row, j)


# Streaming stores. A gradient row written with ordinary stores is first read into the cache
# (read-for-ownership) and written back when evicted. The passes write every gradient row once
# and no pass reads it again before its end, so they compute a block's row into an L1-resident
# staging row and copy it out with non-temporal stores, which write whole cache lines to memory
# without reading them. Measured on a Zen 4 host with a 32 MiB L3, even where the next step reads
# the buffer back (backward's rescale of a 5 MiB ARM-CE gradient) this was faster: 0.92 of the
# ordinary stores there, 0.87-0.95 on the other schedules (docs/benchmarks.md, "Thirteenth
# session").
_VECTOR_FLOATS = 16  # one cache line, one 512-bit store


@intrinsic
def _stream_vectors(typingctx, dst, src, at, vectors):
    """dst[at : at + 16 * vectors] = src[at : ...] as non-temporal 64-byte stores (LLVM's
    !nontemporal: movntps on x86). ``dst[at]`` must be 64-byte aligned (not checked)."""
    if not all(isinstance(a, types.Array) and a.ndim == 1 and a.dtype == types.float32 for a in (dst, src)):
        return None
    if not (isinstance(at, types.Integer) and isinstance(vectors, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        index_type = llvm_ir.IntType(64)
        vector_type = llvm_ir.VectorType(llvm_ir.FloatType(), _VECTOR_FLOATS)
        dst_data, src_data = (_array_data(context, builder, signature, args, i) for i in (0, 1))
        start = context.cast(builder, args[2], signature.args[2], types.int64)
        count = context.cast(builder, args[3], signature.args[3], types.int64)
        nontemporal = builder.module.add_metadata([llvm_ir.Constant(llvm_ir.IntType(32), 1)])
        entry, loop, done = builder.block, builder.append_basic_block("stream"), builder.append_basic_block("streamed")
        zero = llvm_ir.Constant(index_type, 0)
        builder.cbranch(builder.icmp_signed(">", count, zero), loop, done)
        builder.position_at_end(loop)
        vector = builder.phi(index_type)
        vector.add_incoming(zero, entry)
        offset = builder.add(start, builder.mul(vector, llvm_ir.Constant(index_type, _VECTOR_FLOATS)))
        value = builder.load(builder.bitcast(builder.gep(src_data, [offset]), vector_type.as_pointer()), align=4)
        store = builder.store(
            value, builder.bitcast(builder.gep(dst_data, [offset]), vector_type.as_pointer()), align=64
        )
        store.set_metadata("nontemporal", nontemporal)
        following = builder.add(vector, llvm_ir.Constant(index_type, 1))
        vector.add_incoming(following, loop)
        builder.cbranch(builder.icmp_signed("<", following, count), loop, done)
        builder.position_at_end(done)
        return context.get_dummy_value()

    return types.void(dst, src, at, vectors), codegen


@numba.njit(**HELPER_JIT)
def stream_row(dst, src, width):
    """dst[:width] = src[:width] (float32, contiguous): non-temporal stores for the cache lines
    that `dst` covers whole, ordinary ones for the ends. Call `stream_fence` before another thread
    reads `dst`."""
    misaligned = dst.ctypes.data % 64
    head = width if misaligned % 4 else min(((64 - misaligned) % 64) // 4, width)
    for j in range(head):
        dst[j] = src[j]
    vectors = (width - head) // _VECTOR_FLOATS
    _stream_vectors(dst, src, head, vectors)
    for j in range(head + vectors * _VECTOR_FLOATS, width):
        dst[j] = src[j]


@intrinsic
def stream_fence(typingctx):
    """Order this thread's non-temporal stores before its later memory operations (a sequentially
    consistent fence: mfence on x86), so the threads that read them after the parallel region
    see them."""

    def codegen(context, builder, signature, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.void(), codegen


_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)
_EXP_LOW, _EXP_HIGH = np.float32(-87.3), np.float32(88.3)
_EXP_POLY = tuple(
    np.float32(c)
    for c in (
        1.9875691500e-4,
        1.3981999507e-3,
        8.3334519073e-3,
        4.1665795894e-2,
        1.6666665459e-1,
        5.0000001201e-1,
    )
)


# The polynomials may contract a multiply and an add into one FMA (the flag stays on their
# instructions where they are inlined): the exponential alone ran 1.6x as fast (2.85 -> 1.78 ms
# per 3.9 million in L1, 512-bit vectors), within the same ~1 ulp. Hosts without FMA compute the
# same expressions unfused, so the last bits may differ between CPUs, as with the vector width.
_POLY_JIT = {**HELPER_JIT, "fastmath": {"contract"}}


@numba.njit(**_POLY_JIT)
def fast_exp(x):
    """exp of a float32."""
    x = min(max(x, _EXP_LOW), _EXP_HIGH)
    k = np.floor(x * _LOG2E + np.float32(0.5))
    r = x - k * _LN2_HI - k * _LN2_LO
    poly = _EXP_POLY[0]
    for coeff in _EXP_POLY[1:]:
        poly = poly * r + coeff
    power_of_two = _float32_from_bits((np.int32(k) + np.int32(127)) << np.int32(23))
    return (poly * r * r + r + np.float32(1.0)) * power_of_two


@numba.njit(**HELPER_JIT)
def fast_sigmoid(x):
    return np.float32(1.0) / (np.float32(1.0) + fast_exp(-x))


_SQRT_HALF = np.float32(0.707106781186547524)
_LOG_POLY = tuple(
    np.float32(c)
    for c in (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
              -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1)
)  # fmt: skip


@numba.njit(**_POLY_JIT)
def fast_log(value):
    """log of a positive normal float32."""
    bits = _bits_of_float32(value)
    exponent = np.float32(((bits >> np.int32(23)) & np.int32(0xFF)) - np.int32(126))
    # mantissa in [0.5, 1): the exponent field replaced by 126's (0x807FFFFF keeps sign, fraction)
    mantissa = _float32_from_bits((bits & np.int32(-2139095041)) | np.int32(0x3F000000))
    small = mantissa < _SQRT_HALF
    exponent = exponent - np.float32(1.0) if small else exponent
    x = (mantissa + mantissa if small else mantissa) - np.float32(1.0)
    square = x * x
    poly = _LOG_POLY[0]
    for coeff in _LOG_POLY[1:]:
        poly = poly * x + coeff
    y = poly * x * square + exponent * _LN2_LO - np.float32(0.5) * square
    return x + y + exponent * _LN2_HI


# ---------------------------------------------------------------------------------------------
# Block scheduling.


@numba.njit(**HELPER_JIT)
def block_span(index, tiles, block, num_pixels):
    """Block `index` of an (images x tiles) grid: its image, first pixel and width (the last
    tile of an image may be narrower)."""
    start = (index % tiles) * block
    return index // tiles, start, min(block, num_pixels - start)


def parallel_chunks(blocks: int) -> int:
    """One run of consecutive blocks per numba thread (the threading layers split a prange
    statically anyway)."""
    return max(min(blocks, numba.get_num_threads()), 1)


def block_size(num_scales: int, num_classes: int) -> int:
    """Pixels per block: a power of two keeping the exponential buffer near BLOCK_FLOATS."""
    fitting = max(BLOCK_FLOATS // (num_scales * num_classes), 1)
    return int(min(max(1 << (fitting.bit_length() - 1), MIN_BLOCK), MAX_BLOCK))


def float32_buffer(shape: tuple[int, ...]) -> np.ndarray:
    """An uninitialised fp32 array from torch's allocator. numpy's would advise the kernel to
    back large arrays with transparent huge pages; first touching a fresh one in the kernel then
    took 18 or 35 ms per call at random (Cityscapes shape), 4 KiB pages a steady 22 ms."""
    return torch.empty(shape, dtype=torch.float32).numpy()

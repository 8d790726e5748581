"""Pieces shared by the Triton loss kernels: input preparation, launch geometry, and the
`@triton.jit` helpers (online softmax statistics, ARM's MLP forward and backward, the
multiscale mean prediction).

Layout every kernel uses: logits are viewed as ``(N, C, L)`` (L = product of the spatial
sizes) with explicit strides, so channels-last and other dense layouts need no copy; targets
as ``(N, L)``. The launch grid is ``(N, cdiv(L, BLOCK_P))``: one program per block of pixels
of one image, so a block's partial sums belong to one image (the per-image rho mask needs
that) and the image index is a scalar.

Under ``TRITON_INTERPRET=1`` (CPU tensors, tests) the same kernels run through Triton's
interpreter, which has no libdevice: sigmoid and SiLU are written from ``tl.exp``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import nn

from noisyseg.kernels import contract
from noisyseg.kernels.contract import (
    ARM_NUM_PARAMETERS,
    FUSED_DTYPES,
    LossTerms,
    pack_arm_parameters,
)

# ARM's parameter layout: the kernels read `contract.ARM_W0` ... `contract.ARM_B3` (offsets into
# the flat vector of `pack_arm_parameters`) as attributes of the module, which Triton takes as
# compile-time constants (a plain int global would have to be wrapped in tl.constexpr).

# GPU launch parameters, chosen from `make kernels-compile` (kernels/compile_report.py: every
# specialization compiled for sm_80 and sm_90 with Triton 3.9 and 3.6; the tables are in
# docs/benchmarks.md). No GPU was available to time them. A tile is BLOCK_P pixels x BLOCK_C
# channels; per logits layout:
# * NCHW (pixels contiguous): loads vectorise along the pixels. Cross-entropy: 2048-value tiles
#   at 4 warps, 56-168 registers (ARM's table: up to 128), no spills, 12-36 warps per SM; the
#   4096-value tiles used before needed up to 255 registers and spilled in bf16 at C = 150.
# * channels-last (channels contiguous, rows C values apart, unaligned for most C): each value
#   needs its own 64-bit address, so the same tile takes about twice the registers; 4096-value
#   tiles used 255 registers and spilled 0.6-2 KB. Half the NCHW tile, and channel blocks of at
#   most 32.
# * The multiscale kernels hold (BLOCK_P, MAX_SCALES) matrices of per-pixel statistics and
#   per-scale tiles beside the channel tile: smaller tiles again.
# * ARM's backward holds (BLOCK_P, 4, 4) products (exact path) or gathers rows of the table's
#   node Jacobian: 128 pixels at 4 warps, 100-155 registers.
# * Every launch passes maxnreg = 255 (no limit below the hardware's): left to itself ptxas
#   trades a few registers for one more resident block at its register steps (64, 72, 80, 96,
#   128) and spills the difference (8-72 bytes in 14 of 392 specializations); told the limit, it
#   allocates what the kernel needs and spills nothing.
# The figures per kernel and specialization: docs/benchmarks.md, "Triton kernels compiled".


@dataclass(frozen=True)
class Tile:
    """A kernel family's tile for one logits layout: about `elements` values, at most
    `max_block_c` channels, run by `num_warps` warps."""

    elements: int
    max_block_c: int
    num_warps: int


CE_TILES = {"nchw": Tile(2048, 64, 4), "channels_last": Tile(1024, 32, 4)}
MULTISCALE_TILES = {"nchw": Tile(512, 32, 4), "channels_last": Tile(512, 32, 8)}
MAX_BLOCK_P = 256
MIN_BLOCK_P = 16
MAX_REGISTERS = 255
ARM_BLOCK_P = 128
ARM_LAUNCH = {"num_warps": 4, "maxnreg": MAX_REGISTERS}  # ARM's table and backward kernels
ARM_TABLE_BLOCK = 128  # table nodes per program (`arm_table_kernel`)
# The kernels' constexpr ARM: no ARM (weight 1), ARM's table (`contract`), the exact MLP.
ARM_NONE, ARM_TABLE, ARM_EXACT = 0, 1, 2
# Compile-time constants for static loops and shapes: ARM's 53 parameters padded to a power of
# two, and the scale slots of the multiscale kernels (MAX_SCALES pointer arguments; the scale
# count is a runtime value).
PARAMETER_SPAN = tl.constexpr(triton.next_power_of_2(ARM_NUM_PARAMETERS))
SCALE_SLOTS = tl.constexpr(contract.MAX_SCALES)
if contract.ARM_TABLE_SIZE % ARM_TABLE_BLOCK:
    raise RuntimeError(
        f"arm_table_kernel needs ARM_TABLE_SIZE a multiple of {ARM_TABLE_BLOCK}, got {contract.ARM_TABLE_SIZE}"
    )


def logits_layout(logits: torch.Tensor) -> str:
    """ "channels_last" when a (N, C, L) view has contiguous channels and strided pixels."""
    _, stride_c, stride_l = logits.stride()
    return "channels_last" if stride_c == 1 and stride_l != 1 else "nchw"


@dataclass(frozen=True)
class LaunchGeometry:
    """Block sizes, warps and grid for logits viewed as (N, C, L)."""

    block_p: int
    block_c: int
    num_blocks: int
    num_warps: int

    @property
    def options(self) -> dict[str, int]:
        """The launch options: warps and the register limit."""
        return {"num_warps": self.num_warps, "maxnreg": MAX_REGISTERS}

    @classmethod
    def for_shape(cls, num_classes: int, num_pixels: int, tile: Tile) -> LaunchGeometry:
        """Channel blocks of up to the tile's max_block_c, pixel blocks filling a tile of about
        ``tile.elements`` values (never wider than the image needs)."""
        block_c = min(triton.next_power_of_2(num_classes), tile.max_block_c)
        block_p = max(MIN_BLOCK_P, min(tile.elements // block_c, MAX_BLOCK_P, triton.next_power_of_2(num_pixels)))
        return cls(
            block_p=block_p, block_c=block_c, num_blocks=triton.cdiv(num_pixels, block_p), num_warps=tile.num_warps
        )

    @classmethod
    def for_logits(cls, logits: torch.Tensor, tiles: dict[str, Tile]) -> LaunchGeometry:
        """The geometry for (N, C, L) logits in their layout, from a family's `tiles`."""
        _, num_classes, num_pixels = logits.shape
        return cls.for_shape(num_classes, num_pixels, tiles[logits_layout(logits)])


def check_device(tensor: torch.Tensor, name: str) -> None:
    """Compiled Triton needs CUDA tensors; the interpreter (tests) takes CPU tensors."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if tensor.device.type != "cuda" and not interpreted:
        raise ValueError(
            f"{name}: the triton backend needs CUDA tensors, got device {tensor.device} "
            "(use backend='numba' or 'torch' on the CPU, or set TRITON_INTERPRET=1 before importing triton)"
        )


def check_dtype(tensor: torch.Tensor, name: str) -> None:
    """The kernels accumulate in fp32 and read fp32/fp16/bf16; anything else is refused."""
    if tensor.dtype not in FUSED_DTYPES:
        raise ValueError(f"{name}: the triton backend takes float32, float16 or bfloat16 logits, got {tensor.dtype}")


def flatten_logits(logits: torch.Tensor) -> torch.Tensor:
    """``(N, C, *spatial)`` as ``(N, C, L)``, in a dense layout that `torch.empty_like`
    reproduces stride for stride (so a gradient buffer can share the logits' strides).
    Contiguous and channels-last tensors stay views; anything else (a slice) is copied."""
    flat = logits.reshape(logits.shape[0], logits.shape[1], -1)
    if torch.empty_like(flat, device="meta").stride() != flat.stride():
        flat = flat.contiguous()
    return flat


def flatten_target(target: torch.Tensor) -> torch.Tensor:
    """``(N, *spatial)`` class ids as ``(N, L)`` (a view when possible; strides are passed on)."""
    return target.reshape(target.shape[0], -1)


def arm_parameter_vector(arm: nn.Module | None, like: torch.Tensor) -> torch.Tensor:
    """ARM's flat fp32 parameters on the logits' device; zeros (unused) when there is no ARM."""
    if arm is None:
        return torch.zeros(ARM_NUM_PARAMETERS, dtype=torch.float32, device=like.device)
    arm_params = pack_arm_parameters(arm)
    if arm_params.device != like.device:
        raise ValueError(f"arm: parameters on {arm_params.device}, logits on {like.device}")
    return arm_params


def arm_kernel_mode(has_arm: bool, terms: LossTerms) -> int:
    """The kernels' constexpr ARM: ARM_NONE (weight 1), ARM_TABLE or ARM_EXACT."""
    if not has_arm:
        return ARM_NONE
    return ARM_TABLE if terms.arm_table else ARM_EXACT


def confidence_constants(num_classes: int) -> tuple[float, float]:
    """(1/C, 2C/(C-1)): v_hat = 2C/(C-1) * (sum_c p_c^2 - 1/C) - 1 (C >= 2; unused otherwise).

    Passed as floats rather than computed from C in the kernel because Triton specialises an
    integer argument equal to 1 into a constant."""
    if num_classes < 2:
        return 1.0, 0.0
    return 1.0 / num_classes, 2.0 * num_classes / (num_classes - 1)


def reduce_partials(partials: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """Sum per-block partials in float64 and a fixed order (deterministic, no atomics)."""
    return partials.double().sum(dim=tuple(dims))


def safe_reciprocal(total: torch.Tensor) -> torch.Tensor:
    """1/total where total > 0, else 0: an all-ignored batch gives zero gradients, not NaN."""
    return torch.where(total > 0, 1.0 / torch.where(total > 0, total, torch.ones_like(total)), torch.zeros_like(total))


# ----------------------------------------------------------------------------- jit helpers
# ARM's flat vector is called arm_params in the kernels: Triton's launcher reserves the
# argument name "params" (a kernel argument of that name fails to launch when compiled).


@triton.jit
def sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def silu(x):
    return x * sigmoid(x)


@triton.jit
def silu_derivative(x):
    s = sigmoid(x)
    return s * (1.0 + x * (1.0 - s))


@triton.jit
def pixel_block(L, BLOCK_P: tl.constexpr):
    """(image index, pixel offsets within the image, in-range mask), all int64 offsets."""
    image = tl.program_id(0).to(tl.int64)
    offsets = tl.program_id(1).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    return image, offsets, offsets < L


@triton.jit
def load_target(target, stride_n, stride_l, image, offsets, in_range, ignore_index):
    """Class ids (int32) and the valid mask (in range and not ignored)."""
    labels = tl.load(target + image * stride_n + offsets * stride_l, mask=in_range, other=ignore_index)
    labels = labels.to(tl.int32)
    return labels, in_range & (labels != ignore_index)


@triton.jit
def channel_block(c_start, C, BLOCK_C: tl.constexpr):
    channels = c_start + tl.arange(0, BLOCK_C)
    return channels, channels < C


@triton.jit
def load_channels(row, stride_c, channels, channel_mask, in_range):
    """A (BLOCK_P, BLOCK_C) fp32 tile; masked entries are 0 (finite, so no inf - inf)."""
    pointers = row[:, None] + channels.to(tl.int64)[None, :] * stride_c
    mask = in_range[:, None] & channel_mask[None, :]
    return tl.load(pointers, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def softmax_statistics(row, stride_c, labels, in_range, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Online softmax over channel blocks, fp32: running max m, sum_c e^(z-m), sum_c
    e^(2(z-m)) (for sum_c p_c^2) and the target logit."""
    running_max = tl.full([BLOCK_P], float("-inf"), tl.float32)
    sum_exp = tl.zeros([BLOCK_P], tl.float32)
    sum_exp_sq = tl.zeros([BLOCK_P], tl.float32)
    target_logit = tl.zeros([BLOCK_P], tl.float32)
    for c_start in range(0, C, BLOCK_C):
        channels, channel_mask = channel_block(c_start, C, BLOCK_C)
        z = load_channels(row, stride_c, channels, channel_mask, in_range)
        z = tl.where(channel_mask[None, :], z, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(z, axis=1))
        rescale = tl.exp(running_max - new_max)
        e = tl.exp(z - new_max[:, None])
        sum_exp = sum_exp * rescale + tl.sum(e, axis=1)
        sum_exp_sq = sum_exp_sq * rescale * rescale + tl.sum(e * e, axis=1)
        target_logit += tl.sum(tl.where(channels[None, :] == labels[:, None], z, 0.0), axis=1)
        running_max = new_max
    return running_max, sum_exp, sum_exp_sq, target_logit


@triton.jit
def normalized_confidence(sum_exp, sum_exp_sq, inv_c, confidence_scale):
    """ARM's v_hat = 2C/(C-1) * (sum_c p_c^2 - 1/C) - 1 from the online softmax sums."""
    sum_p_sq = sum_exp_sq / (sum_exp * sum_exp)
    return confidence_scale * (sum_p_sq - inv_c) - 1.0


@triton.jit
def cross_entropy_terms(
    row_max, sum_exp, sum_exp_sq, target_logit, valid, arm_params, table, inv_c, confidence_scale, ARM: tl.constexpr
):
    """Per pixel from the softmax statistics: log-normaliser, loss (0 where not valid),
    ARM's confidence v_hat and the weight (`arm_weight`; 0 where not valid)."""
    log_norm = row_max + tl.log(sum_exp)
    loss = tl.where(valid, log_norm - target_logit, 0.0)
    confidence = normalized_confidence(sum_exp, sum_exp_sq, inv_c, confidence_scale)
    weight = tl.where(valid, arm_weight(confidence, arm_params, table, ARM), 0.0)
    return log_norm, loss, confidence, weight


@triton.jit
def cross_entropy_gradient(p, channels, labels):
    """p - onehot(label) on a tile, in fp32."""
    return tl.where(channels[None, :] == labels[:, None], p - 1.0, p)


@triton.jit
def _arm_hidden_layer(hidden, arm_params, W_OFFSET: tl.constexpr, B_OFFSET: tl.constexpr):
    """(P, 4) -> (P, 4) pre-activation of a 4x4 layer (weight row-major, out x in)."""
    j = tl.arange(0, contract.ARM_HIDDEN)
    weight = tl.load(arm_params + W_OFFSET + j[:, None] * contract.ARM_HIDDEN + j[None, :])
    bias = tl.load(arm_params + B_OFFSET + j)
    return tl.sum(hidden[:, None, :] * weight[None, :, :], axis=2) + bias[None, :]


@triton.jit
def arm_forward_intermediates(x, arm_params):
    """ARM 1-4-4-4-1 on a vector of confidences: pre-activations of the three hidden layers
    and the output weight in (0, 1)."""
    j = tl.arange(0, contract.ARM_HIDDEN)
    u1 = (
        x[:, None] * tl.load(arm_params + contract.ARM_W0 + j)[None, :]
        + tl.load(arm_params + contract.ARM_B0 + j)[None, :]
    )
    u2 = _arm_hidden_layer(silu(u1), arm_params, contract.ARM_W1, contract.ARM_B1)
    u3 = _arm_hidden_layer(silu(u2), arm_params, contract.ARM_W2, contract.ARM_B2)
    u4 = tl.sum(silu(u3) * tl.load(arm_params + contract.ARM_W3 + j)[None, :], axis=1) + tl.load(
        arm_params + contract.ARM_B3
    )
    return u1, u2, u3, sigmoid(u4)


@triton.jit
def arm_forward(x, arm_params):
    _, _, _, weight = arm_forward_intermediates(x, arm_params)
    return weight


@triton.jit
def table_position(x):
    """`contract.arm_table_position` in fp32: the node k below x and the fraction f past it."""
    position = tl.minimum(tl.maximum((x + 1.0) * contract.ARM_TABLE_SCALE, 0.0), contract.ARM_TABLE_SIZE - 1.0)
    node = tl.minimum(position.to(tl.int32), contract.ARM_TABLE_SIZE - 2)  # position >= 0: truncation is floor
    return node, position - node.to(tl.float32)


@triton.jit
def table_weight(node, fraction, table):
    """ARM's weight interpolated in its table between nodes k and k + 1."""
    left = tl.load(table + node)
    return left + fraction * (tl.load(table + node + 1) - left)


@triton.jit
def arm_weight(x, arm_params, table, ARM: tl.constexpr):
    """ARM's weight of each confidence: from the table (ARM_TABLE), the MLP (ARM_EXACT), or 1."""
    if ARM == 1:
        node, fraction = table_position(x)
        weight = table_weight(node, fraction, table)
    elif ARM == 2:
        weight = arm_forward(x, arm_params)
    else:
        weight = tl.full(x.shape, 1.0, tl.float32)
    return weight


@triton.jit
def store_terms(out, term, OFFSET: tl.constexpr, rows, ROWS: tl.constexpr, RANK: tl.constexpr):
    """A per-pixel gradient term of RANK 1, 2 or 3 ((P,), (P, 4), (P, 4, 4)) at parameter
    OFFSET: its sum over the pixels at ``out``, or (ROWS) one row of 53 per pixel at
    ``out + rows * 53``."""
    j = tl.arange(0, contract.ARM_HIDDEN)
    if RANK == 1:
        if ROWS:
            tl.store(out + rows * contract.ARM_NUM_PARAMETERS + OFFSET, term)
        else:
            tl.store(out + OFFSET, tl.sum(term, axis=0))
    elif RANK == 2:
        if ROWS:
            tl.store(out + rows[:, None] * contract.ARM_NUM_PARAMETERS + OFFSET + j[None, :], term)
        else:
            tl.store(out + OFFSET + j, tl.sum(term, axis=0))
    else:
        matrix = j[:, None] * contract.ARM_HIDDEN + j[None, :]
        if ROWS:
            tl.store(out + rows[:, None, None] * contract.ARM_NUM_PARAMETERS + OFFSET + matrix[None, :, :], term)
        else:
            tl.store(out + OFFSET + matrix, tl.sum(term, axis=0))


@triton.jit
def select_scale(k: tl.constexpr, z0, z1, z2, z3):
    """The k-th of up to four pointer arguments (k is a compile-time constant)."""
    pointer = z0
    if k == 1:
        pointer = z1
    if k == 2:
        pointer = z2
    if k == 3:
        pointer = z3
    return pointer


@triton.jit
def column(matrix, columns, k):
    """Column k of a (BLOCK_P, SCALES) per-scale matrix as a (BLOCK_P,) vector."""
    return tl.sum(tl.where(columns[None, :] == k, matrix, 0.0), axis=1)


@triton.jit
def log_prob_tile(
    k: tl.constexpr, z0, z1, z2, z3, base, stride_c, channels, channel_mask, in_range, log_norms, scale_columns
):
    """log p_k = z_k - logsumexp_c(z_k) on a (BLOCK_P, BLOCK_C) tile of scale k."""
    z = load_channels(select_scale(k, z0, z1, z2, z3) + base, stride_c, channels, channel_mask, in_range)
    return z - column(log_norms, scale_columns, k)[:, None]


@triton.jit
def log_mean_prob_tile(
    z0,
    z1,
    z2,
    z3,
    base,
    stride_c,
    channels,
    channel_mask,
    in_range,
    log_norms,
    scale_columns,
    log_num_scales,
    num_scales,
):
    """log q = logsumexp_k(log p_k) - log S on a tile over the first num_scales scales (online,
    fp32)."""
    running_max = log_prob_tile(
        0, z0, z1, z2, z3, base, stride_c, channels, channel_mask, in_range, log_norms, scale_columns
    )
    total = running_max * 0.0 + 1.0
    for k in tl.static_range(1, SCALE_SLOTS):
        if k < num_scales:
            log_p = log_prob_tile(
                k, z0, z1, z2, z3, base, stride_c, channels, channel_mask, in_range, log_norms, scale_columns
            )
            new_max = tl.maximum(running_max, log_p)
            total = total * tl.exp(running_max - new_max) + tl.exp(log_p - new_max)
            running_max = new_max
    return running_max + tl.log(total) - log_num_scales


@triton.jit
def multiscale_kl(
    z0,
    z1,
    z2,
    z3,
    base,
    stride_c,
    in_range,
    log_norms,
    scale_columns,
    log_num_scales,
    C,
    num_scales,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    SCALES: tl.constexpr,
):
    """Per pixel and scale KL(p_k || q) as a (BLOCK_P, SCALES) matrix, and max_c q."""
    kl = tl.zeros([BLOCK_P, SCALES], tl.float32)
    max_q = tl.zeros([BLOCK_P], tl.float32)
    for c_start in range(0, C, BLOCK_C):
        channels, channel_mask = channel_block(c_start, C, BLOCK_C)
        log_q = log_mean_prob_tile(
            z0,
            z1,
            z2,
            z3,
            base,
            stride_c,
            channels,
            channel_mask,
            in_range,
            log_norms,
            scale_columns,
            log_num_scales,
            num_scales,
        )
        max_q = tl.maximum(max_q, tl.max(tl.where(channel_mask[None, :], tl.exp(log_q), 0.0), axis=1))
        for k in tl.static_range(SCALES):
            if k < num_scales:
                log_p = log_prob_tile(
                    k, z0, z1, z2, z3, base, stride_c, channels, channel_mask, in_range, log_norms, scale_columns
                )
                term = tl.where(channel_mask[None, :], tl.exp(log_p) * (log_p - log_q), 0.0)
                kl += tl.where(scale_columns[None, :] == k, tl.sum(term, axis=1)[:, None], 0.0)
    return kl, max_q

"""Triton kernels behind QuantLinear on CUDA (models/quantize.py); CPU-only installs never import Triton.

- ``w8a16_matmul``: ``x @ (q * scale)ᵀ`` with int8 weights read as int8 (the ``int8-wo`` GEMM). Decode
  on a GPU reads every weight once per step, so loading int8 and converting in registers moves half
  the bytes of a bf16 GEMM, where dequantizing to a bf16 copy first would move more than the bf16
  GEMM alone. The per-output-channel scale is applied once, in the epilogue. Tile shapes follow the
  row count (decode batches vs prefill); they were picked on an H100 with
  ``load_tests/quant_kernel_bench.py`` (results in load_tests/results/compression/).
- ``fp8_act_matmul``: the ``fp8`` GEMM: per-token activation quantization in one kernel (instead of
  amax, divide and cast as separate launches), then ``torch._scaled_mm`` with both scales fused.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: QuantLinear's PyTorch paths
    triton = None

log = logging.getLogger(__name__)

DTYPES = (torch.bfloat16, torch.float16)
# What the fused GEMM makes of its input before multiplying (:func:`fused_matmul`).
PLAIN, NORM, SWIGLU = range(3)


if triton is not None:
    _NORM, _SWIGLU = tl.constexpr(NORM), tl.constexpr(SWIGLU)

    @triton.jit
    def _dot_rows(a_ptr, b_ptr, ra, rb, a_ok, b_ok, stride_a, stride_b, K,
                  BA: tl.constexpr, BB: tl.constexpr, BK: tl.constexpr, DTYPE: tl.constexpr):  # fmt: skip
        """``acc[i, j] = Σₖ a[ra[i], k]·b[rb[j], k]`` in fp32 for two row-major ``[·, K]`` operands (the
        int8 one converted to ``DTYPE`` in registers); ``a_ok``/``b_ok``: which of the rows exist."""
        rk = tl.arange(0, BK)
        a_ptrs = a_ptr + ra[:, None] * stride_a + rk[None, :]  # [BA, BK]
        b_ptrs = b_ptr + rb[None, :] * stride_b + rk[:, None]  # [BK, BB]: b read transposed
        acc = tl.zeros([BA, BB], dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BK)):
            k_ok = rk < K - k * BK
            a = tl.load(a_ptrs, mask=a_ok[:, None] & k_ok[None, :], other=0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & b_ok[None, :], other=0)
            acc += tl.dot(a.to(DTYPE), b.to(DTYPE))
            a_ptrs += BK
            b_ptrs += BK
        return acc

    @triton.jit
    def _w8a16_kernel(
        x_ptr,  # [M, K] bf16/fp16, row-major
        w_ptr,  # [N, K] int8, row-major
        scale_ptr,  # [N] fp32
        out_ptr,  # [M, N]
        M,
        N,
        K,
        stride_xm,
        stride_wn,
        stride_om,
        BM: tl.constexpr,
        BN: tl.constexpr,
        BK: tl.constexpr,
        WEIGHT_FIRST: tl.constexpr,
    ):
        """``WEIGHT_FIRST`` computes the product transposed, outᵀ = W·xᵀ: the converted weight tile is the
        dot's first operand, which Hopper's wgmma may take from registers, and the few token rows become
        the narrow side (a 64×16 instruction instead of 16 rows padded from 1)."""
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        m_ok = rm < M
        n_ok = rn < N
        dtype = out_ptr.dtype.element_ty
        if WEIGHT_FIRST:
            acc = _dot_rows(w_ptr, x_ptr, rn, rm, n_ok, m_ok, stride_wn, stride_xm, K, BN, BM, BK, dtype)
            scale = tl.load(scale_ptr + rn, mask=n_ok, other=0.0)
            out = (acc * scale[:, None]).to(dtype)
            tl.store(out_ptr + rm[None, :] * stride_om + rn[:, None], out, mask=n_ok[:, None] & m_ok[None, :])
        else:
            acc = _dot_rows(x_ptr, w_ptr, rm, rn, m_ok, n_ok, stride_xm, stride_wn, K, BM, BN, BK, dtype)
            scale = tl.load(scale_ptr + rn, mask=n_ok, other=0.0)
            out = (acc * scale[None, :]).to(dtype)
            tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], out, mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _x_tile(x_ptr, kk, k_ok, K, norm_ptr, rstd, PROLOGUE: tl.constexpr, DTYPE: tl.constexpr):
        """A ``[1, BK]`` tile of one row of the GEMM's input, made in registers from what the previous op left: the
        row itself, RMSNorm of it (``rstd``, the norm's weight per column), or SwiGLU of a ``[gate | up]`` row
        (``silu(gate)·up``), rounded once to ``DTYPE``."""
        ptrs = x_ptr + kk[None, :]
        ok = k_ok[None, :]
        if PROLOGUE == _SWIGLU:
            gate = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
            up = tl.load(ptrs + K, mask=ok, other=0.0).to(tl.float32)
            return (gate * tl.sigmoid(gate) * up).to(DTYPE)
        x = tl.load(ptrs, mask=ok, other=0.0)
        if PROLOGUE == _NORM:
            w = tl.load(norm_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
            x = (x.to(tl.float32) * rstd[:, None] * w[None, :]).to(DTYPE)
        return x

    @triton.jit
    def _row_rstd(x_ptr, K, eps, BK: tl.constexpr):
        """RMSNorm's ``1 / rms`` of one row, [1]: each program sums the row's squares itself (one more read of K
        elements instead of another launch)."""
        rk = tl.arange(0, BK)
        squares = tl.zeros([1], dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BK)):
            kk = k * BK + rk
            x = tl.load(x_ptr + kk[None, :], mask=(kk < K)[None, :], other=0.0).to(tl.float32)
            squares += tl.sum(x * x, axis=1)
        return tl.rsqrt(squares / K + eps)

    @triton.jit
    def _gemv_kernel(
        x_ptr,  # [M, K] (SwiGLU: [M, 2K], gate then up)
        w_ptr,  # [N, K] int8 (with scale_ptr) or bf16/fp16, row-major
        scale_ptr,  # [N] fp32, read with HAS_SCALE
        norm_ptr,  # [K] RMSNorm weight, read with the NORM prologue
        res_ptr,  # [M, N] residual added to the product, read with RESIDUAL
        out_ptr,  # [M, N] contiguous
        N, K, eps, stride_x, stride_res,
        BN: tl.constexpr, BK: tl.constexpr, PROLOGUE: tl.constexpr, HAS_SCALE: tl.constexpr, RESIDUAL: tl.constexpr,
    ):  # fmt: skip
        """``residual + prologue(x) @ (w · scale)ᵀ`` row by row (the positions of a batch-1 step): what a decoder
        layer does between two GEMMs' worth of weights in one launch (norm → GEMM, GEMM → add, SwiGLU → GEMM → add).
        No tensor cores (a 16-row MMA tile is mostly padding for a few rows): products summed in registers over
        wide K tiles, so each program reads its few weight rows in one or two long loads. Each program computes one
        row (``program_id(1)``) the same way whatever the row count, so a row's result does not depend on the rows
        beside it: a verification step's positions equal one-position decode steps bit for bit."""
        pid_n = tl.program_id(0)
        row = tl.program_id(1)
        x_ptr += row * stride_x
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        n_ok = rn < N
        dtype = out_ptr.dtype.element_ty
        rstd = tl.zeros([1], dtype=tl.float32)
        if PROLOGUE == _NORM:
            rstd = _row_rstd(x_ptr, K, eps, BK)
        acc = tl.zeros([1, BN], dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BK)):
            kk = k * BK + rk
            k_ok = kk < K
            x = _x_tile(x_ptr, kk, k_ok, K, norm_ptr, rstd, PROLOGUE, dtype).to(tl.float32)
            w = tl.load(w_ptr + rn[:, None] * K + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
            acc += tl.sum(x[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
        if HAS_SCALE:
            acc = acc * tl.load(scale_ptr + rn, mask=n_ok, other=0.0)[None, :]
        out = acc.to(dtype)
        if RESIDUAL:  # the product rounded first, then added, as the unfused layer's two ops do
            res = tl.load(res_ptr + row * stride_res + rn[None, :], mask=n_ok[None, :], other=0.0)
            out = (out.to(tl.float32) + res.to(tl.float32)).to(dtype)
        tl.store(out_ptr + row * N + rn[None, :], out, mask=n_ok[None, :])

    @triton.jit
    def _gemv_rope_kernel(
        x_ptr,  # [M, K] the layer's input, normalized in the prologue
        w_ptr,  # [(H + 2·KVH)·D, K] the fused q/k/v projection: int8 (with scale_ptr) or bf16/fp16
        scale_ptr,
        norm_ptr,  # [K]
        cos_ptr,  # [M, D] RoPE at each token's position
        sin_ptr,  # [M, D] signed (first half negated), as models/llama.py's tables
        slot_ptr,  # [M] each token's cache slot
        q_ptr,  # [M, H, D] out: rotated queries
        k_ptr,  # [slots, KVH, D] cache
        v_ptr,
        K, eps, stride_x,
        H: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr, BP: tl.constexpr, BK: tl.constexpr,
        HAS_SCALE: tl.constexpr,
    ):  # fmt: skip
        """:func:`_gemv_kernel`'s norm → GEMM for the q/k/v projection, with RoPE and the cache write as its
        epilogue (models/paged_attention.py's ``rope_write_kv`` otherwise: one launch less per layer). Each
        program computes ``BP`` column pairs (j, j + D/2) of a head, the two halves rotate-half RoPE mixes, for one
        row (``program_id(1)``), as :func:`_gemv_kernel` does."""
        HALF: tl.constexpr = D // 2
        row = tl.program_id(1)
        x_ptr += row * stride_x
        cos_ptr += row * D
        sin_ptr += row * D
        q_ptr += row * H * D
        p = tl.program_id(0) * BP + tl.arange(0, BP)
        p_ok = p < (H + 2 * KVH) * HALF
        head = p // HALF
        j = p % HALF
        lo = head * D + j  # column of the pair's first half; its second half is lo + HALF
        rk = tl.arange(0, BK)
        dtype = q_ptr.dtype.element_ty
        rstd = _row_rstd(x_ptr, K, eps, BK)
        acc_lo = tl.zeros([1, BP], dtype=tl.float32)
        acc_hi = tl.zeros([1, BP], dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BK)):
            kk = k * BK + rk
            k_ok = kk < K
            x = _x_tile(x_ptr, kk, k_ok, K, norm_ptr, rstd, _NORM, dtype).to(tl.float32)
            ok = p_ok[:, None] & k_ok[None, :]
            w_lo = tl.load(w_ptr + lo[:, None] * K + kk[None, :], mask=ok, other=0).to(tl.float32)
            w_hi = tl.load(w_ptr + (lo + HALF)[:, None] * K + kk[None, :], mask=ok, other=0).to(tl.float32)
            acc_lo += tl.sum(x[:, None, :] * w_lo[None, :, :], axis=2)
            acc_hi += tl.sum(x[:, None, :] * w_hi[None, :, :], axis=2)
        if HAS_SCALE:
            acc_lo = acc_lo * tl.load(scale_ptr + lo, mask=p_ok, other=0.0)[None, :]
            acc_hi = acc_hi * tl.load(scale_ptr + lo + HALF, mask=p_ok, other=0.0)[None, :]
        # The projection rounded to the model's dtype first, as the unfused GEMM's output is, then rotated in fp32.
        a = tl.sum(acc_lo.to(dtype).to(tl.float32), axis=0)
        b = tl.sum(acc_hi.to(dtype).to(tl.float32), axis=0)
        rotate = head < H + KVH
        cos_lo, sin_lo = tl.load(cos_ptr + j).to(tl.float32), tl.load(sin_ptr + j).to(tl.float32)
        cos_hi, sin_hi = tl.load(cos_ptr + j + HALF).to(tl.float32), tl.load(sin_ptr + j + HALF).to(tl.float32)
        y_lo = tl.where(rotate, a * cos_lo + b * sin_lo, a)
        y_hi = tl.where(rotate, b * cos_hi + a * sin_hi, b)
        slot = tl.load(slot_ptr + row)
        is_q = p_ok & (head < H)
        is_k = p_ok & (head >= H) & rotate
        is_v = p_ok & (head >= H + KVH)
        q_at = q_ptr + tl.where(is_q, head, 0) * D + j
        tl.store(q_at, y_lo.to(dtype), mask=is_q)
        tl.store(q_at + HALF, y_hi.to(dtype), mask=is_q)
        k_at = k_ptr + (slot * KVH + tl.where(is_k, head - H, 0)) * D + j
        tl.store(k_at, y_lo.to(k_ptr.dtype.element_ty), mask=is_k)
        tl.store(k_at + HALF, y_hi.to(k_ptr.dtype.element_ty), mask=is_k)
        v_at = v_ptr + (slot * KVH + tl.where(is_v, head - H - KVH, 0)) * D + j
        tl.store(v_at, y_lo.to(v_ptr.dtype.element_ty), mask=is_v)
        tl.store(v_at + HALF, y_hi.to(v_ptr.dtype.element_ty), mask=is_v)

    @triton.jit
    def _row_quant_fp8_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_x, BLOCK: tl.constexpr):
        """One row per program: absmax → scale, x / scale → fp8. Rows ≥ M (cuBLASLt wants 16-row
        multiples) get zeros."""
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        ok = (cols < K) & (row < M)
        x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12) / 448.0
        tl.store(q_ptr + row * K + cols, (x / scale).to(q_ptr.dtype.element_ty), mask=cols < K)
        tl.store(s_ptr + row, scale)


def fp8_act_matmul(x: Tensor, qweight: Tensor, scale: Tensor) -> Tensor:
    """x: [M, K] bf16; qweight: [N, K] fp8 e4m3 → per-token fp8 activations (one fused kernel), then
    one cuBLASLt fp8 GEMM with both scales in its epilogue."""
    assert triton is not None
    x = x.contiguous()
    m, k = x.shape
    padded = -(-m // 16) * 16
    q = torch.empty(padded, k, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(padded, 1, dtype=torch.float32, device=x.device)
    _row_quant_fp8_kernel[(padded,)](x, q, s, m, k, x.stride(0), BLOCK=triton.next_power_of_2(k))
    out = torch._scaled_mm(q, qweight.t(), scale_a=s, scale_b=scale.view(1, -1), out_dtype=x.dtype)
    return out[:m]


Config = tuple[int, int, int, int, int, bool]  # BM, BN, BK, num_warps, num_stages, weight first


def pick_config(m: int, n: int, k: int) -> Config:
    """Tiles from the H100 sweep (load_tests/results/compression/quant_kernels_h100.md). Decode-sized
    inputs want narrow 16×32 tiles while that still gives a few programs per SM: each program then
    streams a thin slice of the weight, and the grid pulls the whole weight through every SM. Past
    that, the weight-first kernel with the widest tiles that still fill most SMs (few programs idle
    the chip; small tiles re-read the inputs)."""
    if m <= 16 or _programs(m, n, 16, 32) <= NARROW_PROGRAMS:
        return (16, 32, 256 if k >= 1536 else 128, 4, 4, False)
    if m <= 64:
        return (32 if m <= 32 else 64, 64, 128, 4, 4, True)
    for bm, bn in ((256, 128), (128, 128)):
        if bm <= m and _programs(m, n, bm, bn) >= WIDE_PROGRAMS:
            return (bm, bn, 64, 8, 3, True)
    return (64, 64, 128, 4, 4, True)


GemvConfig = tuple[int, int, int]  # BN, BK, num_warps
GEMV_MAX_INT8 = 1 << 22
GEMV_MAX_FLOAT = 1 << 25
"""Weights of at most this many elements (int8 / bf16) take the one-row fused kernel: every GEMM of the 135M model
and of the 1.7B in bf16; the 1.7B's larger int8 GEMMs are faster tiled, with separate norm/add kernels, except after
SwiGLU, whose two elementwise kernels the fused kernel saves too (load_tests/results/fused_decode/README.md,
"Fused GEMMs at batch 1")."""


def gemv_pays(n: int, k: int, swiglu: bool, quantized: bool) -> bool:
    return swiglu or n * k <= (GEMV_MAX_INT8 if quantized else GEMV_MAX_FLOAT)


def pick_gemv(k: int) -> GemvConfig:
    """Few weight rows per program, as wide a K tile as registers allow: the fastest of the candidates swept by
    load_tests/fused_gemm_bench.py at both models' shapes."""
    return (8, 1024, 4) if k <= 1024 else (4, 2048, 4)


def _programs(m: int, n: int, bm: int, bn: int) -> int:
    return -(-m // bm) * -(-n // bn)


NARROW_PROGRAMS = 512  # ~4 per SM on an H100 (132 SMs)
WIDE_PROGRAMS = 96  # ~3/4 of the SMs


def w8a16_matmul(x: Tensor, qweight: Tensor, scale: Tensor, config: Config | None = None) -> Tensor:
    """x: [M, K] bf16/fp16; qweight: [N, K] int8; scale: [N] fp32 → [M, N] in x's dtype."""
    assert triton is not None and qweight.stride(1) == 1, "the kernel reads weight rows as contiguous"
    m, k = x.shape
    n = qweight.shape[0]
    x = x.contiguous()
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    bm, bn, bk, warps, stages, weight_first = config or pick_config(m, n, k)
    grid = (triton.cdiv(n, bn), triton.cdiv(m, bm))
    _w8a16_kernel[grid](
        x, qweight, scale, out, m, n, k, x.stride(0), qweight.stride(0), out.stride(0),
        BM=bm, BN=bn, BK=bk, WEIGHT_FIRST=weight_first, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out


@torch.library.custom_op("lowlat::w8a16_matmul", mutates_args=())
def w8a16_op(x: Tensor, qweight: Tensor, scale: Tensor) -> Tensor:
    """:func:`w8a16_matmul` with its tile choice, as one opaque op for ``torch.compile`` (the choice
    branches on the row count, which a compiled decode step keeps symbolic)."""
    return w8a16_matmul(x, qweight, scale)


@w8a16_op.register_fake
def _(x: Tensor, qweight: Tensor, scale: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], qweight.shape[0])


def reference(x: Tensor, qweight: Tensor, scale: Tensor) -> Tensor:
    """What :func:`w8a16_matmul` computes, in fp32 through plain PyTorch."""
    return x.float() @ (qweight.float() * scale.float()[:, None]).t()


def fused_matmul(
    x: Tensor,
    weight: Tensor,
    scale: Tensor | None = None,
    norm_weight: Tensor | None = None,
    eps: float = 0.0,
    swiglu: bool = False,
    residual: Tensor | None = None,
    gemv: GemvConfig | None = None,
) -> Tensor:
    """``residual + f(x) @ (weight · scale)ᵀ`` for the few rows x of a batch-1 step, where f is RMSNorm with
    ``norm_weight`` and ``eps``, SwiGLU of ``x = [gate | up]`` (``swiglu``), or nothing. weight: [N, K] int8 with
    ``scale`` [N] fp32, or float without. A batch-1 step is a chain of launches of a few microseconds each: one
    launch (:func:`_gemv_kernel`) here instead of norm, GEMM, SwiGLU and add as separate kernels."""
    assert triton is not None and weight.is_contiguous() and x.stride(-1) == 1
    assert residual is None or (residual.stride(-1) == 1 and residual.shape[0] == x.shape[0])
    (m, width), (n, k) = x.shape, weight.shape
    assert width == (2 * k if swiglu else k)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    bn, bk, warps = gemv or pick_gemv(k)
    prologue = NORM if norm_weight is not None else SWIGLU if swiglu else PLAIN
    _gemv_kernel[(triton.cdiv(n, bn), m)](
        x, weight, scale if scale is not None else weight, norm_weight if norm_weight is not None else weight,
        residual if residual is not None else out, out, n, k, eps, x.stride(0),
        residual.stride(0) if residual is not None else 0,
        BN=bn, BK=bk, PROLOGUE=prologue, HAS_SCALE=scale is not None, RESIDUAL=residual is not None, num_warps=warps,
    )  # fmt: skip
    return out


@torch.library.custom_op("lowlat::norm_qkv_rope", mutates_args=("k_cache", "v_cache"))
def norm_qkv_rope(
    x: Tensor,
    weight: Tensor,
    scale: Tensor | None,
    norm_weight: Tensor,
    eps: float,
    cos: Tensor,
    sin: Tensor,
    slot: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    heads: int,
) -> Tensor:
    """The attention inputs of a batch-1 step's rows (its positions) in one launch: RMSNorm, the fused q/k/v
    projection, RoPE on queries and keys, keys and values written to the cache at ``slot``; returns the rotated
    queries [rows, heads, D]. x: [rows, K]; weight: [(heads + 2·KVH)·D, K] (int8 with ``scale``, or float);
    cos/sin: [rows, D] (sin signed as in models/llama.py's tables); slot: [rows]; caches: [slots, KVH, D]."""
    assert triton is not None and weight.is_contiguous() and x.stride(-1) == 1
    assert k_cache.is_contiguous() and v_cache.is_contiguous(), "the kernel addresses the caches by slot"
    kv_heads, dim = k_cache.shape[1], k_cache.shape[2]
    (rows, k), n = x.shape, weight.shape[0]
    assert n == (heads + 2 * kv_heads) * dim and dim % 2 == 0 and cos.shape == sin.shape == (rows, dim)
    q = torch.empty(rows, heads, dim, dtype=x.dtype, device=x.device)
    bn, bk, warps = pick_gemv(k)
    pairs = bn // 2
    _gemv_rope_kernel[(triton.cdiv(n // 2, pairs), rows)](
        x, weight, scale if scale is not None else weight, norm_weight, cos.contiguous(), sin.contiguous(),
        slot.contiguous(), q, k_cache, v_cache, k, eps, x.stride(0), H=heads, KVH=kv_heads, D=dim, BP=pairs,
        BK=bk, HAS_SCALE=scale is not None, num_warps=warps,
    )  # fmt: skip
    return q


@norm_qkv_rope.register_fake
def _(
    x: Tensor,
    weight: Tensor,
    scale: Tensor | None,
    norm_weight: Tensor,
    eps: float,
    cos: Tensor,
    sin: Tensor,
    slot: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    heads: int,
) -> Tensor:
    return x.new_empty(x.shape[0], heads, k_cache.shape[2])


@torch.library.custom_op("lowlat::fused_matmul", mutates_args=())
def fused_op(
    x: Tensor,
    weight: Tensor,
    scale: Tensor | None,
    norm_weight: Tensor | None,
    eps: float,
    swiglu: bool,
    residual: Tensor | None,
) -> Tensor:
    """:func:`fused_matmul` as one opaque op for ``torch.compile``, which keeps the kernel as it is."""
    return fused_matmul(x, weight, scale, norm_weight, eps, swiglu, residual)


@fused_op.register_fake
def _(
    x: Tensor,
    weight: Tensor,
    scale: Tensor | None,
    norm_weight: Tensor | None,
    eps: float,
    swiglu: bool,
    residual: Tensor | None,
) -> Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


def fused_reference(
    x: Tensor,
    weight: Tensor,
    scale: Tensor | None = None,
    norm_weight: Tensor | None = None,
    eps: float = 0.0,
    swiglu: bool = False,
    residual: Tensor | None = None,
) -> Tensor:
    """What :func:`fused_matmul` computes, in fp32 through plain PyTorch (the product rounded to x's dtype
    before the residual add, as the kernel does)."""
    xf = x.float()
    if norm_weight is not None:
        xf = torch.nn.functional.rms_norm(xf, xf.shape[-1:], norm_weight.float(), eps)
    if swiglu:
        gate, up = xf.chunk(2, dim=-1)
        xf = torch.nn.functional.silu(gate) * up
    w = weight.float() if scale is None else weight.float() * scale.float()[:, None]
    out = (xf @ w.t()).to(x.dtype)
    return out if residual is None else (out.float() + residual.float()).to(x.dtype)


PICKABLE_CONFIGS: tuple[Config, ...] = (
    (16, 32, 128, 4, 4, False), (16, 32, 256, 4, 4, False), (32, 64, 128, 4, 4, True), (64, 64, 128, 4, 4, True),
    (128, 128, 64, 8, 3, True), (256, 128, 64, 8, 3, True),
)  # fmt: skip
"""Every tile ``pick_config`` can return: the self-check compiles and checks each (a tile too large
for a smaller GPU's shared memory then turns the kernel off at startup, not mid-request)."""


def _agrees(fn: object, method: str, device: torch.device, dtype: torch.dtype, tol: float) -> bool:
    """Runs ``fn(x, q, s)`` on fresh random data of odd shapes (every mask, both tile regimes) against
    :func:`reference`; logs and returns False on a disagreement or any Triton/driver error."""
    try:
        gen = torch.Generator(device="cpu").manual_seed(0)
        n, k = (208, 336) if method == "fp8" else (200, 328)  # cuBLASLt fp8 wants multiples of 16
        for m in (1, 7, 40, 130, 300):
            x = torch.randn(m, k, generator=gen).to(device, dtype)
            w = torch.randn(n, k, generator=gen) / 10
            amax = w.abs().amax(dim=1)
            if method == "fp8":
                s = amax / 448.0
                q = (w / s[:, None]).to(torch.float8_e4m3fn)
            else:
                s = amax / 127.0
                q = (w / s[:, None]).round().to(torch.int8)
            q, s = q.to(device), s.to(device)
            want = reference(x, q, s)
            err = float((fn(x, q, s).float() - want).norm() / want.norm())  # type: ignore[operator]
            if not err < tol:
                log.warning("%s kernel disagrees with the reference (m=%d, error %.3g)", method, m, err)
                return False
        return True
    except Exception as exc:  # a Triton/driver problem must not take the server down
        log.warning("%s kernel unavailable: %s: %s", method, type(exc).__name__, exc)
        return False


# Answers of the self-checks below, by (kernel, device, dtype). A plain dict rather than functools.cache:
# a compiled decode step (engine/cuda_graphs.py) reads an answer as a constant, where it would trace
# into a cached function; the step runs once eagerly before compiling, so the answers exist by then.
_checked: dict[tuple[str, str, torch.dtype], bool] = {}


def usable(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the int8 weight-only kernel runs here and agrees with the reference with every tile it
    may use (checked once per device/dtype); otherwise QuantLinear dequantizes."""
    return _checked_once("int8-wo", device, dtype, _int8_wo_agrees)


def fused_usable(device: torch.device, dtype: torch.dtype, quantized: bool) -> bool:
    """Whether :func:`fused_matmul` runs here and agrees with :func:`fused_reference` in every form a decoder
    layer uses, with every tile it may pick, for int8 (``quantized``) or float weights (checked once each)."""
    kernel = "fused-int8" if quantized else "fused-float"
    return _checked_once(kernel, device, dtype, lambda device, dtype: _fused_agrees(device, dtype, quantized))


def fp8_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the fused fp8 path runs here (fp8 tensor cores: compute capability ≥ 8.9) and agrees
    with the reference within fp8 activation rounding; otherwise QuantLinear's unfused path is used."""
    return _checked_once("fp8", device, dtype, _fp8_agrees)


def _checked_once(
    kernel: str, device: torch.device, dtype: torch.dtype, check: Callable[[torch.device, torch.dtype], bool]
) -> bool:
    """``check``'s answer, asked once per (kernel, device, dtype) and only where a Triton kernel may run."""
    key = (kernel, str(device), dtype)
    if key not in _checked:
        _checked[key] = triton is not None and device.type == "cuda" and dtype in DTYPES and check(device, dtype)
    return _checked[key]


def _int8_wo_agrees(device: torch.device, dtype: torch.dtype) -> bool:
    return all(
        _agrees(lambda x, q, s, c=c: w8a16_matmul(x, q, s, c), "int8-wo", device, dtype, 1e-2) for c in PICKABLE_CONFIGS
    )


def _fp8_agrees(device: torch.device, dtype: torch.dtype) -> bool:
    capable = torch.cuda.get_device_capability(device) >= (8, 9)
    return capable and _agrees(fp8_act_matmul, "fp8", device, dtype, 6e-2)


def _fused_agrees(device: torch.device, dtype: torch.dtype, quantized: bool) -> bool:
    try:
        gen = torch.Generator(device="cpu").manual_seed(0)
        n, k = 203, 1100  # partial tiles in N and in K
        w = torch.randn(n, k, generator=gen) / 10
        scale = w.abs().amax(dim=1) / 127.0
        q = (w / scale[:, None]).round().to(torch.int8)
        weight, scale = (q.to(device), scale.to(device)) if quantized else (w.to(device, dtype), None)
        norm = (1 + torch.randn(k, generator=gen) / 4).to(device, dtype)
        x = torch.randn(3, 2 * k, generator=gen).to(device, dtype)  # rows strided (2K apart) but for SwiGLU's
        res = torch.randn(3, n, generator=gen).to(device, dtype)
        forms = ({"norm_weight": norm, "eps": 1e-5}, {"residual": res}, {"swiglu": True, "residual": res})
        for gemv, kwargs in itertools.product(((8, 1024, 4), (4, 2048, 4)), forms):  # both tiles pick_gemv returns
            xs = x if kwargs.get("swiglu") else x[:, :k]
            want = fused_reference(xs, weight, scale, **kwargs).float()
            got = fused_matmul(xs, weight, scale, **kwargs, gemv=gemv)  # type: ignore[arg-type]
            err = float((got.float() - want).norm() / want.norm())
            last = {**kwargs, "residual": res[2:]} if "residual" in kwargs else kwargs
            alone = fused_matmul(xs[2:], weight, scale, **last, gemv=gemv)  # type: ignore[arg-type]
            if not err < 1e-2 or not torch.equal(alone, got[2:]):
                log.warning("fused GEMM disagrees with the reference or row by row (%s, %s: %.3g)", gemv, kwargs, err)
                return False
        return _norm_qkv_rope_agrees(device, dtype, quantized, gen)
    except Exception as exc:  # a Triton/driver problem must not take the server down
        log.warning("fused GEMM unavailable: %s: %s", type(exc).__name__, exc)
        return False


def _norm_qkv_rope_agrees(device: torch.device, dtype: torch.dtype, quantized: bool, gen: torch.Generator) -> bool:
    """:func:`norm_qkv_rope` against norm → GEMM (:func:`fused_reference`) → RoPE as models/llama.py applies it →
    a plain cache write, for two rows, with both tiles pick_gemv returns (K below and above 1024)."""
    from models.llama import apply_rope  # imported here: models/llama.py imports this module

    heads, kv_heads, dim, slots, rows = 3, 1, 16, 12, 2
    n = (heads + 2 * kv_heads) * dim
    for k in (328, 1100):
        w = torch.randn(n, k, generator=gen) / 10
        scale = w.abs().amax(dim=1) / 127.0
        q8 = (w / scale[:, None]).round().to(torch.int8)
        weight, scale = (q8.to(device), scale.to(device)) if quantized else (w.to(device, dtype), None)
        x = torch.randn(rows, k, generator=gen).to(device, dtype)
        norm = (1 + torch.randn(k, generator=gen) / 4).to(device, dtype)
        angles = torch.rand(rows, dim, generator=gen) * 6.3
        cos, sin = angles.cos(), angles.sin() * torch.cat([-torch.ones(dim // 2), torch.ones(dim // 2)])
        slot = torch.tensor([5, 9], device=device)
        k_cache = torch.zeros(slots, kv_heads, dim, device=device, dtype=dtype)
        v_cache = torch.zeros_like(k_cache)
        dev_cos, dev_sin = cos.to(device, dtype), sin.to(device, dtype)
        got_q = norm_qkv_rope(x, weight, scale, norm, 1e-5, dev_cos, dev_sin, slot, k_cache, v_cache, heads)
        qkv = fused_reference(x, weight, scale, norm_weight=norm, eps=1e-5).float().cpu()
        qk = qkv[:, : (heads + kv_heads) * dim].view(1, rows, -1, dim)
        rotated = apply_rope(qk, cos[None], sin[None])[0]  # [rows, heads + kv_heads, dim]
        want_k, want_v = torch.zeros(k_cache.shape), torch.zeros(k_cache.shape)
        want_k[[5, 9]] = rotated[:, heads:]
        want_v[[5, 9]] = qkv[:, (heads + kv_heads) * dim :].view(rows, kv_heads, dim)
        for name, got, want in (("q", got_q, rotated[:, :heads]), ("k", k_cache, want_k), ("v", v_cache, want_v)):
            err = float((got.float().cpu() - want).norm() / want.norm())
            if not err < 1e-2:
                log.warning("fused norm + QKV + RoPE disagrees with the reference (K=%d, %s: error %.3g)", k, name, err)
                return False
    return True

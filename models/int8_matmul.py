"""``x @ (q * scale)ᵀ`` with int8 weights read as int8 (Triton, CUDA only): the int8-wo GEMM on GPUs.

Decode on a GPU reads every weight once per step, so a kernel that loads int8 and converts it in
registers moves half the bytes of a bf16 GEMM, where dequantizing to a bf16 copy first would move
more than the bf16 GEMM alone. The per-output-channel scale is applied once, in the epilogue.
Tile shapes follow the row count (decode batches vs prefill); they were picked on an H100 with
``load_tests/int8_kernel_bench.py`` (results in load_tests/results/compression/).
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: QuantLinear dequantizes instead
    triton = None

log = logging.getLogger(__name__)

DTYPES = (torch.bfloat16, torch.float16)


if triton is not None:

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
    ):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        m_ok = rm < M
        n_ok = rn < N
        x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :]
        w_ptrs = w_ptr + rn[None, :] * stride_wn + rk[:, None]  # [BK, BN]: the weight read transposed
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BK)):
            k_ok = rk < K - k * BK
            x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0)
            acc += tl.dot(x, w.to(x.dtype))
            x_ptrs += BK
            w_ptrs += BK
        scale = tl.load(scale_ptr + rn, mask=n_ok, other=0.0)
        out = (acc * scale[None, :]).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], out, mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _w8a16_weight_first_kernel(
        x_ptr, w_ptr, scale_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    ):  # fmt: skip
        """The same product computed transposed, outᵀ = W·xᵀ: the converted weight tile is the dot's
        first operand, which Hopper's wgmma may take from registers, and the few token rows become
        the narrow side (a 64×16 instruction instead of 16 rows padded from 1)."""
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        m_ok = rm < M
        n_ok = rn < N
        w_ptrs = w_ptr + rn[:, None] * stride_wn + rk[None, :]  # [BN, BK]
        x_ptrs = x_ptr + rm[None, :] * stride_xm + rk[:, None]  # [BK, BM]: the input read transposed
        acc = tl.zeros([BN, BM], dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BK)):
            k_ok = rk < K - k * BK
            w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0)
            x = tl.load(x_ptrs, mask=k_ok[:, None] & m_ok[None, :], other=0.0)
            acc += tl.dot(w.to(x.dtype), x)
            x_ptrs += BK
            w_ptrs += BK
        scale = tl.load(scale_ptr + rn, mask=n_ok, other=0.0)
        out = (acc * scale[:, None]).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + rm[None, :] * stride_om + rn[:, None], out, mask=n_ok[:, None] & m_ok[None, :])


Config = tuple[int, int, int, int, int, bool]  # BM, BN, BK, num_warps, num_stages, weight first


def pick_config(m: int, n: int, k: int) -> Config:
    """Tiles from the H100 sweep (load_tests/results/compression/int8_kernel_h100.md). Decode-sized
    inputs want narrow 16×32 tiles while that still gives a few programs per SM: each program then
    streams a thin slice of the weight, and the grid pulls the whole weight through every SM. Past
    that, and for prefill, wider tiles re-read the weight less and keep the tensor cores busy."""
    deep = 256 if k >= 1536 else 128
    if m <= 16 or -(-n // 32) * -(-m // 16) <= NARROW_PROGRAMS:
        return (16, 32, deep, 4, 4, False)
    if m <= 64:
        return (32 if m <= 32 else 64, 64, 128, 4, 4, False)
    if n >= 8192:
        return (128, 128, 64, 4, 4, False)
    return (64, 64, 128, 4, 4, False) if m <= 256 else (64, 128, 64, 4, 4, False)


NARROW_PROGRAMS = 512  # ~4 per SM on an H100 (132 SMs)


def w8a16_matmul(x: Tensor, qweight: Tensor, scale: Tensor, config: Config | None = None) -> Tensor:
    """x: [M, K] bf16/fp16; qweight: [N, K] int8; scale: [N] fp32 → [M, N] in x's dtype."""
    assert triton is not None
    m, k = x.shape
    n = qweight.shape[0]
    x = x.contiguous()
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    bm, bn, bk, warps, stages, weight_first = config or pick_config(m, n, k)
    grid = (triton.cdiv(n, bn), triton.cdiv(m, bm))
    kernel = _w8a16_weight_first_kernel if weight_first else _w8a16_kernel
    kernel[grid](
        x, qweight, scale, out, m, n, k, x.stride(0), qweight.stride(0), out.stride(0),
        BM=bm, BN=bn, BK=bk, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out


def reference(x: Tensor, qweight: Tensor, scale: Tensor) -> Tensor:
    """What :func:`w8a16_matmul` computes, in fp32 through plain PyTorch."""
    return x.float() @ (qweight.float() * scale.float()[:, None]).t()


SELF_CHECK_CONFIGS: tuple[Config, ...] = ((16, 32, 128, 4, 4, False), (16, 64, 128, 4, 4, True))


@functools.cache
def usable(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the kernel runs here and agrees with :func:`reference` (checked once per device/dtype,
    on odd shapes that exercise every mask, and with each tile shape); a failure logs why and
    QuantLinear dequantizes instead."""
    if triton is None or device.type != "cuda" or dtype not in DTYPES:
        return False
    try:
        gen = torch.Generator(device="cpu").manual_seed(0)
        for m in (1, 7, 40, 130, 300):
            n, k = 200, 328
            x = torch.randn(m, k, generator=gen).to(device, dtype)
            q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8).to(device)
            s = (torch.rand(n, generator=gen) / 100).to(device)
            want = reference(x, q, s)
            for config in (None, *SELF_CHECK_CONFIGS):
                got = w8a16_matmul(x, q, s, config).float()
                err = float((got - want).norm() / want.norm())
                if not err < 1e-2:
                    log.warning("int8 weight-only kernel disagrees with the reference (m=%d, %s, error %.3g)",
                                m, config, err)  # fmt: skip
                    return False
        return True
    except Exception as exc:  # a Triton/driver problem must not take the server down
        log.warning("int8 weight-only kernel unavailable: %s: %s", type(exc).__name__, exc)
        return False

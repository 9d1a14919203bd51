"""Decode attention straight from the paged KV cache (Triton, CUDA only).

The portable path (models/llama.py) gathers each row's K/V blocks into a dense tensor and calls SDPA:
at 256 sequences that copy moves more bytes than the attention itself reads. This kernel reads K/V
in place through the block table, once per KV head for all the query heads sharing it (GQA), with an
online softmax over tiles of the context. One launch per layer replaces gather + mask + SDPA.

A speculative verification step has several queries per sequence (its last token and its drafts). Their
keys and values are in the cache before attention runs, so each query is a decode query of its own whose
context ends at its position: ``rows_per_table`` consecutive queries share one block table, and causality
within the sequence is each query's context length. Verification then costs a decode step of more rows.

Before attention, :func:`rope_write_kv` applies RoPE to the step's queries and keys and writes keys and values
into the cache in one launch per layer, where rotary embedding and the two cache writes took three.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the SDPA path is used
    triton = None


def available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


if triton is not None:

    @triton.jit
    def _decode_kernel(
        q_ptr,  # [B, H, D]
        k_ptr,  # [slots, KVH, D]
        v_ptr,
        tables_ptr,  # [B // rows_per_table, max_blocks]
        lens_ptr,  # [B]
        out_ptr,  # [B, H, D]
        scale,
        rows_per_table,
        tables_stride,
        max_blocks,
        num_tiles,
        KVH: tl.constexpr,
        G: tl.constexpr,
        PAD_G: tl.constexpr,
        D: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        g = tl.arange(0, PAD_G)
        d = tl.arange(0, D)
        g_ok = g < G
        heads = kvh * G + g
        q = tl.load(q_ptr + (b * KVH * G + heads)[:, None] * D + d[None, :], mask=g_ok[:, None], other=0.0)
        ctx = tl.load(lens_ptr + b)
        table = tables_ptr + (b // rows_per_table) * tables_stride
        m = tl.full([PAD_G], float("-inf"), tl.float32)
        s = tl.zeros([PAD_G], tl.float32)
        acc = tl.zeros([PAD_G, D], tl.float32)
        # A fixed trip count (the caller's bucket), masked past ``ctx``: masked loads move no bytes.
        for tile in range(0, num_tiles):
            n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = n < ctx
            block_ok = n_ok & (n // BLOCK_SIZE < max_blocks)
            block = tl.load(table + n // BLOCK_SIZE, mask=block_ok, other=0)
            slot = block * BLOCK_SIZE + n % BLOCK_SIZE
            offs = (slot * KVH + kvh)[:, None] * D + d[None, :]
            k = tl.load(k_ptr + offs, mask=n_ok[:, None], other=0.0)
            v = tl.load(v_ptr + offs, mask=n_ok[:, None], other=0.0)
            scores = tl.dot(q, tl.trans(k)) * scale  # [PAD_G, BLOCK_N], fp32
            scores = tl.where(n_ok[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(scores - m_new[:, None])
            s = s * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        out = acc / s[:, None]
        out_offs = (b * KVH * G + heads)[:, None] * D + d[None, :]
        tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None])

    @triton.jit
    def _rope_write_kv_kernel(
        qkv_ptr,  # [R, (H + 2 * KVH) * D]: the fused projection's output, one row per token
        cos_ptr,  # [R, D]
        sin_ptr,  # [R, D], first half negated (models/llama.py rope_tables)
        slots_ptr,  # [R] cache slot of each token
        q_ptr,  # [R, H, D] out: rotated queries
        k_ptr,  # [slots, KVH, D] cache
        v_ptr,
        qkv_stride,
        rope_stride,
        H: tl.constexpr,
        KVH: tl.constexpr,
        D: tl.constexpr,
    ):
        r = tl.program_id(0)
        head = tl.program_id(1)  # query heads, then key heads, then value heads
        d = tl.arange(0, D)
        row = qkv_ptr + r * qkv_stride + head * D
        x = tl.load(row + d)
        if head < H + KVH:  # rotate-half RoPE as x·cos + roll(x, D/2)·signed_sin, in fp32, rounded once
            rolled = tl.load(row + (d + D // 2) % D).to(tl.float32)
            cos = tl.load(cos_ptr + r * rope_stride + d).to(tl.float32)
            sin = tl.load(sin_ptr + r * rope_stride + d).to(tl.float32)
            y = x.to(tl.float32) * cos + rolled * sin
            if head < H:
                tl.store(q_ptr + (r * H + head) * D + d, y.to(q_ptr.dtype.element_ty))
            else:
                slot = tl.load(slots_ptr + r)
                tl.store(k_ptr + (slot * KVH + head - H) * D + d, y.to(k_ptr.dtype.element_ty))
        else:
            slot = tl.load(slots_ptr + r)
            tl.store(v_ptr + (slot * KVH + head - H - KVH) * D + d, x.to(v_ptr.dtype.element_ty))


@torch.library.custom_op("lowlat::rope_write_kv", mutates_args=("k_cache", "v_cache"))
def rope_write_kv(
    qkv: Tensor, cos: Tensor, sin: Tensor, slots: Tensor, k_cache: Tensor, v_cache: Tensor, heads: int
) -> Tensor:
    """RoPE on each token's queries and keys, keys and values written to the cache at ``slots``; returns the
    rotated queries. qkv: [R, (heads + 2 · KVH) · D] (rows contiguous); cos/sin: [R, D] (sin signed as in
    models/llama.py's tables); slots: [R]; caches: [slots, KVH, D]. Returns [R, heads, D]. One opaque op, so
    ``torch.compile`` keeps the kernel as it is instead of tracing its launch."""
    assert triton is not None
    rows = qkv.shape[0]
    kv_heads, dim = k_cache.shape[1], k_cache.shape[2]
    assert qkv.shape[1] == (heads + 2 * kv_heads) * dim and cos.shape == sin.shape == (rows, dim)
    assert k_cache.is_contiguous() and v_cache.is_contiguous(), "the kernel addresses the caches by slot"
    qkv, cos, sin = qkv.contiguous(), cos.contiguous(), sin.contiguous()  # no copies for the model's own tensors
    q = torch.empty(rows, heads, dim, dtype=qkv.dtype, device=qkv.device)
    _rope_write_kv_kernel[(rows, heads + 2 * kv_heads)](
        qkv, cos, sin, slots, q, k_cache, v_cache, qkv.stride(0), cos.stride(0), H=heads, KVH=kv_heads, D=dim
    )
    return q


@rope_write_kv.register_fake
def _(qkv: Tensor, cos: Tensor, sin: Tensor, slots: Tensor, k_cache: Tensor, v_cache: Tensor, heads: int) -> Tensor:
    return qkv.new_empty(qkv.shape[0], heads, k_cache.shape[2])


@torch.library.custom_op("lowlat::paged_decode_attention", mutates_args=())
def paged_decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    context_lens: Tensor,
    block_size: int,
    rows_per_table: int = 1,
) -> Tensor:
    """softmax(q·Kᵀ/√d)·V over each row's first ``context_lens`` cached tokens.

    q: [B, H, D]; k_cache/v_cache: [slots, KVH, D] (slot = block · block_size + offset);
    block_tables: [B / rows_per_table, max_blocks] (row r reads table r // rows_per_table);
    context_lens: [B] (≥ 1). Returns [B, H, D] in q's dtype. One opaque op, so ``torch.compile`` keeps the
    kernel as it is instead of tracing its launch (whose grid and constants depend on the shapes).
    """
    assert triton is not None
    batch, heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    q = q.contiguous()
    out = torch.empty_like(q)
    _decode_kernel[(batch, kv_heads)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        out,
        dim**-0.5,
        rows_per_table,
        block_tables.stride(0),
        block_tables.shape[1],
        triton.cdiv(block_tables.shape[1] * block_size, 64),
        KVH=kv_heads,
        G=group,
        PAD_G=max(16, triton.next_power_of_2(group)),
        D=dim,
        BLOCK_SIZE=block_size,
        BLOCK_N=64,
    )
    return out


@paged_decode_attention.register_fake
def _(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, tables: Tensor, lens: Tensor, block_size: int, rows_per_table: int = 1
) -> Tensor:
    return torch.empty_like(q)


def reference_decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    context_lens: Tensor,
    block_size: int,
    rows_per_table: int = 1,
) -> Tensor:
    """Plain PyTorch, row by row: what :func:`paged_decode_attention` must compute."""
    group = q.shape[1] // k_cache.shape[1]
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        pos = torch.arange(int(context_lens[b]), device=q.device)
        slots = block_tables[b // rows_per_table, pos // block_size] * block_size + pos % block_size
        k = k_cache[slots].float().repeat_interleave(group, dim=1)  # [L, H, D]
        v = v_cache[slots].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,lhd->hl", q[b].float(), k) * q.shape[-1] ** -0.5
        out[b] = torch.einsum("hl,lhd->hd", scores.softmax(-1), v).to(q.dtype)
    return out


def self_check(
    device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, block_size: int
) -> str | None:
    """Runs the kernel once on random data against the reference; returns why it cannot be used, or None."""
    try:
        gen = torch.Generator(device="cpu").manual_seed(0)
        blocks, batch = 24, 3
        k = torch.randn(blocks * block_size, kv_heads, head_dim, generator=gen).to(device, dtype)
        v = torch.randn(blocks * block_size, kv_heads, head_dim, generator=gen).to(device, dtype)
        q = torch.randn(batch, heads, head_dim, generator=gen).to(device, dtype)
        tables = (torch.randperm(blocks - 1, generator=gen)[: batch * 6] + 1).view(batch, 6).to(device)
        lens = torch.tensor([1, 5 * block_size + 3, 6 * block_size], device=device)
        # As decode rows, and as a verification step: three queries per table, each seeing up to its position.
        width = 3
        wide_q = torch.randn(batch * width, heads, head_dim, generator=gen).to(device, dtype)
        wide_lens = (lens.repeat_interleave(width) - torch.arange(width, device=device).flip(0).repeat(batch)).clamp(
            min=1
        )
        for rows, row_lens, per_table in ((q, lens, 1), (wide_q, wide_lens, width)):
            got = paged_decode_attention(rows, k, v, tables, row_lens, block_size, per_table).float()
            want = reference_decode_attention(rows, k, v, tables, row_lens, block_size, per_table).float()
            err = float((got - want).norm() / want.norm())
            if err >= 2e-2:
                return f"paged decode kernel disagrees with the reference (rel. error {err:.3g}, width {per_table})"
        return _check_rope_write_kv(device, dtype, heads, kv_heads, head_dim, gen)
    except Exception as exc:  # a Triton/driver problem must not take the engine down: use the SDPA path
        return f"paged decode kernel unavailable: {type(exc).__name__}: {exc}"


def _check_rope_write_kv(
    device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, gen: torch.Generator
) -> str | None:
    """:func:`rope_write_kv` against RoPE as models/llama.py applies it and a plain write into the cache."""
    from models.llama import apply_rope  # imported here: models/llama.py imports this module

    rows, slots_total = 5, 40
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * head_dim, generator=gen)
    angles = torch.rand(rows, head_dim, generator=gen) * 6.3
    cos, sin = angles.cos(), angles.sin()
    slots = torch.randperm(slots_total, generator=gen)[:rows]
    k_cache = torch.zeros(slots_total, kv_heads, head_dim, device=device, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    dev = (qkv.to(device, dtype), cos.to(device, dtype), sin.to(device, dtype), slots.to(device))
    q = rope_write_kv(*dev, k_cache, v_cache, heads).float().cpu()
    rotated = apply_rope(
        qkv[:, : (heads + kv_heads) * head_dim].view(rows, 1, -1, head_dim), cos[:, None], sin[:, None]
    )
    want_k, want_v = torch.zeros(k_cache.shape), torch.zeros(k_cache.shape)
    want_k[slots] = rotated[:, 0, heads:]
    want_v[slots] = qkv[:, (heads + kv_heads) * head_dim :].view(rows, kv_heads, head_dim)
    for name, got, want in (("q", q, rotated[:, 0, :heads]), ("k", k_cache, want_k), ("v", v_cache, want_v)):
        err = float((got.float().cpu() - want).norm() / want.norm())
        if err >= 2e-2:
            return f"fused RoPE + cache write disagrees with the reference ({name}: rel. error {err:.3g})"
    return None

"""Tensor parallelism (Megatron-style) for :class:`models.llama.Llama`: one shard per rank of a process group.

Attention heads and MLP channels are split across ranks: q/k/v and gate/up are *column*-parallel (each rank
keeps its heads' / channels' output rows), o_proj and down_proj are *row*-parallel (each rank keeps the
matching input columns and its partial sums are all-reduced). The embedding, the norms and the LM head stay
whole on every rank, so every rank ends each layer with the full hidden state and the KV cache of a rank
holds only its own KV heads. Sharding works on plain and 8-bit (:class:`QuantLinear`) projections alike:
their scales are per output row, so rows split with them and columns leave them whole.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist
from torch import Tensor, nn

from models.llama import Llama, ModelArgs
from models.quantize import QuantLinear


class RowParallel(nn.Module):
    """A row-parallel projection: this rank's partial product, summed over the group (one all-reduce,
    which NCCL can record inside a CUDA graph)."""

    def __init__(self, inner: nn.Module, group: dist.ProcessGroup | None) -> None:
        super().__init__()
        self.inner = inner
        self.group = group

    def forward(self, x: Tensor) -> Tensor:
        out = self.inner(x)
        dist.all_reduce(out, group=self.group)
        return out


def _split(n: int, world: int, what: str) -> int:
    if n % world:
        raise ValueError(f"tensor parallel size {world} does not divide {what} ({n})")
    return n // world


def _rows(layer: nn.Module, start: int, stop: int) -> nn.Module:
    """Output rows [start, stop) of a Linear or QuantLinear (column parallel)."""
    bias = None if layer.bias is None else nn.Parameter(layer.bias.detach()[start:stop].clone(), requires_grad=False)
    if isinstance(layer, QuantLinear):
        q = QuantLinear(layer.in_features, stop - start, bias is not None, layer.method, device="meta")
        q.qweight, q.scale, q.bias = layer.qweight[start:stop].clone(), layer.scale[start:stop].clone(), bias
        return q
    if type(layer) is not nn.Linear:
        raise TypeError(f"cannot shard a {type(layer).__name__}")
    out = nn.Linear(layer.in_features, stop - start, bias=bias is not None, device="meta")
    out.weight = nn.Parameter(layer.weight.detach()[start:stop].clone(), requires_grad=False)
    out.bias = bias
    return out


def _columns(layer: nn.Module, start: int, stop: int, rank: int) -> nn.Module:
    """Input columns [start, stop) of a Linear or QuantLinear (row parallel); a bias is added once, on rank 0."""
    bias = layer.bias if rank == 0 else None
    if isinstance(layer, QuantLinear):
        q = QuantLinear(stop - start, layer.out_features, bias is not None, layer.method, device="meta")
        q.qweight, q.scale, q.bias = layer.qweight[:, start:stop].clone(), layer.scale.clone(), bias
        return q
    if type(layer) is not nn.Linear:
        raise TypeError(f"cannot shard a {type(layer).__name__}")
    out = nn.Linear(stop - start, layer.out_features, bias=bias is not None, device="meta")
    out.weight = nn.Parameter(layer.weight.detach()[:, start:stop].clone(), requires_grad=False)
    out.bias = bias
    return out


def local_heads(args: ModelArgs, world: int) -> tuple[int, int]:
    """Attention and key/value heads per rank; refuses a split that does not divide them."""
    return _split(args.num_heads, world, "the attention heads"), _split(args.num_kv_heads, world, "the key/value heads")


def shard_llama(model: Llama, rank: int, world: int, group: dist.ProcessGroup | None = None) -> Llama:
    """Keeps this rank's shard of every layer of ``model`` (in place; before ``fuse_projections``) and
    returns it; ``model.args`` then describes the shard (its heads), which is what its KV cache holds."""
    if world == 1:
        return model
    a = model.args
    heads, kv_heads = local_heads(a, world)
    d = a.head_dim
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if attn.qkv_proj is not None or mlp.gate_up_proj is not None:
            raise ValueError("shard before fusing projections")
        attn.q_proj = _rows(attn.q_proj, rank * heads * d, (rank + 1) * heads * d)
        attn.k_proj = _rows(attn.k_proj, rank * kv_heads * d, (rank + 1) * kv_heads * d)
        attn.v_proj = _rows(attn.v_proj, rank * kv_heads * d, (rank + 1) * kv_heads * d)
        attn.o_proj = RowParallel(_columns(attn.o_proj, rank * heads * d, (rank + 1) * heads * d, rank), group)
        attn.num_heads, attn.num_kv_heads = heads, kv_heads
        width = mlp.up_proj.out_features  # pruning may leave any width: shards may differ by one channel
        lo, hi = width * rank // world, width * (rank + 1) // world
        mlp.gate_proj, mlp.up_proj = _rows(mlp.gate_proj, lo, hi), _rows(mlp.up_proj, lo, hi)
        mlp.down_proj = RowParallel(_columns(mlp.down_proj, lo, hi, rank), group)
    model.args = replace(a, num_heads=heads, num_kv_heads=kv_heads)
    return model


def init_group(rank: int, world: int, address: str, device: torch.device) -> None:
    """Joins the default process group (NCCL on CUDA, gloo on CPU) at ``tcp://`` ``address``."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, init_method=f"tcp://{address}", rank=rank, world_size=world, **kwargs)


# NVLink multicast (NVLS) stays off in every process that joins a group: on shared hosts a program using it
# can take the GPUs out of service, and NCCL's all-reduce at decode sizes does not need it.
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}

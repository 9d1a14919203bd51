"""Tensor parallelism (Megatron-style) for :class:`models.llama.Llama`: one shard per rank of a process group.

Attention heads and MLP channels are split across ranks: q/k/v and gate/up are *column*-parallel (each rank
keeps its heads' / channels' output rows), o_proj and down_proj are *row*-parallel (each rank keeps the
matching input columns and its partial sums are all-reduced). The embedding, the norms and the LM head stay
whole on every rank, so every rank ends each layer with the full hidden state and the KV cache of a rank
holds only its own KV heads. Sharding works on plain and 8-bit (:class:`QuantLinear`) projections alike:
their scales are per output row, so rows split with them and columns leave them whole.

The row-parallel sums of a decode step are small (a few rows of the hidden size) and there are two per layer:
on CUDA they run as a one-shot all-reduce over torch's symmetric memory (:class:`SymmetricAllReduce`, one
kernel of peer loads over NVLink, no multicast) up to :data:`SYMMETRIC_MAX_BYTES`, NCCL's beyond that, and
NCCL's alone where symmetric memory cannot be set up; on CPU gloo's. Inside a compiled decode step
(engine/cuda_graphs.py) the sum is one opaque custom op (:func:`all_reduce_op`), as the paged-attention and int8
kernels are, so inductor compiles the rest of the step around it: the residual add and the next RMSNorm fuse
behind it, RoPE and SiLU·mul as in a one-GPU step.
"""

from __future__ import annotations

import itertools
import logging
import warnings
import weakref
from dataclasses import replace
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from models.llama import Llama, ModelArgs
from models.quantize import QuantLinear

log = logging.getLogger(__name__)

AllReduceKind = Literal["auto", "nccl"]
# The one-shot kernel reads every peer's whole tensor, so it suits small tensors (decode steps: rows x hidden);
# prefill's larger sums go to NCCL. Tensors must be 16-byte multiples at 16-byte offsets (the kernel's vectors).
SYMMETRIC_MAX_BYTES = 8 << 20
SYMMETRIC_ALIGNMENT = 16
SYMMETRIC_DTYPES = (torch.bfloat16, torch.float32)  # what torch's one-shot kernel is built for


def fits_symmetric(x: Tensor, dtype: torch.dtype, max_bytes: int) -> bool:
    """Whether the one-shot kernel over a buffer of ``max_bytes`` (of ``dtype``) can sum ``x``."""
    nbytes = x.numel() * x.element_size()
    return (
        x.dtype == dtype
        and x.is_contiguous()
        and 0 < nbytes <= max_bytes
        and nbytes % SYMMETRIC_ALIGNMENT == 0
        and x.storage_offset() * x.element_size() % SYMMETRIC_ALIGNMENT == 0
    )


class SymmetricAllReduce:
    """A one-shot all-reduce over CUDA symmetric memory (``torch.distributed._symmetric_memory`` and torch's
    ``symm_mem.one_shot_all_reduce_copy_out``, or ``one_shot_all_reduce_out`` after a copy): each rank copies
    its tensor into a buffer every rank has mapped, the ranks meet at a barrier on the device, and each sums
    all the buffers into its own tensor, with a second barrier before a buffer may be written again. One
    kernel and no host work, so a CUDA graph records it as it records any kernel; the buffer lives as long as
    the process (graphs keep its address). Peer loads only: no NVLink multicast. Creating one is collective
    over ``group``."""

    @staticmethod
    def unavailable(dtype: torch.dtype) -> str | None:
        """Why this torch build cannot run it for ``dtype`` (None when it can), found without collectives."""
        if dtype not in SYMMETRIC_DTYPES:
            return f"the one-shot kernel sums {SYMMETRIC_DTYPES}, not {dtype}"
        try:
            import torch.distributed._symmetric_memory

            torch.ops.symm_mem.one_shot_all_reduce_out  # noqa: B018
        except (ImportError, AttributeError, RuntimeError) as exc:
            return f"torch {torch.__version__} has no symmetric-memory one-shot all-reduce ({exc})"
        return None

    def __init__(self, group: dist.ProcessGroup, device: torch.device, dtype: torch.dtype, max_bytes: int) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        # The copy in is fused into the kernel where torch has it (``one_shot_all_reduce_copy_out``), else a copy
        # before it: either way before the kernel's first barrier, after the last call's second one.
        self.fused_copy = hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy_out")
        self.group_name = group.group_name
        self.dtype, self.max_bytes = dtype, max_bytes
        if hasattr(symm_mem, "enable_symm_mem_for_group"):  # older torch needs it; newer deprecates it
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                symm_mem.enable_symm_mem_for_group(self.group_name)
        self.buffer = symm_mem.empty(max_bytes // dtype.itemsize, dtype=dtype, device=device)
        symm_mem.rendezvous(self.buffer, self.group_name)

    def fits(self, x: Tensor) -> bool:
        return fits_symmetric(x, self.dtype, self.max_bytes)

    def __call__(self, x: Tensor) -> Tensor:
        """The sum of ``x`` over the group, in a new tensor (inside a graph, from the graph's pool): the kernel
        makes no promise for an output that is also its input."""
        flat, ops = x.view(-1), torch.ops.symm_mem
        buffer, out = self.buffer[: flat.numel()], torch.empty_like(flat)
        if self.fused_copy:
            ops.one_shot_all_reduce_copy_out(buffer, flat, "sum", self.group_name, out)
        else:
            buffer.copy_(flat)
            ops.one_shot_all_reduce_out(buffer, "sum", self.group_name, out)
        return out.view(x.shape)

    def check(self, rank: int, world: int) -> str | None:
        """Why its sums are wrong (None when right): small integers, exact in any float type, at each size
        class a decode step uses (one row, many rows, the whole buffer)."""
        for numel in (SYMMETRIC_ALIGNMENT, 4096, self.max_bytes // self.dtype.itemsize):
            base = torch.arange(numel, device=self.buffer.device) % 16  # sums up to 148 at 8 ranks: exact in bf16
            x = (base + rank).to(self.dtype)
            expected = (base * world + world * (world - 1) // 2).to(self.dtype)
            if not torch.equal(self(x), expected):
                return f"one-shot sum of {numel} elements differs from the exact sum"
        return None


class AllReduce:
    """Sums a row-parallel partial product over the group: the one-shot kernel over symmetric memory (into a
    new tensor) when it is set up and the tensor fits, else ``dist.all_reduce`` (in place: NCCL on CUDA,
    gloo on CPU; into a copy inside a compiled step, :meth:`summed`).
    The choice depends only on the tensor's shape, dtype and layout, so every rank makes the same one, and a
    CUDA graph records the one made at capture."""

    def __init__(self, group: dist.ProcessGroup | None = None, symmetric: SymmetricAllReduce | None = None) -> None:
        self.group = group
        self.symmetric = symmetric
        # How the compiled step's op finds this instance: numbered in creation order, so the same in every
        # start of a process (inductor's cache keys on the graph, this string included).
        self.key = f"tp-all-reduce-{next(_numbers)}"
        _REDUCERS[self.key] = self

    def __call__(self, x: Tensor) -> Tensor:
        # Dynamo's own flag, as models/llama.py's compiled branches: eager steps served meanwhile stay eager.
        if torch.compiler.is_dynamo_compiling():
            return all_reduce_op(x, self.key)
        if self.symmetric is not None and self.symmetric.fits(x):
            return self.symmetric(x)
        dist.all_reduce(x, group=self.group)
        return x

    def summed(self, x: Tensor) -> Tensor:
        """The sum of ``x`` over the group in a new tensor, ``x`` left as it was (what a custom op may do)."""
        if self.symmetric is not None and self.symmetric.fits(x):
            return self.symmetric(x)
        out = x.clone()
        dist.all_reduce(out, group=self.group)
        return out

    def describe(self) -> str:
        if self.symmetric is None:
            return "NCCL/gloo (dist.all_reduce)"
        return f"one-shot over symmetric memory up to {self.symmetric.max_bytes} bytes, NCCL beyond"


_REDUCERS: weakref.WeakValueDictionary[str, AllReduce] = weakref.WeakValueDictionary()
_numbers = itertools.count()


@torch.library.custom_op("lowlat::tp_all_reduce", mutates_args=())
def all_reduce_op(x: Tensor, key: str) -> Tensor:
    """:meth:`AllReduce.summed` of the AllReduce named ``key``, as one opaque op for ``torch.compile``: dynamo
    does not trace a collective or the one-shot kernel's launch, and a custom op takes only tensors and plain
    values, hence the name. Functional (a new tensor, its input untouched), so inductor may schedule and
    fuse everything around it; every rank's graph holds the same chain of them, in the order of the layers."""
    return _REDUCERS[key].summed(x)


@all_reduce_op.register_fake
def _(x: Tensor, key: str) -> Tensor:
    return torch.empty_like(x)


def _all_ranks(ok: bool, group: dist.ProcessGroup | None, device: torch.device) -> bool:
    """Whether ``ok`` holds on every rank (a collective): the ranks must choose the same all-reduce, or
    one would wait at a barrier the other never reaches."""
    flag = torch.tensor([int(ok)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


def make_all_reduce(
    kind: AllReduceKind,
    device: torch.device,
    dtype: torch.dtype,
    group: dist.ProcessGroup | None = None,
    max_bytes: int = SYMMETRIC_MAX_BYTES,
    symmetric: type[SymmetricAllReduce] = SymmetricAllReduce,
) -> AllReduce:
    """The row-parallel all-reduce for this rank (collective: every rank of ``group`` calls it together).
    ``auto`` on CUDA sets up the one-shot kernel over symmetric memory and checks its sums; any failure on
    any rank leaves every rank on NCCL, with a log line saying why. ``nccl``, or CPU: ``dist.all_reduce``."""
    if kind == "nccl" or device.type != "cuda":
        return AllReduce(group)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    found: SymmetricAllReduce | None = None
    why = symmetric.unavailable(dtype)
    # Agreed before the (collective) setup too: a rank that cannot start it must not leave the others waiting.
    if _all_ranks(why is None, group, device):
        try:
            found = symmetric(group or dist.group.WORLD, device, dtype, max_bytes)
            why = found.check(rank, world)
        except Exception as exc:  # no peer access, an allocation or a kernel that failed: NCCL serves
            why = f"{type(exc).__name__}: {exc}"[:300]
    if not _all_ranks(why is None, group, device):
        log.warning("tensor parallel all-reduce falls back to NCCL: %s", why or "symmetric memory failed on a peer")
        return AllReduce(group)
    chosen = AllReduce(group, found)
    log.info("tensor parallel all-reduce: %s", chosen.describe())
    return chosen


class RowParallel(nn.Module):
    """A row-parallel projection: this rank's partial product, summed over the group (one all-reduce,
    which a CUDA graph records)."""

    def __init__(self, inner: nn.Module, all_reduce: AllReduce) -> None:
        super().__init__()
        self.inner = inner
        self.all_reduce = all_reduce

    def forward(self, x: Tensor) -> Tensor:
        return self.all_reduce(self.inner(x))


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


def shard_llama(model: Llama, rank: int, world: int, all_reduce: AllReduce | None = None) -> Llama:
    """Keeps this rank's shard of every layer of ``model`` (in place; before ``fuse_projections``) and
    returns it; ``model.args`` then describes the shard (its heads), which is what its KV cache holds.
    ``all_reduce`` sums the row-parallel products (default: ``dist.all_reduce`` over the default group)."""
    if world == 1:
        return model
    all_reduce = all_reduce or AllReduce()
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
        attn.o_proj = RowParallel(_columns(attn.o_proj, rank * heads * d, (rank + 1) * heads * d, rank), all_reduce)
        attn.num_heads, attn.num_kv_heads = heads, kv_heads
        width = mlp.up_proj.out_features  # pruning may leave any width: shards may differ by one channel
        lo, hi = width * rank // world, width * (rank + 1) // world
        mlp.gate_proj, mlp.up_proj = _rows(mlp.gate_proj, lo, hi), _rows(mlp.up_proj, lo, hi)
        mlp.down_proj = RowParallel(_columns(mlp.down_proj, lo, hi, rank), all_reduce)
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

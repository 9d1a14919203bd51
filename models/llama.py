"""A plain-PyTorch Llama-family decoder (Llama, Mistral, Qwen2) that reads and writes a paged KV cache.

Every forward pass — prompt prefill or one decode step, one sequence or many — takes the same inputs:
token ids and positions padded to ``[batch, q_len]`` plus an :class:`AttentionMetadata` saying where the
new keys/values go (``slot_mapping``) and which cache blocks each row attends to (``block_tables`` +
``mask``). One code path keeps CPU and GPU, batched and alone, numerically the same.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import PretrainedConfig

from models import quant_kernels
from models.paged_attention import paged_decode_attention, rope_write_kv
from models.quantize import QuantLinear

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# Every SDPA backend but cuDNN's, which torch prefers on Hopper: it builds an execution plan per input shape
# (milliseconds of host time per layer), and a prefill step's shape (rows, width, context) changes nearly every
# step (load_tests/results/serve/README.md, "Session 7"). torch's backend switch is process-wide: while a prefill
# runs, another thread's SDPA (the encoder's) also skips cuDNN, which changes only its rounding.
PREFILL_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class AttentionMetadata:
    slot_mapping: Tensor  # [batch * q_len] flat cache slot for each new token (padding → scratch slot 0)
    block_tables: Tensor  # [batch, kv_len // block_size] cache blocks of each row's context (padding → block 0)
    mask: Tensor | None  # [batch, 1, q_len, kv_len] bool, True where a query may attend; None with context_lens
    block_size: int
    # Decode and verification steps, set where models/paged_attention.py can run: [batch * q_len] tokens in
    # each query's context (its position + 1). Attention then reads the cache in place instead of gathering + SDPA.
    context_lens: Tensor | None = None
    # Verification steps on the gather + SDPA path: each position attends in an SDPA call of its own, shaped as
    # a decode step's, so its sums are the decode step's and verifying drafts reproduces decoding bit for bit
    # (one call for all positions sums in another order, which int8's per-token activation scales amplify:
    # load_tests/results/speculative/README.md, "Verification equal to decoding on CPU").
    per_position: bool = False


@dataclass
class LayerInputs:
    """What every layer of one forward pass reads besides its hidden states and its slice of the cache."""

    cos: Tensor  # [b, t, head_dim] RoPE tables at each token's position
    sin: Tensor  # signed sin (see rope_tables)
    meta: AttentionMetadata
    bias: Tensor | None  # additive attention mask, None where the paged decode kernel reads the cache itself


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position: int
    tie_word_embeddings: bool

    @classmethod
    def from_hf(cls, config: PretrainedConfig) -> ModelArgs:
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"generation supports model types {SUPPORTED_MODEL_TYPES}, got {config.model_type!r}")
        rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"rope_type {rope_type!r} is not supported (only 'default')")
        theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        heads = config.num_attention_heads
        return cls(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            rms_norm_eps=config.rms_norm_eps,
            rope_theta=float(theta),
            max_position=config.max_position_embeddings,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # One fused kernel on CUDA (it accumulates in fp32 even for bf16 inputs); the same math on CPU.
        return F.rms_norm(x, x.shape[-1:], self.weight, self.eps)


def rope_tables(args: ModelArgs) -> tuple[Tensor, Tensor]:
    """cos and *signed* sin (first half negated), so rotate-half becomes a roll: see :func:`apply_rope`. On the
    CPU, also inside a meta-device context (a model being built), where they would import torch._dynamo."""
    cpu = torch.device("cpu")
    exponents = torch.arange(0, args.head_dim, 2, dtype=torch.float32, device=cpu) / args.head_dim
    freqs = torch.outer(torch.arange(args.max_position, dtype=torch.float32, device=cpu), args.rope_theta**-exponents)
    emb = torch.cat([freqs, freqs], dim=-1)
    sign = torch.cat([-torch.ones(args.head_dim // 2, device=cpu), torch.ones(args.head_dim // 2, device=cpu)])
    return emb.cos(), emb.sin() * sign


def apply_rope(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """Rotate-half RoPE (the Hugging Face layout) in three kernels: x·cos + roll(x)·signed_sin, since
    cat(-x2, x1)·sin == roll(x, d/2)·(sin with its first half negated). x: [b, t, heads, d], cos/sin: [b, t, d]."""
    return torch.addcmul(x * cos.unsqueeze(2), x.roll(x.shape[-1] // 2, dims=-1), signed_sin.unsqueeze(2))


@torch.library.custom_op("lowlat::write_kv", mutates_args=("k_cache", "v_cache"))
def write_kv(k_cache: Tensor, v_cache: Tensor, slots: Tensor, k: Tensor, v: Tensor) -> None:
    """``index_copy_`` of new keys/values into the paged cache, as one opaque op for ``torch.compile``:
    traced, the copy into a slice of the cache became a copy of the whole layer's cache every step."""
    k_cache.index_copy_(0, slots, k)
    v_cache.index_copy_(0, slots, v)


def compiled_decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: AttentionMetadata) -> Tensor:
    """Decode attention (one query per row) as plain tensor math for ``torch.compile``: inductor fuses the
    reads of the cache by slot into the score and output reductions, where gather + SDPA first copied
    every row's whole context. q: [b, 1, h, d] → [b, h, d]; query head = kv_head * g + j, as in HF."""
    b, _, h, d = q.shape
    kvh = k_cache.shape[1]
    g, bs = h // kvh, meta.block_size
    kv_len = meta.block_tables.shape[1] * bs
    pos = torch.arange(kv_len, device=q.device)
    slots = meta.block_tables[:, pos // bs] * bs + pos % bs  # [b, kv_len]
    keys, values = k_cache[slots].transpose(1, 2), v_cache[slots].transpose(1, 2)  # [b, kvh, kv_len, d]
    scores = (q.view(b, kvh, 1, g, d) * keys.unsqueeze(3)).sum(-1) * d**-0.5  # [b, kvh, kv_len, g]
    assert meta.mask is not None
    scores = scores.masked_fill(~meta.mask.view(b, 1, kv_len, 1), float("-inf"))
    return (scores.softmax(dim=2).unsqueeze(-1) * values.unsqueeze(3)).sum(2).reshape(b, h, d)


def _concat_linear(parts: tuple[nn.Module, ...]) -> nn.Linear | None:
    """One Linear computing all ``parts`` side by side (one GEMM launch instead of several), or None
    when any part is not a plain nn.Linear (e.g. replaced by a compression pass)."""
    if not all(type(p) is nn.Linear for p in parts):
        return None
    linears: list[nn.Linear] = list(parts)  # type: ignore[arg-type]
    w = linears[0].weight
    has_bias = linears[0].bias is not None
    fused = nn.Linear(
        w.shape[1], sum(p.weight.shape[0] for p in linears), bias=has_bias, device=w.device, dtype=w.dtype
    )
    with torch.no_grad():
        fused.weight.copy_(torch.cat([p.weight for p in linears]))
        if has_bias:
            fused.bias.copy_(torch.cat([p.bias for p in linears]))  # type: ignore[misc]
    return fused.requires_grad_(False)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.hidden_size, args.num_heads * args.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(args.hidden_size, args.num_kv_heads * args.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(args.hidden_size, args.num_kv_heads * args.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(args.num_heads * args.head_dim, args.hidden_size, bias=False)
        self.qkv_proj: nn.Linear | None = None  # set by fuse()

    def fuse(self) -> None:
        """Replace q/k/v projections by one (the decode step is launch-bound: fewer kernels, faster steps)."""
        fused = _concat_linear((self.q_proj, self.k_proj, self.v_proj))
        if fused is not None:
            self.qkv_proj, self.q_proj, self.k_proj, self.v_proj = fused, None, None, None

    def forward(self, x: Tensor, shared: LayerInputs, kv: tuple[Tensor, Tensor]) -> Tensor:
        b, t, _ = x.shape
        cos, sin, meta, bias = shared.cos, shared.sin, shared.meta, shared.bias
        h, kvh, d = self.num_heads, self.num_kv_heads, self.head_dim
        if self.qkv_proj is not None:
            qkv = self.qkv_proj(x)
        else:
            qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        k_cache, v_cache = kv
        if meta.context_lens is not None:  # paged decode or verification (CUDA): two kernels, both on the cache
            return self.o_proj(self.paged(qkv.reshape(b * t, -1), shared, kv, t).view(b, t, h * d))
        qk = apply_rope(qkv[..., : (h + kvh) * d].view(b, t, h + kvh, d), cos, sin)  # q and k in one pass
        q, k = qk[:, :, :h], qk[:, :, h:]
        v = qkv[..., (h + kvh) * d :].view(b, t, kvh, d)
        # Decode steps compiled by engine/cuda_graphs.py. Dynamo's own flag, not ``is_compiling()``: that one
        # is a process-wide flag held for a whole compile, so eager steps served meanwhile (a compile on a
        # background thread) would take the compiled branches too.
        compiling = torch.compiler.is_dynamo_compiling()
        if compiling:
            write_kv(k_cache, v_cache, meta.slot_mapping, k.reshape(-1, kvh, d), v.reshape(-1, kvh, d))
        else:
            k_cache.index_copy_(0, meta.slot_mapping, k.reshape(-1, kvh, d))
            v_cache.index_copy_(0, meta.slot_mapping, v.reshape(-1, kvh, d))
        if compiling and t == 1:
            return self.o_proj(compiled_decode_attention(q, k_cache, v_cache, meta).view(b, 1, h * d))
        assert bias is not None
        # Gather whole blocks (rows of block_size·kvh·d contiguous values) with index_select, which
        # copies such rows near memory bandwidth; advanced indexing went element by element.
        blocks = meta.block_tables.reshape(-1)
        num_blocks = k_cache.shape[0] // meta.block_size
        keys = k_cache.view(num_blocks, -1).index_select(0, blocks).view(b, -1, kvh, d).transpose(1, 2)
        values = v_cache.view(num_blocks, -1).index_select(0, blocks).view(b, -1, kvh, d).transpose(1, 2)
        # Grouped-query attention without repeating K/V: the g query heads that share a KV head become
        # g*t query rows of that head (head = kv_head * g + j, as in HF's repeat_kv); ``bias`` is laid
        # out to match (see Llama.forward).
        g = h // kvh
        if meta.per_position:
            q, mask = q.reshape(b, t, kvh, g, d), bias.view(b, 1, g, t, -1)
            outs = [F.scaled_dot_product_attention(q[:, j], keys, values, attn_mask=mask[:, :, :, j]) for j in range(t)]
            return self.o_proj(torch.stack(outs, dim=1).reshape(b, t, -1))
        q = q.reshape(b, t, kvh, g, d).permute(0, 2, 3, 1, 4).reshape(b, kvh, g * t, d)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias)
        out = out.view(b, kvh, g, t, d).permute(0, 3, 1, 2, 4)
        return self.o_proj(out.reshape(b, t, -1))

    def paged(self, qkv: Tensor, shared: LayerInputs, kv: tuple[Tensor, Tensor], width: int) -> Tensor:
        """Attention of a decode or verification step on the paged kernels, before ``o_proj``: RoPE and the cache
        write in one kernel, attention read from the cache in another. qkv: [rows, ·] → [rows, heads · head_dim]."""
        rows, d, meta = qkv.shape[0], self.head_dim, shared.meta
        k_cache, v_cache = kv
        cos, sin = shared.cos.reshape(rows, d), shared.sin.reshape(rows, d)
        q = rope_write_kv(qkv, cos, sin, meta.slot_mapping, k_cache, v_cache, self.num_heads)
        return self.attend_paged(q, shared, kv, width)

    def attend_paged(self, q: Tensor, shared: LayerInputs, kv: tuple[Tensor, Tensor], width: int) -> Tensor:
        """Paged attention of rotated queries [rows, heads, head_dim] whose keys and values are in the cache."""
        meta = shared.meta
        assert meta.context_lens is not None
        tables, lens = meta.block_tables, meta.context_lens
        out = paged_decode_attention(q, kv[0], kv[1], tables, lens, meta.block_size, width)
        return out.view(q.shape[0], -1)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, args.hidden_size, bias=False)
        self.gate_up_proj: nn.Linear | None = None  # set by fuse()

    def fuse(self) -> None:
        fused = _concat_linear((self.gate_proj, self.up_proj))
        if fused is not None:
            self.gate_up_proj, self.gate_proj, self.up_proj = fused, None, None

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, qkv_bias: bool, intermediate_size: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args, qkv_bias)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args, intermediate_size)
        self.fused_gemms = False  # set by Llama.fuse_projections

    def forward(self, x: Tensor, shared: LayerInputs, kv: tuple[Tensor, Tensor]) -> Tensor:
        # A paged step (CUDA) of one sequence, where a step is launch-bound: decode, or verification of its
        # drafts. The shape is looked at last, so other steps' compiled graphs get no guard on it (their batch is
        # static at 1 or dynamic from 2).
        paged = self.fused_gemms and shared.meta.context_lens is not None
        if paged and x.shape[0] == 1 and _fused_kernel_runs(x, self.mlp.down_proj):
            return self._fused_forward(x, shared, kv)
        x = x + self.self_attn(self.input_layernorm(x), shared, kv)
        return x + self.mlp(self.post_attention_layernorm(x))

    def can_fuse_gemms(self) -> bool:
        """Whether every GEMM of the layer takes :func:`models.quant_kernels.fused_matmul`'s kernel: fused
        projections, all of int8 weight-only or all of float weights, without bias (not sharded, not another
        format), small enough for that kernel to pay (other layers stay as inductor fuses them: measured no slower)."""
        attn, mlp = self.self_attn, self.mlp
        forms = ((attn.qkv_proj, False), (attn.o_proj, False), (mlp.gate_up_proj, False), (mlp.down_proj, True))
        quantized = {isinstance(p, QuantLinear) for p, _ in forms}  # one kind per layer: one self-check answers
        return len(quantized) == 1 and all(_gemv_pays(p, swiglu) for p, swiglu in forms)

    def _fused_forward(self, x: Tensor, shared: LayerInputs, kv: tuple[Tensor, Tensor]) -> Tensor:
        """A batch-1 step of the layer in five launches (CUDA): norm → q/k/v → RoPE → cache write
        (:func:`models.quant_kernels.norm_qkv_rope`), paged attention, then GEMMs that take in the residual add
        after them or the norm or SwiGLU before them (:func:`models.quant_kernels.fused_matmul`). Each position is
        computed as a one-position step would compute it, so verifying drafts reproduces decoding bit for bit."""
        b, t, hidden = x.shape
        attn, mlp, norm = self.self_attn, self.mlp, self.input_layernorm
        x = x.reshape(b * t, hidden)
        weight, scale = _weights(attn.qkv_proj)
        cos, sin = shared.cos.reshape(b * t, -1), shared.sin.reshape(b * t, -1)
        slot, heads = shared.meta.slot_mapping, attn.num_heads
        q = quant_kernels.norm_qkv_rope(x, weight, scale, norm.weight, norm.eps, cos, sin, slot, *kv, heads)
        x = _gemm(attn.attend_paged(q, shared, kv, t), attn.o_proj, residual=x)
        gate_up = _gemm(x, mlp.gate_up_proj, norm=self.post_attention_layernorm)
        return _gemm(gate_up, mlp.down_proj, swiglu=True, residual=x).view(b, t, hidden)


def _plain_gemm(linear: nn.Module | None) -> bool:
    if isinstance(linear, QuantLinear):
        return linear.method == "int8-wo" and linear.bias is None and linear.qweight.is_contiguous()
    return type(linear) is nn.Linear and linear.bias is None and linear.weight.is_contiguous()


def _fused_kernel_runs(x: Tensor, linear: nn.Module) -> bool:
    """Whether the fused kernel's self-check passed here for ``linear``'s weight kind (one kind per fused layer)."""
    return quant_kernels.fused_usable(x.device, x.dtype, quantized=isinstance(linear, QuantLinear))


def _gemv_pays(linear: nn.Module | None, swiglu: bool = False) -> bool:
    """Whether ``linear`` can take :func:`models.quant_kernels.fused_matmul`'s kernel and that kernel pays for it."""
    if not _plain_gemm(linear):
        return False
    n, k = linear.out_features, linear.in_features  # type: ignore[union-attr]
    return quant_kernels.gemv_pays(n, k, swiglu, isinstance(linear, QuantLinear))  # type: ignore[arg-type]


def _weights(linear: nn.Module) -> tuple[Tensor, Tensor | None]:
    if isinstance(linear, QuantLinear):
        return linear.qweight, linear.scale
    return linear.weight, None  # type: ignore[return-value]


def _gemm(
    x: Tensor, linear: nn.Module, norm: RMSNorm | None = None, swiglu: bool = False, residual: Tensor | None = None
) -> Tensor:
    weight, scale = _weights(linear)
    norm_weight, eps = (norm.weight, norm.eps) if norm is not None else (None, 0.0)
    return quant_kernels.fused_op(x, weight, scale, norm_weight, eps, swiglu, residual)


class Llama(nn.Module):
    """Parameter names mirror Hugging Face's, so an HF state dict loads as is.

    ``intermediate_sizes`` (one per layer) lets structured pruning leave layers with different MLP widths.
    """

    def __init__(self, args: ModelArgs, qkv_bias: bool = False, intermediate_sizes: list[int] | None = None) -> None:
        super().__init__()
        self.args = args
        sizes = intermediate_sizes or [args.intermediate_size] * args.num_layers
        # Built on the meta device and assigned its weights (from_hf, models/checkpoint.py): left uninitialized, as a
        # meta-device normal_ imports torch._dynamo (load_tests/results/ready_time/README.md).
        self.embed_tokens = nn.Embedding(
            args.vocab_size, args.hidden_size, _weight=torch.empty(args.vocab_size, args.hidden_size)
        )
        self.layers = nn.ModuleList(DecoderLayer(args, qkv_bias, size) for size in sizes)
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        # Decode steps on CUDA fold norms, SwiGLU and residual adds into the GEMMs where they can (DecoderLayer);
        # off only to measure without it (load_tests/fused_decode_bench.py).
        self.fold_into_gemms = True
        self.fused_head = False  # set by fuse_projections: batch-1 steps' logits through the fused GEMM kernel
        cos, sin = rope_tables(args)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @classmethod
    def from_hf(cls, config: PretrainedConfig, state_dict: dict[str, Tensor]) -> Llama:
        args = ModelArgs.from_hf(config)
        qkv_bias = "model.layers.0.self_attn.q_proj.bias" in state_dict
        sizes = [state_dict[f"model.layers.{i}.mlp.up_proj.weight"].shape[0] for i in range(args.num_layers)]
        with torch.device("meta"):
            model = cls(args, qkv_bias, sizes)
        weights = {k.removeprefix("model."): v for k, v in state_dict.items()}
        if "lm_head.weight" not in weights:
            weights["lm_head.weight"] = weights["embed_tokens.weight"]
        model.load_state_dict(weights, strict=True, assign=True)
        if args.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight  # one Parameter, so .to(device) keeps one copy
        cos, sin = rope_tables(args)
        model.rope_cos, model.rope_sin = cos, sin
        return model.eval()

    def fuse_projections(self) -> None:
        """Fuse q/k/v and gate/up projections where they are plain nn.Linear (after any compression pass), and
        mark the layers whose decode steps can fold norms, SwiGLU and residual adds into their GEMMs."""
        for layer in self.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()
            layer.fused_gemms = self.fold_into_gemms and layer.can_fuse_gemms()
        self.fused_head = self.fold_into_gemms and _gemv_pays(self.lm_head)

    def forward(
        self,
        input_ids: Tensor,
        positions: Tensor,
        meta: AttentionMetadata,
        kv_cache: tuple[Tensor, Tensor],
    ) -> Tensor:
        """Returns final hidden states [b, t, hidden]; call :meth:`logits` on the rows you need."""
        x = self.embed_tokens(input_ids)
        cos = self.rope_cos[positions].to(x.dtype)
        sin = self.rope_sin[positions].to(x.dtype)
        # Additive mask built once for all layers, rows repeated for the g query heads per KV head.
        g = self.args.num_heads // self.args.num_kv_heads
        bias = None
        if meta.mask is not None:
            bias = torch.zeros(meta.mask.shape, dtype=x.dtype, device=x.device).masked_fill_(~meta.mask, float("-inf"))
            bias = bias.repeat(1, 1, g, 1) if g > 1 else bias
        shared = LayerInputs(cos, sin, meta, bias)
        k_cache, v_cache = kv_cache
        # Steps through SDPA keep off cuDNN's (PREFILL_SDPA); compiled steps were captured with their shapes.
        eager_sdpa = bias is not None and not torch.compiler.is_dynamo_compiling()
        with sdpa_kernel(PREFILL_SDPA) if eager_sdpa else nullcontext():
            for i, layer in enumerate(self.layers):
                x = layer(x, shared, (k_cache[i], v_cache[i]))
        return self.norm(x)

    def logits(self, hidden: Tensor, one_sequence: bool = False) -> Tensor:
        """Logits of hidden states [rows, hidden]. ``one_sequence``: the rows are the positions of one sequence's
        paged step (decode or verification at batch 1), computed row by row by the fused GEMM kernel where it pays,
        as the layers' are: a library GEMM may sum a row in another order at another row count (CPU and cuBLAS
        do), and verifying drafts would then not reproduce decoding's choices."""
        head = self.lm_head
        if one_sequence and self.fused_head and _fused_kernel_runs(hidden, head):
            return _gemm(hidden, head).float()
        return head(hidden).float()

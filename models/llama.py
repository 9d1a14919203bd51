"""A plain-PyTorch Llama-family decoder (Llama, Mistral, Qwen2) that reads and writes a paged KV cache.

Every forward pass — prompt prefill or one decode step, one sequence or many — takes the same inputs:
token ids and positions padded to ``[batch, q_len]`` plus an :class:`AttentionMetadata` saying where the
new keys/values go (``slot_mapping``) and which cache slots each row attends to (``gather_index`` +
``mask``). One code path keeps CPU and GPU, batched and alone, numerically the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PretrainedConfig

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass
class AttentionMetadata:
    slot_mapping: Tensor  # [batch * q_len] flat cache slot for each new token (padding → scratch slot 0)
    gather_index: Tensor  # [batch, kv_len] cache slots of each row's context, padded with slot 0
    mask: Tensor  # [batch, 1, q_len, kv_len] bool, True where a query may attend


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
        # Normalise in fp32: bf16 sums of squares lose too much precision.
        # F.rms_norm is one fused kernel on CUDA (fewer launches per decode step), the same math on CPU.
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


def rope_tables(args: ModelArgs) -> tuple[Tensor, Tensor]:
    exponents = torch.arange(0, args.head_dim, 2, dtype=torch.float32) / args.head_dim
    freqs = torch.outer(torch.arange(args.max_position, dtype=torch.float32), args.rope_theta**-exponents)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE (the Hugging Face layout); x: [b, t, heads, d], cos/sin: [b, t, d]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos.unsqueeze(2) + rotated * sin.unsqueeze(2)).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.hidden_size, args.num_heads * args.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(args.hidden_size, args.num_kv_heads * args.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(args.hidden_size, args.num_kv_heads * args.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(args.num_heads * args.head_dim, args.hidden_size, bias=False)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, meta: AttentionMetadata, k_cache: Tensor, v_cache: Tensor
    ) -> Tensor:
        b, t, _ = x.shape
        q = apply_rope(self.q_proj(x).view(b, t, -1, self.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x).view(b, t, -1, self.head_dim), cos, sin)
        v = self.v_proj(x).view(b, t, -1, self.head_dim)
        k_cache.index_copy_(0, meta.slot_mapping, k.reshape(-1, self.num_kv_heads, self.head_dim))
        v_cache.index_copy_(0, meta.slot_mapping, v.reshape(-1, self.num_kv_heads, self.head_dim))
        keys = k_cache[meta.gather_index].transpose(1, 2)  # [b, kv_heads, kv_len, d]
        values = v_cache[meta.gather_index].transpose(1, 2)
        # Grouped-query attention without repeating K/V: the g query heads that share a KV head become
        # g*t query rows of that head (head h = kv_head * g + j, as in HF's repeat_kv). On CUDA this
        # keeps SDPA on the memory-efficient kernel, which takes a mask but not enable_gqa.
        g = self.num_heads // self.num_kv_heads
        q = q.view(b, t, self.num_kv_heads, g, self.head_dim).permute(0, 2, 3, 1, 4)
        q = q.reshape(b, self.num_kv_heads, g * t, self.head_dim)
        mask = meta.mask if g == 1 else meta.mask.repeat(1, 1, g, 1)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        out = out.view(b, self.num_kv_heads, g, t, self.head_dim).permute(0, 3, 1, 2, 4)
        return self.o_proj(out.reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, qkv_bias: bool) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args, qkv_bias)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, meta: AttentionMetadata, k_cache: Tensor, v_cache: Tensor
    ) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, meta, k_cache, v_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    """Parameter names mirror Hugging Face's, so an HF state dict loads as is."""

    def __init__(self, args: ModelArgs, qkv_bias: bool = False) -> None:
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, qkv_bias) for _ in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        cos, sin = rope_tables(args)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @classmethod
    def from_hf(cls, config: PretrainedConfig, state_dict: dict[str, Tensor]) -> Llama:
        args = ModelArgs.from_hf(config)
        qkv_bias = "model.layers.0.self_attn.q_proj.bias" in state_dict
        with torch.device("meta"):
            model = cls(args, qkv_bias)
        weights = {k.removeprefix("model."): v for k, v in state_dict.items()}
        if "lm_head.weight" not in weights:
            weights["lm_head.weight"] = weights["embed_tokens.weight"]
        model.load_state_dict(weights, strict=True, assign=True)
        if args.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight  # one Parameter, so .to(device) keeps one copy
        cos, sin = rope_tables(args)
        model.rope_cos, model.rope_sin = cos, sin
        return model.eval()

    def forward(
        self, input_ids: Tensor, positions: Tensor, meta: AttentionMetadata, kv_cache: tuple[Tensor, Tensor]
    ) -> Tensor:
        """Returns final hidden states [b, t, hidden]; call :meth:`logits` on the rows you need."""
        x = self.embed_tokens(input_ids)
        cos = self.rope_cos[positions].to(x.dtype)
        sin = self.rope_sin[positions].to(x.dtype)
        k_cache, v_cache = kv_cache
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, meta, k_cache[i], v_cache[i])
        return self.norm(x)

    def logits(self, hidden: Tensor) -> Tensor:
        return self.lm_head(hidden).float()

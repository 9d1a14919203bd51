"""A plain-PyTorch BERT encoder (MiniLM and its family, no classification head) that serves a compressed
checkpoint without importing transformers' modeling code, whose import chain (torch._dynamo,
torch.distributed.tensor, scipy, accelerate) is much of a CPU replica's start
(load_tests/results/ready_time/README.md).

Module names and parameters are Hugging Face ``BertModel``'s, so the checkpoint's state dict and quantized
module names (models/quantize.py) apply as saved; the forward makes the same operations in the same order as
``BertModel`` with SDPA attention (the mask skipped when nothing is padded, as there), so its outputs are
bit-identical (tests/test_bert.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class BertArgs:
    """The config fields the encoder is built from."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    pad_token_id: int | None

    @staticmethod
    def supports(config: Any) -> bool:
        """A headless BERT with absolute positions, exact GELU and SDPA attention: what this module computes as
        transformers does (anything else is served by transformers)."""
        archs = getattr(config, "architectures", None) or []
        return (
            getattr(config, "model_type", None) == "bert"
            and not any(a.endswith("ForSequenceClassification") for a in archs)
            and getattr(config, "hidden_act", None) == "gelu"
            and getattr(config, "position_embedding_type", "absolute") == "absolute"
            and not getattr(config, "is_decoder", False)
            and not getattr(config, "add_cross_attention", False)
            and not getattr(config, "chunk_size_feed_forward", 0)
            and getattr(config, "_attn_implementation", None) in (None, "sdpa")
        )

    @classmethod
    def from_config(cls, config: Any) -> BertArgs:
        return cls(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads,
            intermediate_size=config.intermediate_size,
            max_position_embeddings=config.max_position_embeddings,
            type_vocab_size=config.type_vocab_size,
            layer_norm_eps=config.layer_norm_eps,
            pad_token_id=config.pad_token_id,
        )


@dataclass
class EncoderOutput:
    last_hidden_state: Tensor
    hidden_states: tuple[Tensor, ...] | None = None


class Embeddings(nn.Module):
    def __init__(self, a: BertArgs) -> None:
        super().__init__()
        # Uninitialized (weights are assigned from a checkpoint): initializing on the meta device imports torch._dynamo.
        self.word_embeddings = _embedding(a.vocab_size, a.hidden_size, a.pad_token_id)
        self.position_embeddings = _embedding(a.max_position_embeddings, a.hidden_size)
        self.token_type_embeddings = _embedding(a.type_vocab_size, a.hidden_size)
        self.LayerNorm = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_eps)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None) -> Tensor:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
        embeddings = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        embeddings = embeddings + self.position_embeddings(positions)
        return self.LayerNorm(embeddings)


def _embedding(rows: int, dim: int, padding_idx: int | None = None) -> nn.Embedding:
    return nn.Embedding(rows, dim, padding_idx=padding_idx, _weight=torch.empty(rows, dim))


class SelfAttention(nn.Module):
    def __init__(self, a: BertArgs) -> None:
        super().__init__()
        self.heads = a.num_attention_heads
        self.head_dim = a.hidden_size // a.num_attention_heads
        self.query = nn.Linear(a.hidden_size, a.hidden_size)
        self.key = nn.Linear(a.hidden_size, a.hidden_size)
        self.value = nn.Linear(a.hidden_size, a.hidden_size)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        shape = (*x.shape[:-1], -1, self.head_dim)
        q = self.query(x).view(shape).transpose(1, 2)
        k = self.key(x).view(shape).transpose(1, 2)
        v = self.value(x).view(shape).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, scale=self.head_dim**-0.5)
        out = out.reshape(out.shape[0], -1, x.shape[1], v.shape[-1]).transpose(1, 2).contiguous()
        return out.reshape(*x.shape[:-1], -1).contiguous()


class DenseNorm(nn.Module):
    """``LayerNorm(dense(x) + residual)``: BertSelfOutput and BertOutput."""

    def __init__(self, d_in: int, d_out: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class Attention(nn.Module):
    def __init__(self, a: BertArgs) -> None:
        super().__init__()
        self.self = SelfAttention(a)
        self.output = DenseNorm(a.hidden_size, a.hidden_size, a.layer_norm_eps)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        return self.output(self.self(x, mask), x)


class Intermediate(nn.Module):
    def __init__(self, a: BertArgs) -> None:
        super().__init__()
        self.dense = nn.Linear(a.hidden_size, a.intermediate_size)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.dense(x))


class Layer(nn.Module):
    def __init__(self, a: BertArgs) -> None:
        super().__init__()
        self.attention = Attention(a)
        self.intermediate = Intermediate(a)
        self.output = DenseNorm(a.intermediate_size, a.hidden_size, a.layer_norm_eps)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        attended = self.attention(x, mask)
        return self.output(self.intermediate(attended), attended)


class Encoder(nn.Module):
    def __init__(self, a: BertArgs) -> None:
        super().__init__()
        self.layer = nn.ModuleList(Layer(a) for _ in range(a.num_hidden_layers))


class Pooler(nn.Module):
    def __init__(self, a: BertArgs) -> None:
        super().__init__()
        self.dense = nn.Linear(a.hidden_size, a.hidden_size)


class Bert(nn.Module):
    """``BertModel``'s parameters under its names; ``forward`` returns the last hidden state and, asked, every
    layer's (embeddings first), as ``BertModel(..., output_hidden_states=True)`` does. The pooler is kept for the
    state dict only: no caller reads its output."""

    def __init__(self, config: Any) -> None:
        """``config``: the model's (transformers ``BertConfig``, which imports none of its modeling code)."""
        super().__init__()
        self.config = config
        args = BertArgs.from_config(config)
        self.embeddings = Embeddings(args)
        self.encoder = Encoder(args)
        self.pooler = Pooler(args)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> EncoderOutput:
        x = self.embeddings(input_ids, token_type_ids)
        mask = _sdpa_mask(attention_mask, x.shape[1])
        states = [x]
        for layer in self.encoder.layer:
            x = layer(x, mask)
            states.append(x)
        return EncoderOutput(x, tuple(states) if output_hidden_states else None)


def _sdpa_mask(attention_mask: Tensor | None, length: int) -> Tensor | None:
    """The boolean ``[n, 1, s, s]`` mask transformers gives SDPA; None where nothing is padded (a host check
    skipped while a CUDA graph is captured, where the mask is kept)."""
    if attention_mask is None:
        return None
    padding = attention_mask.bool()
    capturing = padding.is_cuda and torch.cuda.is_current_stream_capturing()
    if not capturing and bool(padding.all()):
        return None
    q = torch.arange(length, device=padding.device)[None, None, :, None]
    mask = (q >= 0) & padding[:, None, None, :]
    return mask.expand(padding.shape[0], -1, length, length)

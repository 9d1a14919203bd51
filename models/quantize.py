"""Quantization pass: replaces nn.Linear (and a tied embedding) by modules holding 8-bit weights.

Methods (chosen by measurement, see load_tests/results/compression/):

- ``int8``: int8 weights with one scale per output channel, activations quantized per token on the fly,
  int8×int8→int32 products with ``torch._int_mm`` (VNNI on CPU), which beat fp32 and bf16 GEMMs there
  at every batch size. Per-token scales make each row's result independent of the other rows (integer
  accumulation is exact), so a request computes bit-identically alone or batched. Per-token scales
  leave per-channel activation outliers, which SmoothQuant smoothing (``smooth_*``) moves into the weights.
- ``int8-wo``: the same weights, weight-only (activations stay float). On CUDA every input goes through
  the Triton kernel of models/quant_kernels.py, which reads the int8 weight directly (half a bf16 GEMM's
  bytes). On CPU decode-sized inputs (≤ ``DECODE_ROWS`` rows) go through ``torch._weight_int8pack_mm``
  on bf16 activations and larger ones dequantize the weight for a float GEMM (slower prefill).
- ``fp8``: float8 e4m3 weights with per-row scales and per-token dynamic activation scales through
  ``torch._scaled_mm`` (Hopper tensor cores; on CUDA the activation quantization is one Triton kernel;
  the same math runs, slowly, on CPU).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models import quant_kernels

QuantMethod = Literal["none", "int8", "int8-wo", "fp8"]
DECODE_ROWS = 4
"""Inputs up to this many rows take the weight-only int8 kernel (measured crossover on CPU)."""
FP8_MAX = 448.0  # largest finite float8_e4m3fn
PACK_ALIGN = 64  # _weight_int8pack_mm crashes for in_features not a multiple of this (torch 2.13, CPU)


def _storage_dtype(method: str) -> torch.dtype:
    return torch.float8_e4m3fn if method == "fp8" else torch.int8


def quantize_rows(w: Tensor, method: str) -> tuple[Tensor, Tensor]:
    """Symmetric per-row quantization of a 2-D weight: (q, scale) with ``w ≈ q * scale[:, None]``."""
    w = w.float()
    amax = w.abs().amax(dim=1).clamp(min=1e-8)
    if method == "fp8":
        scale = amax / FP8_MAX
        return (w / scale[:, None]).to(torch.float8_e4m3fn), scale
    scale = amax / 127.0
    return (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale


class QuantLinear(nn.Module):
    """A Linear with 8-bit weights ``qweight`` [out, in] and float32 per-row ``scale`` [out]."""

    def __init__(self, in_features: int, out_features: int, bias: bool, method: str, device: object = None) -> None:
        super().__init__()
        if method not in ("int8", "int8-wo", "fp8"):
            raise ValueError(f"unknown quantization method {method!r}")
        self.in_features, self.out_features, self.method = in_features, out_features, method
        qweight = torch.empty(out_features, in_features, dtype=_storage_dtype(method), device=device)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", torch.empty(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False) if bias else None
        self._scale_bf16: Tensor | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, method: str) -> QuantLinear:
        w = linear.weight.detach()
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, method, device="meta")
        q.qweight, q.scale = quantize_rows(w, method)
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return q

    @classmethod
    def concat(cls, parts: list[QuantLinear]) -> QuantLinear:
        """One module computing ``parts`` side by side (they share their input): one activation
        quantization and one GEMM instead of several, with identical results (scales are per row)."""
        first = parts[0]
        out = sum(p.out_features for p in parts)
        q = cls(first.in_features, out, first.bias is not None, first.method, device="meta")
        if first.qweight.is_meta:  # a model being built (models/checkpoint.py): weights are assigned afterwards
            return q
        raw = [p.qweight.view(torch.uint8) if p.method == "fp8" else p.qweight for p in parts]
        q.qweight = torch.cat(raw).view(first.qweight.dtype)
        q.scale = torch.cat([p.scale for p in parts])
        if first.bias is not None:
            q.bias = nn.Parameter(torch.cat([p.bias for p in parts]), requires_grad=False)  # type: ignore[misc]
        return q

    def dequantized(self, dtype: torch.dtype) -> Tensor:
        return (self.qweight.to(torch.float32) * self.scale[:, None]).to(dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, method={self.method}"

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.method == "fp8":
            out = self._fp8(x2)
        elif self.method == "int8":
            out = self._int8_dynamic(x2)
        elif quant_kernels.usable(x.device, x.dtype):
            out = quant_kernels.w8a16_op(x2, self.qweight, self.scale)
        elif x.device.type == "cpu" and self.in_features % PACK_ALIGN == 0 and x2.shape[0] <= DECODE_ROWS:
            if self._scale_bf16 is None:
                self._scale_bf16 = self.scale.to(torch.bfloat16)
            out = torch._weight_int8pack_mm(x2.to(torch.bfloat16), self.qweight, self._scale_bf16).to(x.dtype)
        else:
            out = F.linear(x2, self.dequantized(x.dtype))
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*shape[:-1], self.out_features)

    def _int8_dynamic(self, x: Tensor) -> Tensor:
        xf = x.float()
        a = xf.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-8).div_(127.0)
        xq = (xf / a).round_().clamp_(-127, 127).to(torch.int8)
        if x.device.type == "cpu":
            acc = torch._int_mm(xq, self.qweight.t()).float()
        else:  # CUDA's _int_mm wants > 16 rows and aligned shapes; int8 on GPU is not a speed path anyway
            acc = F.linear(xq.float(), self.qweight.float())
        return (acc * a * self.scale).to(x.dtype)

    def _fp8(self, x: Tensor) -> Tensor:
        if quant_kernels.fp8_usable(x.device, x.dtype):
            return quant_kernels.fp8_act_matmul(x, self.qweight, self.scale)
        rows = x.shape[0]
        if x.device.type == "cuda" and rows % 16:  # cuBLASLt fp8 GEMMs want 16-aligned dimensions
            x = F.pad(x, (0, 0, 0, 16 - rows % 16))
        a = x.abs().amax(dim=-1, keepdim=True).float().clamp_(min=1e-12).div_(FP8_MAX)
        xq = (x.float() / a).to(torch.float8_e4m3fn)
        out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.float32
        out = torch._scaled_mm(xq, self.qweight.t(), scale_a=a, scale_b=self.scale.view(1, -1), out_dtype=out_dtype)
        return out[:rows]


class QuantEmbedding(nn.Module):
    """Embedding lookup in an 8-bit table with one scale per row. With tied embeddings the table *is*
    the lm_head's ``qweight`` (its row scales are the per-token scales), so the vocabulary is stored once."""

    def __init__(self, num_embeddings: int, dim: int, method: str, dtype: torch.dtype, device: object = None) -> None:
        super().__init__()
        self.method, self.dtype = method, dtype
        self.register_buffer("qweight", torch.empty(num_embeddings, dim, dtype=_storage_dtype(method), device=device))
        self.register_buffer("scale", torch.empty(num_embeddings, dtype=torch.float32, device=device))

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, method: str) -> QuantEmbedding:
        q = cls(emb.num_embeddings, emb.embedding_dim, method, emb.weight.dtype, device="meta")
        q.qweight, q.scale = quantize_rows(emb.weight.detach(), method)
        return q

    @classmethod
    def tied_to(cls, head: QuantLinear, dtype: torch.dtype) -> QuantEmbedding:
        q = cls(head.out_features, head.in_features, head.method, dtype, device="meta")
        q.qweight, q.scale = head.qweight, head.scale
        return q

    def forward(self, ids: Tensor) -> Tensor:
        table = self.qweight.view(torch.uint8) if self.method == "fp8" else self.qweight
        rows = table[ids].view(self.qweight.dtype).to(torch.float32)
        return (rows * self.scale[ids].unsqueeze(-1)).to(self.dtype)


VOCAB_MIN = 4096
"""Embedding tables at least this long are quantized (vocabularies; not position or type tables)."""


def quantize_modules(
    model: nn.Module, method: str, keep: Callable[[str], bool] = lambda _name: False, embeddings: bool = True
) -> list[str]:
    """Replace every nn.Linear (and, with ``embeddings``, every vocabulary-sized nn.Embedding) of
    ``model`` in place, except those ``keep(name)`` is true for; returns the quantized module names."""
    if method == "none":
        return []
    names = []
    for name, module in list(model.named_modules()):
        if keep(name):
            continue
        if isinstance(module, nn.Linear):
            _set(model, name, QuantLinear.from_linear(module, method))
        elif embeddings and isinstance(module, nn.Embedding) and module.num_embeddings >= VOCAB_MIN:
            _set(model, name, QuantEmbedding.from_embedding(module, method))
        else:
            continue
        names.append(name)
    return names


def install_quant_modules(model: nn.Module, names: list[str], method: str) -> None:
    """Recreate the module structure of a quantized model (empty buffers on meta) before loading its
    cached state dict."""
    for name in names:
        old = model.get_submodule(name)
        if isinstance(old, nn.Embedding):
            dtype = old.weight.dtype
            _set(model, name, QuantEmbedding(old.num_embeddings, old.embedding_dim, method, dtype, "meta"))
        else:
            _set(model, name, QuantLinear(old.in_features, old.out_features, old.bias is not None, method, "meta"))


def fuse_quantized_projections(model: nn.Module) -> None:
    """Concatenate quantized q/k/v and gate/up projections into the model's ``qkv_proj`` / ``gate_up_proj``
    (models/llama.py fuses only plain nn.Linear); layers with any float projection stay as they are."""
    for layer in getattr(model, "layers", []):
        attn, mlp = layer.self_attn, layer.mlp
        parts = [attn.q_proj, attn.k_proj, attn.v_proj]
        if all(isinstance(p, QuantLinear) for p in parts):
            attn.qkv_proj, attn.q_proj, attn.k_proj, attn.v_proj = QuantLinear.concat(parts), None, None, None
        parts = [mlp.gate_proj, mlp.up_proj]
        if all(isinstance(p, QuantLinear) for p in parts):
            mlp.gate_up_proj, mlp.gate_proj, mlp.up_proj = QuantLinear.concat(parts), None, None


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


# ------------------------------------------------------------------------------------------ smoothing


def smoothing_scales(act_absmax: Tensor, weights: list[Tensor], alpha: float) -> Tensor:
    """SmoothQuant: s_j = max|x_j|^α / max|W_:,j|^(1-α), so x/s and W·s share the quantization difficulty."""
    w_absmax = torch.stack([w.detach().float().abs().amax(dim=0) for w in weights]).amax(dim=0)
    s = act_absmax.float().clamp(min=1e-5).pow(alpha) / w_absmax.clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(min=1e-5)


@torch.no_grad()
def smooth_into_norm(norm_weight: Tensor, linears: list[nn.Linear], act_absmax: Tensor, alpha: float) -> None:
    """Fold 1/s into the RMSNorm that feeds ``linears`` and s into their input columns (exact in float)."""
    s = smoothing_scales(act_absmax, [lin.weight for lin in linears], alpha).to(norm_weight.device)
    norm_weight.div_(s.to(norm_weight.dtype))
    for lin in linears:
        lin.weight.mul_(s.to(lin.weight.dtype))


@torch.no_grad()
def smooth_into_linear(producer: nn.Linear, consumer: nn.Linear, act_absmax: Tensor, alpha: float) -> None:
    """Fold 1/s into ``producer``'s output rows and s into ``consumer``'s input columns; exact when the
    op between them is linear per channel in the producer (SwiGLU's ``silu(gate) * up`` with up as producer)."""
    s = smoothing_scales(act_absmax, [consumer.weight], alpha).to(producer.weight.device)
    producer.weight.div_(s.to(producer.weight.dtype)[:, None])
    if producer.bias is not None:
        producer.bias.div_(s.to(producer.bias.dtype))
    consumer.weight.mul_(s.to(consumer.weight.dtype))

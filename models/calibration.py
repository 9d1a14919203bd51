"""Activation statistics from the shipped calibration text (data/calibration.txt), and the plain
full-sequence forward that calibration and fidelity measurement share.

Statistics are gathered with forward hooks on the *inputs* of Linear layers, so the same code serves
our Llama and any HF encoder: per input channel the running max |x| (SmoothQuant scales) and, for the
layers that read an MLP's intermediate activations, the Gram matrix ``XᵀX`` (channel scores and the
least-squares reconstruction of the pruned layer).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from models.llama import AttentionMetadata, Llama

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
CALIBRATION_TEXT = DATA_DIR / "calibration.txt"
EVAL_TEXT = DATA_DIR / "eval.txt"
INTENTS = DATA_DIR / "intents.jsonl"
INTENT_LABELS = DATA_DIR / "intent_labels.json"


def read_text(path: Path) -> str:
    return Path(path).read_text(encoding="utf-8")


def read_intents() -> tuple[list[str], list[str], dict[str, str]]:
    """(texts, gold labels, label -> description) of the customer-service intent set."""
    rows = [json.loads(line) for line in read_text(INTENTS).splitlines() if line.strip()]
    return [r["text"] for r in rows], [r["label"] for r in rows], json.loads(read_text(INTENT_LABELS))


def token_windows(tokenizer: object, text: str, max_tokens: int, window: int) -> list[Tensor]:
    """The first ``max_tokens`` tokens of ``text`` cut into windows of at most ``window`` tokens."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]  # type: ignore[operator]
    return [torch.tensor(ids[i : i + window]) for i in range(0, len(ids), window) if len(ids[i : i + window]) > 1]


@torch.inference_mode()
def forward_sequence(model: Llama, ids: Tensor) -> Tensor:
    """Final hidden states ``[1, t, hidden]`` of one sequence, through a private KV cache that is one
    block of ``t`` slots (slot i = position i): the engine's attention path without its scheduler."""
    a = model.args
    dev = model.norm.weight.device
    t = ids.numel()
    cache = torch.zeros(a.num_layers, t, a.num_kv_heads, a.head_dim, device=dev, dtype=model.norm.weight.dtype)
    pos = torch.arange(t, device=dev)
    causal = (pos.view(1, -1) <= pos.view(-1, 1)).view(1, 1, t, t)
    meta = AttentionMetadata(pos, torch.zeros(1, 1, dtype=torch.long, device=dev), causal, t)
    return model(ids.to(dev).unsqueeze(0), pos.unsqueeze(0), meta, (cache, cache.clone()))


@dataclass
class LinearStats:
    """Statistics of one Linear layer's input over the calibration tokens."""

    absmax: Tensor  # [in_features] max |x| per input channel
    gram: Tensor | None = None  # [in, in] XᵀX (float32), only for layers asked for it
    tokens: int = 0


@dataclass
class Calibration:
    stats: dict[str, LinearStats] = field(default_factory=dict)
    tokens: int = 0


def collect(model: nn.Module, batches: Iterable[object], run: object, gram_for: Iterable[str] = ()) -> Calibration:
    """Run ``run(model, batch)`` over ``batches`` with hooks on every nn.Linear; returns input statistics.

    ``gram_for``: qualified names of Linear layers whose input Gram matrix is needed (pruning).
    """
    calib = Calibration()
    wanted = set(gram_for)

    def hook_for(name: str):
        def hook(_m: nn.Module, args: tuple[Tensor, ...]) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            s = calib.stats.get(name)
            amax = x.abs().amax(0)
            if s is None:
                s = calib.stats[name] = LinearStats(absmax=amax)
            else:
                s.absmax = torch.maximum(s.absmax, amax)
            if name in wanted:  # float32: float64 GEMMs made calibration minutes slower on CPU
                g = x.T @ x
                s.gram = g if s.gram is None else s.gram.add_(g)
            s.tokens += x.shape[0]

        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in _linears(model)]
    try:
        with torch.inference_mode():
            for batch in batches:
                run(model, batch)  # type: ignore[operator]
    finally:
        for h in handles:
            h.remove()
    calib.tokens = max((s.tokens for s in calib.stats.values()), default=0)
    return calib


def _linears(model: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            yield name, module

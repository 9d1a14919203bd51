"""Fidelity of a compressed model against its uncompressed self, on the held-out data only
(data/eval.txt for generation, data/intents.jsonl for classification; never the calibration text).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from models.calibration import forward_sequence
from models.llama import Llama


@dataclass
class LMEval:
    """Teacher-forced evaluation of a causal LM over token windows."""

    perplexity: float
    top1: list[Tensor]  # argmax next-token prediction at every position of every window
    tokens: int


@torch.inference_mode()
def evaluate_lm(model: Llama, windows: list[Tensor]) -> LMEval:
    nll, count, top1 = 0.0, 0, []
    for ids in windows:
        logits = model.logits(forward_sequence(model, ids)[0, :-1])
        target = ids[1:].to(logits.device)
        nll += float(F.cross_entropy(logits, target, reduction="sum"))
        count += target.numel()
        top1.append(logits.argmax(-1).cpu())
    return LMEval(perplexity=math.exp(nll / max(count, 1)), top1=top1, tokens=count)


def top1_agreement(a: LMEval, b: LMEval) -> float:
    """Share of positions where both models predict the same greedy next token."""
    same = sum(int((x == y).sum()) for x, y in zip(a.top1, b.top1, strict=True))
    return same / max(sum(x.numel() for x in a.top1), 1)


@dataclass
class EncoderEval:
    embeddings: Tensor  # [n, d] L2-normalized sentence embeddings of the inputs
    predicted: list[str]  # zero-shot label per input (nearest label description)
    accuracy: float


@torch.inference_mode()
def evaluate_encoder(
    embed: Callable[[list[str]], Tensor], texts: list[str], gold: list[str], descriptions: dict[str, str]
) -> EncoderEval:
    """Zero-shot intent classification by cosine to the label descriptions (what /classify does)."""
    names = list(descriptions)
    emb = torch.cat([embed(texts[i : i + 32]).float().cpu() for i in range(0, len(texts), 32)])
    label_emb = embed([descriptions[n] for n in names]).float().cpu()
    predicted = [names[i] for i in (emb @ label_emb.T).argmax(-1).tolist()]
    accuracy = sum(p == g for p, g in zip(predicted, gold, strict=True)) / max(len(gold), 1)
    return EncoderEval(embeddings=emb, predicted=predicted, accuracy=accuracy)


def encoder_agreement(a: EncoderEval, b: EncoderEval) -> tuple[float, float]:
    """(mean embedding cosine, label agreement) of ``b`` against ``a``."""
    cos = float(F.cosine_similarity(a.embeddings, b.embeddings, dim=-1).mean())
    agree = sum(x == y for x, y in zip(a.predicted, b.predicted, strict=True)) / max(len(a.predicted), 1)
    return cos, agree

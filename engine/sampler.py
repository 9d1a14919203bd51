"""Token selection for a batch of rows with per-request sampling settings; grammar masks and
log-probabilities for the rows that ask for them (the others pay nothing)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from engine import constraints
from engine.protocol import TokenLogprobs
from engine.sequence import SamplingParams, Sequence

MIN_TEMPERATURE = 1e-4


def apply_penalties(logits: Tensor, seqs: list[Sequence]) -> Tensor:
    """OpenAI's presence/frequency penalties: each token already generated loses ``presence_penalty``
    once plus ``frequency_penalty`` per occurrence (negative values encourage repetition)."""
    rows = [i for i, s in enumerate(seqs) if _penalized(s)]
    if not rows:
        return logits
    logits = logits.clone()
    vocab = logits.shape[-1]
    for i in rows:
        p = seqs[i].params
        counts = torch.bincount(torch.tensor(seqs[i].output_ids, device=logits.device), minlength=vocab)[:vocab]
        counts = counts.to(logits.dtype)
        logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def sample(logits: Tensor, seqs: list[Sequence], greedy: Tensor | None = None) -> list[int | None]:
    """Greedy rows take the argmax; the rest are sampled after temperature, top-k and top-p.
    Penalties apply first, to greedy and sampled rows alike.

    ``greedy`` is the argmax when the caller already has it (computed inside a CUDA graph); an
    all-greedy batch without penalties then costs one device-to-host copy of the tokens.
    A request with a ``seed`` draws from its own generator, so its output does not depend on which
    other requests share the batch.

    A constrained row's disallowed tokens are masked (in place: ``logits`` may be a CUDA graph's output
    buffer) before penalties and sampling, and its matcher then takes the sampled token. A row that asks
    for log-probabilities gets them (``Sequence.logprobs``) from the model's own distribution: before
    penalties, temperature and masks, as OpenAI reports them.

    A constrained row's token is None where it was put off a step (on a GPU, in a large batch, while its
    mask is computed: engine/constraints.py); the caller runs the row again.
    """
    wanted = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
    logprobs = logits[wanted].float().log_softmax(dim=-1) if wanted else None
    bound = [i for i, s in enumerate(seqs) if s.constraint is not None]
    rules = [seqs[i].constraint for i in bound]
    put_off: list[int] = []
    host = None
    if bound:
        greedy, put_off, host = _mask(logits, seqs, bound, rules, greedy)  # type: ignore[arg-type]
    out: list[int | None] = list(_choose(logits, seqs, greedy, host))
    for i in put_off:
        out[i] = None
    if bound:
        constraints.advance(rules, [out[i] for i in bound])  # type: ignore[arg-type]
    if logprobs is not None:
        got = [j for j, i in enumerate(wanted) if out[i] is not None]
        if len(got) < len(wanted):
            logprobs, wanted = logprobs[got], [wanted[j] for j in got]
        if wanted:
            _record_logprobs(logprobs, [seqs[i] for i in wanted], [out[i] for i in wanted])  # type: ignore[misc]
    return out


def _mask(
    logits: Tensor, seqs: list[Sequence], bound: list[int], rules: list[constraints.Constraint], greedy: Tensor | None
) -> tuple[Tensor | None, list[int], list[int] | None]:
    """Masks the constrained rows; returns the argmax of the masked logits where it can be had without a pass
    over every row (else None), the rows put off, and that argmax on the host where it is there already.
    A greedy row without penalties whose precomputed argmax its grammar allows keeps that token: masking
    cannot change an allowed maximum, so its mask is not needed. The other rows are masked first; on a GPU,
    while the forward runs and until its argmax arrives, the greedy rows' masks are computed too, for those
    whose argmax then turns out banned (in a large batch a few such rows are put off instead:
    :func:`constraints.apply_masks`). Masked rows are searched again."""
    if greedy is None:
        constraints.apply_masks(logits, bound, rules)
        return None, [], None
    settle = [seqs[i].params.greedy and not _penalized(seqs[i]) for i in bound]
    rest = [k for k, s in enumerate(settle) if not s]
    masked, _ = constraints.apply_masks(logits, [bound[k] for k in rest], [rules[k] for k in rest])
    picks = [k for k, s in enumerate(settle) if s]
    put_off: list[int] = []
    host: list[int] | None = None
    again = [k for k in picks if rules[k].lagging]
    if again:
        # Put off last step, these rows run the same position again: their masks are needed whatever the argmax.
        # Masked and searched again now, before the argmax is copied to the host, the work queues behind the
        # forward on a GPU (no host wait) instead of costing a round trip after it.
        picks = [k for k in picks if not rules[k].lagging]  # before apply_masks clears the marks
        rows = [bound[k] for k in again]
        constraints.apply_masks(logits, rows, [rules[k] for k in again])
        greedy, _ = _argmax_again(logits, greedy, rows)
    if picks:
        ready, argmax = _argmax_on_host(greedy)

        def keep() -> list[int | None]:
            nonlocal host
            host = argmax()
            return [host[bound[k]] for k in picks]

        rows, picked = [bound[k] for k in picks], [rules[k] for k in picks]
        more, put_off = constraints.apply_masks(logits, rows, picked, keep, ready, defer=ready is not None)
        masked += more
    if not masked:
        return greedy, put_off, host
    masked.sort()
    greedy, fixed = _argmax_again(logits, greedy, masked)
    if host is not None:
        for i, token in zip(masked, fixed.tolist(), strict=True):
            host[i] = token
    return greedy, put_off, host


def _argmax_again(logits: Tensor, greedy: Tensor, rows: list[int]) -> tuple[Tensor, Tensor]:
    """``greedy`` with the argmax of masked ``rows`` taken again (a copy: ``greedy`` may be a CUDA graph's output),
    and those rows' new argmax; queued on the device, nothing waited for."""
    index = constraints.device_index(rows, logits.device)
    fixed = logits[index].argmax(dim=-1)
    greedy = greedy.clone()
    greedy[index] = fixed
    return greedy, fixed


def _argmax_on_host(greedy: Tensor) -> tuple[Callable[[], bool] | None, Callable[[], list[int]]]:
    """Whether the step's argmax has reached the host (None: it is there, on a CPU), and its tokens (waiting
    for them). On a GPU it comes back once the forward ends, through pinned memory."""
    if not greedy.is_cuda:
        return None, greedy.tolist
    host = torch.empty(greedy.shape, dtype=greedy.dtype, pin_memory=True)
    host.copy_(greedy, non_blocking=True)
    arrived = torch.cuda.Event()
    arrived.record()

    def tokens() -> list[int]:
        arrived.synchronize()
        return host.tolist()

    return arrived.query, tokens


def _penalized(seq: Sequence) -> bool:
    return bool(seq.output_ids and (seq.params.presence_penalty or seq.params.frequency_penalty))


def _record_logprobs(logprobs: Tensor, seqs: list[Sequence], tokens: list[int]) -> None:
    k = max(s.params.logprobs or 0 for s in seqs)
    chosen = logprobs.gather(1, torch.tensor(tokens, device=logprobs.device).unsqueeze(1)).squeeze(1).tolist()
    top_values, top_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], logprobs[:, :0].long())
    top_values, top_ids = top_values.tolist(), top_ids.tolist()
    for j, s in enumerate(seqs):
        n = s.params.logprobs or 0
        s.logprobs = TokenLogprobs(chosen[j], top_ids[j][:n], top_values[j][:n])


def _choose(logits: Tensor, seqs: list[Sequence], greedy: Tensor | None, host: list[int] | None = None) -> list[int]:
    """``host``: ``greedy`` already on the host (saves a device-to-host copy and its wait)."""
    penalized = apply_penalties(logits, seqs)
    if greedy is None or penalized is not logits:  # a precomputed argmax holds only without penalties
        greedy, host = penalized.argmax(dim=-1), None
    logits = penalized
    out = host if host is not None else greedy.tolist()
    sampled_rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if not sampled_rows:
        return out
    rows = torch.tensor(sampled_rows, device=logits.device)
    probs, order = filtered_probs(logits[rows], [seqs[i].params for i in sampled_rows])
    for j, i in enumerate(sampled_rows):
        choice = torch.multinomial(probs[j], 1, generator=seqs[i].generator)
        out[i] = int(order[j, choice])
    return out


def filtered_probs(logits: Tensor, params: list[SamplingParams]) -> tuple[Tensor, Tensor]:
    """Each row's sampling distribution after its temperature, top-k and top-p: probabilities sorted most
    likely first (float32, on the CPU) and the token ids in that order."""
    # A vanishing temperature would overflow logits/T to inf (NaN probabilities): below the floor it is greedy anyway.
    temps = torch.tensor([p.temperature for p in params], device=logits.device).unsqueeze(1).clamp_min(MIN_TEMPERATURE)
    sorted_logits, order = (logits / temps).sort(dim=-1, descending=True)
    vocab_rank = torch.arange(logits.shape[-1], device=logits.device)
    top_k = torch.tensor([p.top_k if p.top_k > 0 else logits.shape[-1] for p in params], device=logits.device)
    sorted_logits = sorted_logits.masked_fill(vocab_rank >= top_k.unsqueeze(1), float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    top_p = torch.tensor([p.top_p for p in params], device=logits.device).unsqueeze(1)
    # Drop a token once the mass before it already reaches top_p; the first token always stays (explicitly:
    # a top_p that underflows to 0 in float32 would drop it too).
    drop = probs.cumsum(dim=-1) - probs >= top_p
    drop[:, 0] = False
    probs = probs.masked_fill(drop, 0.0)
    return (probs / probs.sum(dim=-1, keepdim=True)).float().cpu(), order.cpu()

"""Turns a scheduled batch into padded tensors, runs the model over the paged KV cache, samples."""

from __future__ import annotations

import math
import mmap
from itertools import chain

import numpy as np
import torch
from torch import Tensor

from engine import speculative
from engine.cuda_graphs import DecodeConfig, DecodeGraphs
from engine.kv_cache import SCRATCH_BLOCK, BlockManager
from engine.sampler import sample
from engine.sequence import Sequence
from engine.tp import Decode, Prefill, StepFanout, StepInput
from models.llama import AttentionMetadata, Llama


class ModelRunner:
    """Prefill runs eagerly over padded tensors; decode steps go through :class:`DecodeGraphs`
    (CUDA graphs on a GPU, eager on CPU; with ``compile`` the step is compiled first).

    Under tensor parallelism every rank holds a runner over its shard: rank 0's samples and sends each
    step's host inputs through ``fanout`` before running it; the others (``sample=False``) :meth:`follow`
    those inputs, so every rank runs the same kernels and collectives in the same order."""

    def __init__(
        self,
        model: Llama,
        blocks: BlockManager,
        device: torch.device,
        dtype: torch.dtype,
        config: DecodeConfig,
        fanout: StepFanout | None = None,
        sample: bool = True,
    ) -> None:
        model.fuse_projections()
        self.model = model
        self.blocks = blocks
        self.device = device
        self.fanout = fanout
        self.verify_width = config.verify_width
        a = model.args
        shape = (a.num_layers, blocks.num_blocks * blocks.block_size, a.num_kv_heads, a.head_dim)
        # Zero-filled: masked-out slots still pass through softmax·V, and NaN·0 would poison rows.
        self.k_cache = zeros(shape, device, dtype)
        self.v_cache = zeros(shape, device, dtype)
        self.decode = DecodeGraphs(model, (self.k_cache, self.v_cache), blocks.block_size, config, device, sample)
        self.decode.capture_all()
        if config.capture_verify:
            self.decode.capture_all(config.verify_width)

    @property
    def kv_cache_bytes(self) -> int:
        return 2 * self.k_cache.numel() * self.k_cache.element_size()

    @torch.inference_mode()
    def run(self, seqs: list[Sequence]) -> list[int | None]:
        """Computes each sequence's ``num_step_tokens`` next uncached tokens; returns the new token of each
        sequence that is then fully computed, None for one whose prompt continues in a later chunk."""
        if all(s.num_tokens - s.num_computed == 1 for s in seqs) and self.decode.fits(seqs):
            step = Decode(*self.decode.stage(seqs))
            self._send(step)
            greedy, logits = self.decode.replay(step.batch, step.kv_len, step.width)
            n = len(seqs)
            return list(sample(logits[:n], seqs, greedy[:n]))
        step = self._host_inputs(seqs)
        self._send(step)
        ids, positions, meta, last = self._device_inputs(step)
        hidden = self.model(ids, positions, meta, (self.k_cache, self.v_cache))
        done = [i for i, s in enumerate(seqs) if s.num_computed + s.num_step_tokens == s.num_tokens]
        out: list[int | None] = [None] * len(seqs)
        if done:  # sampling only these keeps a seeded request's random stream independent of chunking
            rows = torch.tensor(done, device=self.device)
            tokens = sample(self.model.logits(hidden[rows, last[rows]]), [seqs[i] for i in done])
            for i, token in zip(done, tokens, strict=True):
                out[i] = token
        return out

    @torch.inference_mode()
    def run_speculative(self, seqs: list[Sequence]) -> list[list[int]]:
        """A decode step in which rows also verify their ``draft_ids``: every row computes its last token and
        its drafts in one forward, with logits at each of those positions; returns the tokens each row
        gains (engine/speculative.py). With CUDA graphs every row is padded to ``verify_width`` tokens (one
        captured graph per bucket serves every number of drafts); a step that does not fit runs as a prefill step."""
        q = max(s.num_step_tokens for s in seqs)
        if self.decode.fixed_width:  # one captured/compiled width; eagerly (CPU), as wide as the widest row
            q = max(q, self.verify_width)
        if self.decode.fits(seqs, q):
            step = Decode(*self.decode.stage(seqs, q), q=q)
            self._send(step)
            greedy, logits = self.decode.replay(step.batch, step.kv_len, step.width, q)
            n = len(seqs) * q  # row b's positions are rows b * q onwards, padding after its drafts
            return speculative.verify(logits[:n], seqs, list(range(0, n, q)), greedy[:n])
        step = self._host_inputs(seqs)
        self._send(step)
        ids, positions, meta, _ = self._device_inputs(step)
        hidden = self.model(ids, positions, meta, (self.k_cache, self.v_cache))
        valid = torch.arange(hidden.shape[1]).view(1, -1) < torch.tensor(step.q_lens).view(-1, 1)
        starts = np.cumsum([0, *step.q_lens[:-1]]).tolist()
        return speculative.verify(self.model.logits(hidden[valid.to(self.device)]), seqs, starts)

    @torch.inference_mode()
    def forward_rows(self, rows: list[tuple[list[int], int, list[int]]]) -> Tensor:
        """Logits after each row's last token, for rows of (tokens, position of the first, block table):
        a draft model's catch-up and proposal steps, eager (no tensor-parallel fan-out)."""
        ids, positions, meta, last = self._device_inputs(self._row_inputs(rows))
        hidden = self.model(ids, positions, meta, (self.k_cache, self.v_cache))
        return self.model.logits(hidden[torch.arange(len(rows), device=self.device), last])

    @torch.inference_mode()
    def follow(self, step: StepInput) -> None:
        """Runs a step that rank 0 sent (a tensor-parallel rank that does not sample)."""
        if isinstance(step, Decode):
            self.decode.staging_np[: step.batch, : step.width] = step.rows
            self.decode.replay(step.batch, step.kv_len, step.width, step.q)
        else:
            ids, positions, meta, _ = self._device_inputs(step)
            self.model(ids, positions, meta, (self.k_cache, self.v_cache))

    def _send(self, step: StepInput) -> None:
        if self.fanout is not None:
            if isinstance(step, Decode):  # the staging rows, copied into the frame as it is sent
                step.rows = self.decode.staging_np[: step.batch, : step.width]
            self.fanout.send(step)

    def _prepare(self, seqs: list[Sequence]) -> tuple[Tensor, Tensor, AttentionMetadata, Tensor]:
        """Device inputs of a prefill step over ``seqs``: ids, positions, metadata, each row's last index."""
        return self._device_inputs(self._host_inputs(seqs))

    def _host_inputs(self, seqs: list[Sequence]) -> Prefill:
        """Host inputs of a prefill (or mixed) step: each sequence's step tokens, from its first uncomputed one."""
        return self._row_inputs([(s.step_token_ids, s.num_computed, s.block_table) for s in seqs])

    @staticmethod
    def _row_inputs(rows: list[tuple[list[int], int, list[int]]]) -> Prefill:
        """Rows of (tokens, position of the first, block table) as token ids and positions padded to the longest.
        Filled through numpy masks, not row by row: a prefill step can hold hundreds of rows."""
        n = len(rows)
        q_lens = [len(tokens) for tokens, _, _ in rows]
        t_lens = np.fromiter((len(table) for _, _, table in rows), np.int64, n)
        q = np.array(q_lens, dtype=np.int64)
        valid = np.arange(q.max()) < q[:, None]
        ids = np.zeros(valid.shape, dtype=np.int64)
        ids[valid] = np.fromiter(chain.from_iterable(tokens for tokens, _, _ in rows), np.int64, int(q.sum()))
        starts = np.fromiter((start for _, start, _ in rows), np.int64, n)
        positions = np.where(valid, starts[:, None] + np.arange(valid.shape[1]), 0)
        tables = np.full((n, t_lens.max()), SCRATCH_BLOCK, dtype=np.int64)
        tables[np.arange(tables.shape[1]) < t_lens[:, None]] = np.fromiter(
            chain.from_iterable(table for _, _, table in rows), np.int64, int(t_lens.sum())
        )
        return Prefill(torch.from_numpy(ids), torch.from_numpy(positions), torch.from_numpy(tables), q_lens)

    def _device_inputs(self, step: Prefill) -> tuple[Tensor, Tensor, AttentionMetadata, Tensor]:
        bs = self.blocks.block_size
        ids, positions, tables = step.ids, step.positions, step.tables
        valid = torch.arange(ids.shape[1]).view(1, -1) < torch.tensor(step.q_lens).view(-1, 1)
        slots = tables.gather(1, positions // bs) * bs + positions % bs
        slot_mapping = torch.where(valid, slots, SCRATCH_BLOCK * bs).flatten()
        kv_pos = torch.arange(tables.shape[1] * bs)
        # Causal within the row; padded queries sit at position 0 and see only key 0, so no row is empty.
        mask = (kv_pos.view(1, 1, -1) <= positions.unsqueeze(-1)).unsqueeze(1)
        dev = self.device
        meta = AttentionMetadata(slot_mapping.to(dev), tables.to(dev), mask.to(dev), bs)
        last = torch.tensor(step.q_lens) - 1
        return ids.to(dev), positions.to(dev), meta, last.to(dev)


def zeros(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
    """A zero-filled tensor. On CPU over anonymous memory, which the kernel maps zeroed page by page as it is
    first written: a KV cache of gigabytes is ready at once (``torch.zeros`` writes every byte at startup) and
    holds memory as it fills."""
    if device.type != "cpu":
        return torch.zeros(shape, device=device, dtype=dtype)
    return torch.frombuffer(mmap.mmap(-1, math.prod(shape) * dtype.itemsize), dtype=dtype).view(shape)

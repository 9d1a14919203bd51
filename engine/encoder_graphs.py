"""Encoder batches replayed as CUDA graphs, keyed by (batch bucket, sequence-length bucket).

A MiniLM batch is ~100 small kernels; launched one by one from Python on a slow host, the launches,
not the GPU, set the batch time (and a Triton launch costs about twice a cuBLAS one, which is what kept
int8 weights off the GPU classifier). Each bucket is captured on first use: the tokenized batch is
padded to the bucket (padding rows attend to their first token only, so no row is fully masked) and
copied into that bucket's static inputs, and the graph computes the pooled embeddings (and head
logits) into static outputs. On CPU, and for batches beyond the largest bucket, ``encode`` runs
eagerly on the exact shapes.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import torch
from torch import Tensor

from engine.cuda_graphs import bucket, powers_of_two

log = logging.getLogger(__name__)

MIN_SEQ_BUCKET = 16

Encode = Callable[[dict[str, Tensor]], tuple[Tensor, Tensor | None]]
"""Device inputs → (L2-normalized pooled embeddings [n, d], head logits [n, labels] or None)."""


def seq_buckets(max_length: int) -> list[int]:
    return powers_of_two(MIN_SEQ_BUCKET, max_length)


def pad_batch(inputs: dict[str, Tensor], rows: int, cols: int) -> dict[str, Tensor]:
    """Zero-pad every ``[n, s]`` input to ``[rows, cols]``; padding rows attend to one token."""
    n, s = inputs["input_ids"].shape
    out = {}
    for name, t in inputs.items():
        padded = t.new_zeros(rows, cols)
        padded[:n, :s] = t
        if name == "attention_mask":
            padded[n:, 0] = 1
        out[name] = padded
    return out


class EncoderGraphs:
    def __init__(self, encode: Encode, device: torch.device, max_length: int, max_batch: int) -> None:
        self.encode = encode
        self.device = device
        self.enabled = device.type == "cuda"
        self.batch_sizes = powers_of_two(1, max_batch)
        self.seq_lens = seq_buckets(max_length)
        self.static: dict[tuple[int, int], dict[str, Tensor]] = {}
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, int], tuple[Tensor, Tensor | None]] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.enabled else None
        self.warmup_stream = torch.cuda.Stream(device) if self.enabled else None
        self.lock = threading.Lock()  # static buffers: one batch at a time

    def __call__(self, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        """``inputs``: the tokenizer's CPU tensors ``[n, s]``."""
        n, s = inputs["input_ids"].shape
        if self.enabled and n <= self.batch_sizes[-1] and s <= self.seq_lens[-1]:
            key = (bucket(self.batch_sizes, n), bucket(self.seq_lens, s))
            with self.lock:
                host = pad_batch(inputs, *key)
                if key in self.graphs:
                    for k, v in host.items():
                        self.static[key][k].copy_(v)
                    return self._replay(key, n)
                if self._capture(key, host):  # its static inputs already hold this batch
                    return self._replay(key, n)
        return self.encode({k: v.to(self.device) for k, v in inputs.items()})

    def _replay(self, key: tuple[int, int], n: int) -> tuple[Tensor, Tensor | None]:
        self.graphs[key].replay()
        emb, logits = self.outputs[key]
        return emb[:n].clone(), None if logits is None else logits[:n].clone()

    def capture_all(self, sample: dict[str, Tensor], max_tokens: int) -> None:
        """Capture every bucket of at most ``max_tokens`` padded tokens, largest first (later captures
        reuse its memory), before serving starts: capturing while the generation thread runs CUDA work
        is tolerated (thread-local capture mode) but better kept out of the request path."""
        if not self.enabled:
            return
        keys = [(b, s) for b in self.batch_sizes for s in self.seq_lens if b * s <= max_tokens]
        with self.lock:
            for key in sorted(keys, key=lambda k: k[0] * k[1], reverse=True):
                if key not in self.graphs and not self._capture(key, pad_batch(sample, *key)):
                    return
        log.info("encoder CUDA graphs: %d buckets captured", len(self.graphs))

    def _capture(self, key: tuple[int, int], host: dict[str, Tensor]) -> bool:
        """Static inputs from ``host``, warm-up on a side stream, capture; on failure turn graphs off
        (eager from then on). Thread-local capture mode: another thread's CUDA calls (the generation
        engine syncing every step) neither fail nor invalidate this capture."""
        self.static[key] = {k: v.to(self.device) for k, v in host.items()}
        stream = self.warmup_stream
        try:
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                self.encode(self.static[key])
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                self.outputs[key] = self.encode(self.static[key])
            self.graphs[key] = graph
            return True
        except Exception as exc:  # e.g. a model whose forward syncs with the host: stay eager
            log.warning("encoder CUDA graphs off (capture of batch %s failed: %s: %s)", key, type(exc).__name__, exc)
            self.enabled = False
            self.graphs.clear()
            self.outputs.clear()
            self.static.clear()
            torch.cuda.synchronize(self.device)
            return False

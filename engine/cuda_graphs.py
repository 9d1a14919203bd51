"""Decode steps over static buffers, replayed as CUDA graphs keyed by (batch bucket, KV-length bucket).

A decode step is ~40 small kernels per layer; launched one by one from Python on a slow host CPU the
launches, not the GPU, set the step time. Capturing the step once per bucket and replaying it costs
one launch. Everything a step needs is derived on the device from one small int64 upload per step
(last token, position and block table of each row); padded rows point at the scratch block. The KV
bucket bounds the gathered context, so attention cost follows the real lengths, not the maximum.

On CPU the same function runs eagerly over the same buffers, so the tests exercise this path.

With ``compile`` the step runs as ``torch.compile`` code first: inductor fuses what each layer does
between its GEMMs (norms with residual adds, RoPE, SiLU·mul, the int8 epilogues; decode attention on
CPU) into a few kernels. On CPU (inductor's C++ backend) that removes the per-op dispatch that costs
more than the math of a small model's step; on CUDA the compiled step is what the graphs capture, so a
step is fewer, fuller kernels. Two compiled graphs serve every bucket: one for batch 1, one whose batch
size and KV length are dynamic dimensions (measured as fast as a graph per bucket, compiled once instead
of once per bucket). The whole step is one graph: compiling each layer on its own (one compile for all
layers) started faster but ran CPU steps a quarter slower (load_tests/results/fused_decode/).

With ``background`` (the CPU default, where a fresh start would otherwise compile for minutes before
serving) nothing compiles before the engine starts: :meth:`DecodeGraphs.start_compiling` has a child process
at the lowest priority compile the step at every bucket into the inductor cache, batch 1 first
(engine/decode_compiler.py), while steps run eagerly; as the child reports each batch bucket, a thread of
this process compiles it again from the warm cache (dynamo's trace; the graph and its C++ come from disk),
waiting a while for the engine to be idle, and that bucket switches to its compiled step. A bucket once
loaded is marked in the cache (decode_compiler.CompiledMarks): a restart on that cache loads the marked
buckets at once, and only the others go to a child. Serving never
compiles: it calls only graphs already compiled (``torch._dynamo.run``), and a step at a width not compiled
yet runs eagerly. Compiling on a thread of this process instead held the GIL for minutes of tracing and
lowering and stalled served streams for seconds; at normal priority on a 2-core machine a compile slowed the
eager steps several-fold, at the lowest it takes the idle time, so a machine busy all the time may take long to compile
(load_tests/results/cpu_vs_llamacpp/background_compile/, .../compile_process/).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import threading
import time
import types
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from engine import decode_compiler, metrics
from engine.kv_cache import SCRATCH_BLOCK
from engine.sequence import Sequence
from models import paged_attention
from models.llama import AttentionMetadata, Llama

log = logging.getLogger(__name__)

MIN_KV_BUCKET = 64
LOAD_SWITCH_INTERVAL_S = 1e-4  # the GIL's switch interval while loading a compiled bucket (_compile_in_background)
LOAD_IDLE_WAIT_S = 30.0  # how long a compiled bucket's load waits for a moment with no steps to serve
LOAD_IDLE_POLL_S = 0.02
Step = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]  # (ids, positions, block tables) -> (tokens, logits)
# Tokens per row a step may compute: 1 (decode) or 1 + speculative drafts (server/config.py allows 16).
MAX_QUERY_WIDTH = 17


def bucket(sizes: list[int], n: int) -> int:
    """The smallest of the ascending ``sizes`` that holds ``n``."""
    return next(s for s in sizes if s >= n)


def powers_of_two(first: int, top: int) -> list[int]:
    """``first``, 2·first, … below ``top``, then ``top``: buckets padding at most 2x."""
    sizes, n = [], first
    while n < top:
        sizes.append(n)
        n *= 2
    return [*sizes, top]


def batch_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, 16, 32, then steps of a quarter of the power of two below (≤ 25% padding), up to the max."""
    sizes = [b for b in (1, 2, 4, 8, 16, 32) if b < max_num_seqs]
    b = 32
    while b < max_num_seqs:
        step = b // 4
        sizes.extend(range(b + step, 2 * b + 1, step))
        b *= 2
    return sorted({s for s in sizes if s < max_num_seqs} | {max_num_seqs})


def kv_buckets(max_model_len: int, block_size: int) -> list[int]:
    """Powers of two from MIN_KV_BUCKET, then the model length; all multiples of the block size."""
    round_up = lambda n: -(-n // block_size) * block_size  # noqa: E731
    return sorted({round_up(n) for n in powers_of_two(MIN_KV_BUCKET, round_up(max_model_len))})


@dataclass(frozen=True)
class DecodeConfig:
    """What a runner's decode steps are built for: the buckets cover up to ``max_num_seqs`` rows and
    ``max_model_len`` positions; ``compile`` runs the step as ``torch.compile`` code (what the graphs capture).
    The same on every tensor-parallel rank, which must run the same kernels."""

    max_num_seqs: int
    max_model_len: int
    compile: bool = False
    background: bool = False  # with ``compile``: compiled by DecodeGraphs.start_compiling while steps run eagerly
    verify_width: int = 1  # tokens per row of a speculative step on the graph path (1 + drafts)
    capture_verify: bool = False  # compile and capture that width at startup too, not on a bucket's first use


class DecodeGraphs:
    def __init__(
        self,
        model: Llama,
        kv_cache: tuple[Tensor, Tensor],
        block_size: int,
        config: DecodeConfig,
        device: torch.device,
        logits: bool = True,
    ) -> None:
        """``logits=False`` (a tensor-parallel rank that does not sample) stops each step at the hidden state."""
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.batch_sizes = batch_buckets(config.max_num_seqs)
        self.kv_lens = kv_buckets(config.max_model_len, block_size)
        self.device = device
        self.use_graphs = device.type == "cuda"
        self.logits = logits
        self.compiled = config.compile
        self.background = config.compile and config.background
        # Background compiling: the (batch bucket, query width) pairs whose steps run compiled so far, the
        # seconds from start_compiling to each, and why compiling stopped early (steps stay eager there).
        self.compiled_keys: dict[tuple[int, int], float] = {}
        self.compile_error: str | None = None
        self._compile_widths = [1, config.verify_width] if config.capture_verify else [1]
        self._compiler: threading.Thread | None = None
        self.config = config
        # The compiler process (engine/decode_compiler.py); tests give a stand-in.
        self.spawn_compiler: Callable[[decode_compiler.CompileJob], decode_compiler.CompilerProcess] = (
            decode_compiler.CompilerProcess
        )
        self._child: decode_compiler.CompilerProcess | None = None
        self._stopping = False
        self._idle: Callable[[], bool] | None = None
        self.clock, self.sleep = time.monotonic, time.sleep  # of waiting for an idle engine (tests fake them)
        self._run = self._serve = self._step
        # Compiling in the background, the compiled step is made on the compiling thread: importing torch._dynamo
        # (for ``torch.compile``) is then not part of the start either.
        if config.compile and not self.background:
            self._make_compiled()
        # The Triton paged-decode kernel, when it runs here and agrees with the reference.
        self.paged_kernel_error: str | None = "no CUDA/Triton"
        if paged_attention.available(device):
            a = model.args
            dtype = kv_cache[0].dtype
            self.paged_kernel_error = paged_attention.self_check(
                device, dtype, a.num_heads, a.num_kv_heads, a.head_dim, block_size
            )
            if self.paged_kernel_error is not None:
                log.warning("decode attention falls back to gather + SDPA: %s", self.paged_kernel_error)
        self.paged_kernel = self.paged_kernel_error is None
        width = MAX_QUERY_WIDTH + 1 + self.kv_lens[-1] // block_size  # tokens, position of the first, block table
        # Host staging buffer (pinned on CUDA, so the upload is one async copy) and its device twin.
        self.staging = torch.zeros(self.batch_sizes[-1], width, dtype=torch.long, pin_memory=self.use_graphs)
        self.staging_np = self.staging.numpy()
        self.inputs = torch.zeros_like(self.staging, device=device)
        self.kv_positions = torch.arange(self.kv_lens[-1], device=device)
        self.offsets = torch.arange(MAX_QUERY_WIDTH, device=device)
        self.graphs: dict[tuple[int, int, int], torch.cuda.CUDAGraph] = {}  # (batch, KV length, query width)
        self.outputs: dict[tuple[int, int, int], tuple[Tensor, Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.warmup_stream = torch.cuda.Stream() if self.use_graphs else None

    def _make_compiled(self) -> None:
        """The compiled step (``_run``) and, for background compiling, its serving side (``_serve``)."""
        # Guards on every module and parameter cost about a tenth of a step, and this instance's model
        # does not change. Dynamo keeps graphs per code object: a private copy of the step's code
        # keeps another DecodeGraphs, whose model may differ, from reusing this one's graphs.
        decode_compiler.stable_cache_keys()  # the compiler process's graphs load here (and in later starts)
        code = DecodeGraphs._step.__code__.replace()
        step = types.FunctionType(code, globals(), "_step", DecodeGraphs._step.__defaults__)
        # ``fullgraph``: without module guards, a graph break would let one module's resumed code run
        # with another's weights; the step must be one graph or fail to compile.
        options: dict[str, object] = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
        if self.background:  # C++ compiles run in the (low-priority) compiler process, not a pool of workers;
            options["compile_threads"] = 1  # the same options here, which load its graphs: they key the cache
        self._run = torch.compile(types.MethodType(step, self), fullgraph=True, dynamic=False, options=options)
        # The serving side of background compiling: graphs already compiled, never a compile (a guard
        # that fails runs the step eagerly instead of compiling on the serving path).
        self._serve = torch._dynamo.run(self._run)

    @property
    def fixed_width(self) -> bool:
        """Whether a step of a width not compiled or captured yet would compile or capture anew: speculative
        steps are then padded to the one verification width (eager CPU steps run at their widest row)."""
        return self.use_graphs or self.compiled

    def fits(self, seqs: list[Sequence], q: int = 1) -> bool:
        """Whether a step of ``q`` tokens per row (padding included) fits the buckets and the model's positions."""
        return self.fits_rows(len(seqs), max(s.num_computed for s in seqs), q)

    def fits_rows(self, rows: int, first: int, q: int = 1) -> bool:
        """:meth:`fits` for ``rows`` rows whose first token sits at most at position ``first``."""
        top = min(self.kv_lens[-1], self.model.args.max_position)
        return rows <= self.batch_sizes[-1] and q <= MAX_QUERY_WIDTH and first + q <= top

    def _forward(self, batch: int, kv_len: int, q: int = 1) -> tuple[Tensor, Tensor]:
        """One step for the first ``batch`` rows of the input buffer, ``q`` tokens each (1: decode; more: a
        row's last token and its speculative drafts): (greedy tokens, logits), row b's position j at b * q + j."""
        ids, positions, tables = self._inputs(batch, kv_len, q)
        if not self.compiled:
            return self._run(ids, positions, tables)
        if self.background:
            if (batch, q) not in self.compiled_keys:
                return self._step(ids, positions, tables)
            return self._compiled(self._serve, batch, ids, positions, tables)
        return self._compiled(self._run, batch, ids, positions, tables)

    @staticmethod
    def _compiled(run: Step, batch: int, ids: Tensor, positions: Tensor, tables: Tensor) -> tuple[Tensor, Tensor]:
        """``run`` (the compiled step) over fresh contiguous inputs whose table width (the KV bucket) and,
        beyond batch 1, rows are dynamic."""
        ids, positions, tables = ids.contiguous(), positions.contiguous(), tables.contiguous()
        torch._dynamo.mark_dynamic(tables, 1)
        if batch > 1:
            for t in (ids, positions, tables):
                torch._dynamo.mark_dynamic(t, 0)
        return run(ids, positions, tables)

    def _inputs(
        self, batch: int, kv_len: int, q: int = 1, buffer: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Views of the input buffer (or ``buffer``): each row's ``q`` token ids, their positions, its block table."""
        buf = (self.inputs if buffer is None else buffer)[:batch]
        ids, positions = buf[:, :q], buf[:, q : q + 1]
        if q > 1:
            positions = positions + self.offsets[:q]
        return ids, positions, buf[:, q + 1 : q + 1 + kv_len // self.block_size]

    def _step(self, ids: Tensor, positions: Tensor, tables: Tensor) -> tuple[Tensor, Tensor]:
        (batch, q), kv_len = ids.shape, tables.shape[1] * self.block_size
        bs = self.block_size
        slot_mapping = (tables.gather(1, positions // bs) * bs + positions % bs).view(-1)
        if self.paged_kernel:  # each query's context length is its mask
            mask, context_lens = None, (positions + 1).view(-1)
        else:
            mask = (self.kv_positions[:kv_len].view(1, 1, -1) <= positions.unsqueeze(-1)).view(batch, 1, q, kv_len)
            context_lens = None
        meta = AttentionMetadata(slot_mapping, tables, mask, bs, context_lens, per_position=q > 1)
        hidden = self.model(ids, positions, meta, self.kv_cache)
        hidden = hidden[:, 0] if q == 1 else hidden.flatten(0, 1)
        if not self.logits:
            return hidden, hidden
        logits = self.model.logits(hidden, one_sequence=batch == 1 and self.paged_kernel)
        return logits.argmax(dim=-1), logits

    def _capture(self, key: tuple[int, int, int]) -> None:
        # Warm up on a side stream (lazy cuBLAS/SDPA workspace setup must not land in the graph). One
        # stream for all: the allocator caches freed blocks per stream, so a new stream each time leaks.
        stream = self.warmup_stream
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._forward(*key)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.outputs[key] = self._forward(*key)
        self.graphs[key] = graph

    @torch.inference_mode()  # as every step runs: a compiled step traced outside it would trace autograd too
    def capture_all(self, q: int = 1) -> None:
        """Captures every bucket of ``q`` tokens per row (1: decode; 1 + k: speculative verification, else
        captured on a bucket's first use), largest first, so later captures reuse the largest one's memory.
        With ``compile`` (not in the background): first compiles the step's two graphs (batch 1, and every
        larger bucket)."""
        if self.compiled and not self.background:
            self._compile_all(q)
        if not self.use_graphs:
            return
        self.inputs.zero_()  # all rows point at the scratch block while capturing
        for batch in reversed(self.batch_sizes):
            for kv_len in reversed(self.kv_lens):
                if (batch, kv_len, q) not in self.graphs:
                    self._capture((batch, kv_len, q))
        torch.cuda.synchronize()

    @torch.inference_mode()
    def _compile_all(self, q: int = 1) -> None:
        self.inputs.zero_()  # all rows point at the scratch block while compiling
        for batch in self.batch_sizes[:2]:  # eager once on each path (batch-1 fused GEMMs, then the tiled ones):
            self._step(*self._inputs(batch, self.kv_lens[0], q))  # their one-time self-checks run outside the trace
        for batch in self.batch_sizes:  # the first two compile, the rest must reuse the second graph
            self._forward(batch, self.kv_lens[0], q)

    def start_compiling(self, idle: Callable[[], bool] | None = None) -> threading.Thread | None:
        """Background compiling: starts the thread that has a child process compile every bucket and switches
        each to its compiled step (None when there is nothing to compile in the background, or it has
        started). Call it once serving has started: the steps run eagerly until then and meanwhile. ``idle``
        (the engine has nothing to step) lets each load wait a while for a quiet moment."""
        if not self.background or self._compiler is not None:
            return None
        self._idle = idle
        metrics.DECODE_COMPILE_BUCKETS.labels(state="pending").inc(len(self._keys()))
        # Private inputs made here, outside inference mode like ``inputs``: the compiled graphs guard on the
        # inputs' dispatch keys, and graphs traced over inference tensors would not serve the steps' inputs.
        with torch.inference_mode(False):
            inputs = torch.zeros_like(self.inputs)
        self._compiler = threading.Thread(
            target=self._compile_in_background, args=(inputs,), name="decode-compile", daemon=True
        )
        self._compiler.start()
        return self._compiler

    def stop_compiling(self) -> None:
        """Ends the compiler process, if one runs; buckets not compiled by then stay eager."""
        self._stopping = True
        if self._child is not None:
            self._child.stop()

    @torch.inference_mode()
    def compile_buckets(
        self, inputs: Tensor | None = None, only: Collection[tuple[int, int]] | None = None
    ) -> Iterator[tuple[int, int]]:
        """Compiles batch 1, then each larger bucket (the second graph, then each bucket through it), for each
        width (of those in ``only``, if given), over ``inputs`` (default: a private buffer) whose rows all point
        at the scratch block, and yields each (batch bucket, width) once compiled. Every KV bucket runs once,
        so a guard that would fail there compiles here, not while serving."""
        if inputs is None:
            with torch.inference_mode(False):
                inputs = torch.zeros_like(self.inputs)
        if self._run == self._step:  # not made yet (nor replaced, as the tests replace it)
            self._make_compiled()
        keys = self._keys() if only is None else [k for k in self._keys() if k in only]
        for q in dict.fromkeys(q for _, q in keys):
            self._step(*self._inputs(1, self.kv_lens[0], q, inputs))  # one-time checks run outside the trace
            for batch, _ in (k for k in keys if k[1] == q):
                self._load(batch, q, inputs)
                yield batch, q

    def _keys(self) -> list[tuple[int, int]]:
        """Every (batch bucket, width) compiled in the background, in compiling order."""
        return [(b, q) for q in self._compile_widths for b in self.batch_sizes]

    def _load(self, batch: int, q: int, inputs: Tensor) -> None:
        for kv_len in self.kv_lens:
            self._compiled(self._run, batch, *self._inputs(batch, kv_len, q, inputs))

    def _compile_in_background(self, inputs: Tensor) -> None:
        """Has a child process compile the buckets the inductor cache does not hold yet (all of them on a first
        start; engine/decode_compiler.py), and loads each bucket here from the warm cache (trace, then load)
        and switches its steps to it: the buckets the cache holds at once, the others as the child reports
        them. The child's failure (or a failed load) leaves the remaining buckets eager."""
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                if self._run == self._step:  # not made yet (nor replaced, as the tests replace it)
                    self._make_compiled()
                self._step(*self._inputs(1, self.kv_lens[0], 1, inputs))  # one-time checks run outside the trace
            if not _graph_cache_on():
                # The child hands its graphs over through that cache: without it every load would compile
                # here, in the serving process, for minutes.
                raise RuntimeError("inductor's FX graph cache is off, so the compiler process cannot hand graphs over")
            job = self._job()
            marks = decode_compiler.CompiledMarks(job)
            cached = [key for key in self._keys() if key in marks]
            missing = tuple(key for key in self._keys() if key not in marks)
            log.info("decode steps: %d of %d buckets in the inductor cache", len(cached), len(cached) + len(missing))
            if missing:  # a restart on a warm cache starts no child (it would compile each bucket again first)
                self._start_child(job, missing)
            marks_backed = True  # until a marked bucket's load compiles here
            unbacked: list[tuple[int, int]] = []  # the marked buckets after that one

            def order() -> Iterator[tuple[int, int]]:
                """The marked buckets (loaded here at once), then the child's as it compiles them. Once a
                marked load compiled here (the cache lost entries, or what its key depends on changed
                beyond the mark's key), the other marks are not trusted: those buckets go to a child too."""
                for key in cached:
                    if not marks_backed:
                        unbacked.append(key)
                    else:
                        yield key
                if missing:
                    yield from self._child_reports()
                if unbacked:
                    self._start_child(job, tuple(unbacked))
                    yield from self._child_reports()

            for key in order():
                self._wait_idle()
                if self._stopping:  # no seconds of tracing while the engine stops
                    break
                loading, misses = time.perf_counter(), _cache_misses()
                # Dynamo's trace holds the GIL for seconds; each op of a served step gives it up and waits to
                # get it back for up to the switch interval, so with the default 5 ms an eager step of a
                # thousand ops took seconds meanwhile. A short interval while loading bounds that wait.
                interval = sys.getswitchinterval()
                sys.setswitchinterval(LOAD_SWITCH_INTERVAL_S)
                try:
                    with torch.inference_mode():
                        self._load(*key, inputs)
                finally:
                    sys.setswitchinterval(interval)
                if _cache_misses() > misses:  # compiled here after all: the stall the child is there to avoid
                    log.warning("batch %d (width %d): its graph was not in the inductor cache, compiled here", *key)
                    if key in cached and marks_backed:
                        marks_backed = False
                        marks.clear()  # the next start asks a child again
                marks.add(key)  # in the cache now, whoever compiled it
                self.compiled_keys[key] = round(time.perf_counter() - start, 1)
                metrics.DECODE_COMPILE_BUCKETS.labels(state="compiled").inc()
                metrics.DECODE_COMPILE_BUCKETS.labels(state="pending").dec()
                log.info(
                    "decode steps of batch %d (width %d) compiled after %.1f s (loaded here in %.2f s): they run "
                    "compiled from now on", *key, self.compiled_keys[key], time.perf_counter() - loading,
                )  # fmt: skip
        except Exception as exc:  # any compile failure: serving goes on with eager steps
            self.compile_error = f"{type(exc).__name__}: {exc}"[:500]
            log.warning(
                "compiling decode steps failed (compiled: %s); the other buckets stay eager: %s",
                [f"batch {b} width {q}" for b, q in self.compiled_keys] or "none", self.compile_error,
            )  # fmt: skip
        finally:  # a failed load or a stop leaves no child compiling buckets nobody will load
            if self._child is not None:
                self._child.stop()

    def _start_child(self, job: decode_compiler.CompileJob, buckets: tuple[tuple[int, int], ...]) -> None:
        self._child = self.spawn_compiler(dataclasses.replace(job, buckets=buckets))
        if self._stopping:  # stopped while it started
            self._child.stop()

    def _child_reports(self) -> Iterator[tuple[int, int]]:
        """The buckets the current child compiled, as it reports them; its failure raises once it ended."""
        child = self._child
        assert child is not None
        yield from child.compiled()
        if child.error is not None and not self._stopping:
            raise RuntimeError(child.error)

    def _wait_idle(self) -> None:
        """Loading a bucket holds the GIL for seconds: wait up to LOAD_IDLE_WAIT_S for the engine to be idle,
        so a load lands between requests where it can (under steady traffic it goes ahead after the wait)."""
        deadline = self.clock() + LOAD_IDLE_WAIT_S
        while self._idle is not None and not self._idle() and not self._stopping and self.clock() < deadline:
            self.sleep(LOAD_IDLE_POLL_S)

    def _job(self) -> decode_compiler.CompileJob:
        k_cache = self.kv_cache[0]
        return decode_compiler.CompileJob(
            decode_compiler.skeleton(self.model), tuple(k_cache.shape), k_cache.dtype, self.block_size,
            self.config, self.logits, torch.get_num_threads(),
        )  # fmt: skip

    def compile_progress(self) -> dict[str, object]:
        """Background compiling's state for /info: compiled buckets (with seconds since the start), pending ones."""
        keys = self._keys()
        done = dict(self.compiled_keys)  # a copy: the compiling thread adds to it
        state = "failed" if self.compile_error else "done" if len(done) == len(keys) else "compiling"
        return {
            "state": state if self._compiler is not None else "not started",
            "compiled": [{"batch": b, "width": q, "seconds": seconds} for (b, q), seconds in done.items()],
            "pending": [{"batch": b, "width": q} for b, q in keys if (b, q) not in done],
            "error": self.compile_error,
        }

    def stage(self, seqs: list[Sequence], q: int = 1) -> tuple[int, int, int]:
        """Writes each sequence's step tokens (its one uncomputed token, then any speculative drafts, padded to
        ``q``), the position of the first and its block table into the host staging rows; returns the step's
        (batch bucket, KV bucket, row width)."""
        if q > 1:
            return self.stage_rows([(s.step_token_ids, s.num_computed, s.block_table) for s in seqs], q)
        batch = bucket(self.batch_sizes, len(seqs))
        kv_len = bucket(self.kv_lens, max(s.num_tokens for s in seqs))
        width = 2 + kv_len // self.block_size
        host = self.staging_np
        host[:batch, :width] = SCRATCH_BLOCK
        for row, s in enumerate(seqs):  # the decode step's loop: scalar writes, no per-row lists
            pos = s.num_computed
            prompt_len = len(s.prompt_ids)
            host[row, 0] = s.prompt_ids[pos] if pos < prompt_len else s.output_ids[pos - prompt_len]
            host[row, 1] = pos
            table = s.block_table[: width - 2]  # blocks past the bucket hold no context yet
            host[row, 2 : 2 + len(table)] = table
        return batch, kv_len, width

    def stage_rows(self, rows: list[tuple[list[int], int, list[int]]], q: int = 1) -> tuple[int, int, int]:
        """:meth:`stage` for rows of (at most ``q`` tokens, position of the first, block table): a draft
        model's steps. Padding queries write their K/V past the row's tokens, in its own blocks or the
        scratch block, where a later step overwrites it before anything reads it."""
        batch = bucket(self.batch_sizes, len(rows))
        kv_len = bucket(self.kv_lens, max(pos for _, pos, _ in rows) + q)
        width = q + 1 + kv_len // self.block_size
        host = self.staging_np
        host[:batch, :width] = SCRATCH_BLOCK
        for row, (tokens, pos, block_table) in enumerate(rows):
            host[row, : len(tokens)] = tokens
            host[row, q] = pos
            table = block_table[: width - q - 1]  # blocks past the bucket hold no context yet
            host[row, q + 1 : q + 1 + len(table)] = table
        return batch, kv_len, width

    def replay(self, batch: int, kv_len: int, width: int, q: int = 1) -> tuple[Tensor, Tensor]:
        """Runs the step staged in the first ``batch`` host rows: (greedy tokens, logits) of every row (of
        every position of every row, row-major, for ``q`` > 1). A width first used here is captured now."""
        self.inputs[:batch, :width].copy_(self.staging[:batch, :width], non_blocking=True)
        key = (batch, kv_len, q)
        if not self.use_graphs:
            return self._forward(*key)
        if key not in self.graphs:
            self._capture(key)
        self.graphs[key].replay()
        return self.outputs[key]

    def run(self, seqs: list[Sequence]) -> tuple[Tensor, Tensor]:
        """Decode one token for each sequence (each has exactly one uncomputed token); rows follow ``seqs``."""
        tokens, logits = self.replay(*self.stage(seqs))
        return tokens[: len(seqs)], logits[: len(seqs)]


def _cache_misses() -> int:
    """Graphs this process has compiled instead of finding them in the inductor cache."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["fxgraph_cache_miss"]


def _graph_cache_on() -> bool:
    """Whether inductor's FX graph cache is on (TORCHINDUCTOR_FX_GRAPH_CACHE, TORCHINDUCTOR_FORCE_DISABLE_CACHES)."""
    import torch._inductor.config as inductor

    return bool(inductor.fx_graph_cache) and not getattr(inductor, "force_disable_caches", False)

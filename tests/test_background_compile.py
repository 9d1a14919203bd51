"""Decode steps compiled in the background after start (engine/cuda_graphs.py ``background``, the CPU
default of server/hardware.py) on a tiny random Llama, with a stand-in for torch.compile: the engine
serves eagerly before anything compiles, each batch bucket switches to its compiled step once compiled,
widths not compiled yet stay eager, and a failed compile leaves eager serving with a log line; and, with
real inductor compiles, that the graphs compiled on that thread are the ones the served steps run. That
compiled steps give the eager step's tokens is tests/test_cpu_decode.py's."""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import types
from collections.abc import Iterator

import pytest
import torch
from transformers import LlamaConfig

from engine.cuda_graphs import DecodeGraphs
from engine.decode_compiler import CompileJob, from_skeleton, skeleton
from engine.llm_engine import AsyncLLM, EngineConfig, LLMEngine
from engine.protocol import AddRequest
from engine.sequence import SamplingParams
from models.llama import Llama
from server.config import Settings
from server.hardware import HardwarePolicy
from server.runtime import Runtime, Served

CPU = torch.device("cpu")
PROMPTS = [[5, 7, 11, 13], [3] * 20, list(range(1, 19))]
WAIT_S = 60  # bound on waiting for the compiling thread (it only runs the tiny eager step)
KEYS = itertools.count()


class FakeCompile:
    """Stands in for torch.compile in a DecodeGraphs and for its compiler process (engine/decode_compiler.py):
    the "child" reports the buckets the test hands to :meth:`report` (a compile that takes minutes), then ends,
    with ``error`` if given; loading a bucket in process runs the eager step, counted by batch (``loads``;
    batch ``fail`` raises), as are the compiled steps served (``served``)."""

    def __init__(self, decode: DecodeGraphs, fail: int | None = None) -> None:
        self.decode, self.fail = decode, fail
        self.reports: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
        self.switched: dict[tuple[int, int], threading.Event] = {}  # set once the serving side has a bucket
        self.error: str | None = None
        self.started, self.stopped = threading.Event(), threading.Event()
        self.job: CompileJob | None = None
        self.loads: list[int] = []
        self.served: list[int] = []
        decode._run, decode._serve = self._load, self._serve
        decode.spawn_compiler = self._spawn

    def _spawn(self, job: CompileJob) -> FakeCompile:
        self.job = job
        self.started.set()
        return self

    def compiled(self) -> Iterator[tuple[int, int]]:
        while (key := self.reports.get(timeout=WAIT_S)) is not None:
            yield key  # resumed once the bucket is loaded and switched
            self.switched[key].set()

    def stop(self) -> None:
        self.stopped.set()
        self.reports.put(None)

    def report(self, *keys: tuple[int, int], wait: bool = True) -> None:
        """The child has compiled ``keys``; with ``wait``, returns once the serving side switched to them."""
        for key in keys:
            self.switched[key] = threading.Event()
            self.reports.put(key)
        assert not wait or self.switched[keys[-1]].wait(WAIT_S)

    def finish(self, error: str | None = None) -> None:
        """The child exits (with ``error``: failed); waits for the compiling thread to end."""
        self.error = error
        self.reports.put(None)
        thread = self.decode._compiler
        assert thread is not None
        thread.join(WAIT_S)
        assert not thread.is_alive()

    def _load(self, ids: torch.Tensor, positions: torch.Tensor, tables: torch.Tensor) -> tuple:
        batch = ids.shape[0]
        if batch == self.fail:
            raise RuntimeError("inductor cache entry unreadable")
        self.loads.append(batch)
        return self.decode._step(ids, positions, tables)

    def _serve(self, ids: torch.Tensor, positions: torch.Tensor, tables: torch.Tensor) -> tuple:
        self.served.append(ids.shape[0])
        return self.decode._step(ids, positions, tables)


@pytest.fixture(autouse=True)
def inductor_cache(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test's own inductor cache directory, where the loaded buckets' marks go (decode_compiler.CompiledMarks):
    a bucket another test (or a real compile) loaded must not skip this test's child."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))


def make_engine(
    tiny: tuple[LlamaConfig, dict[str, torch.Tensor]], background: bool = True, kv_cache_tokens: int = 2048
) -> LLMEngine:
    config, state = tiny
    engine_config = EngineConfig(
        max_num_seqs=8,
        kv_cache_tokens=kv_cache_tokens,
        max_model_len=128,
        block_size=16,
        compile_decode=background,
        compile_background=background,
    )
    # Token ids only, no end of sequence; the runtime's warm-up detokenizes, with ids as words.
    tokenizer = types.SimpleNamespace(eos_token_id=None, decode=lambda ids, **_: " ".join(map(str, ids)))
    engine = LLMEngine(Llama.from_hf(config, state), tokenizer, CPU, torch.float32, engine_config)
    engine.clock = itertools.count().__next__
    return engine


def with_fake_compiler(
    tiny: tuple[LlamaConfig, dict[str, torch.Tensor]], fail: int | None = None, kv_cache_tokens: int = 2048
) -> tuple[LLMEngine, DecodeGraphs, FakeCompile]:
    """A background-compiling engine, its decode graphs, and the fake child compiling for them."""
    engine = make_engine(tiny, kv_cache_tokens=kv_cache_tokens)
    return engine, engine.runner.decode, FakeCompile(engine.runner.decode, fail)


def generate(engine: LLMEngine, prompts: list[list[int]], max_tokens: int = 12) -> list[list[int]]:
    """Greedy tokens of each prompt, all in one continuous batch."""
    mine = {next(KEYS): i for i in range(len(prompts))}
    for key, i in mine.items():
        engine.add(AddRequest(key, prompts[i], SamplingParams(max_tokens=max_tokens), f"r{key}"))
    out: list[list[int]] = [[] for _ in prompts]
    while engine.has_work():
        for o in engine.step():
            if o.token is not None:
                out[mine[o.key]].append(o.token)
    return out


@pytest.mark.unit
def test_serves_eagerly_before_anything_compiles_then_switches(tiny) -> None:
    eager = generate(make_engine(tiny, background=False), PROMPTS)
    engine, decode, fake = with_fake_compiler(tiny)
    assert decode.compiled and decode.background
    assert fake.loads == [] and not fake.started.is_set()  # nothing compiled while the engine was built
    engine.start_compiling()
    assert fake.started.wait(WAIT_S)  # the child compiles for "minutes"
    assert generate(engine, PROMPTS) == eager
    assert generate(engine, PROMPTS[:1]) == eager[:1]
    assert fake.served == [] and fake.loads == []  # every step eager: nothing compiled yet
    assert decode.compile_progress()["state"] == "compiling" and decode.compile_progress()["compiled"] == []
    fake.report((1, 1), (2, 1), (4, 1), (8, 1))
    fake.finish()
    progress = decode.compile_progress()
    assert progress["state"] == "done" and progress["pending"] == []
    assert [(c["batch"], c["width"]) for c in progress["compiled"]] == [(1, 1), (2, 1), (4, 1), (8, 1)]
    # Each bucket loaded in this process once the child had it, every KV bucket, off the serving path.
    assert fake.loads == [b for b in (1, 2, 4, 8) for _ in decode.kv_lens]
    assert generate(engine, PROMPTS) == eager
    assert generate(engine, PROMPTS[:1]) == eager[:1]
    assert set(fake.served) == {1, 4}  # the compiled steps now: 3 rows in bucket 4, then 1 row
    assert engine.start_compiling() is None and decode.start_compiling() is None  # once


@pytest.mark.unit
def test_the_child_gets_the_model_shapes_and_the_servers_threads(tiny) -> None:
    engine, decode, fake = with_fake_compiler(tiny)
    engine.start_compiling()
    assert fake.started.wait(WAIT_S)
    job = fake.job
    assert job is not None and job.config == decode.config and job.block_size == decode.block_size
    assert job.kv_shape == tuple(decode.kv_cache[0].shape) and job.kv_dtype == decode.kv_cache[0].dtype
    assert job.threads == torch.get_num_threads()
    shapes = {n: (p.shape, p.dtype) for n, p in from_skeleton(job.model).state_dict().items()}
    assert shapes == {n: (p.shape, p.dtype) for n, p in decode.model.state_dict().items()}
    fake.finish()


@pytest.mark.unit
def test_a_bucket_switches_only_once_the_child_has_compiled_it(tiny) -> None:
    eager = generate(make_engine(tiny, background=False), PROMPTS)
    engine, decode, fake = with_fake_compiler(tiny)
    engine.start_compiling()
    fake.report((1, 1))  # batch 1 compiled, the larger buckets still compiling in the child
    assert list(decode.compiled_keys) == [(1, 1)]
    assert generate(engine, PROMPTS[:1]) == eager[:1]
    assert set(fake.served) == {1}
    fake.served.clear()
    assert generate(engine, PROMPTS) == eager  # bucket 4 not compiled: eager, while batch 1 would be compiled
    assert 4 not in fake.served and 4 not in fake.loads
    fake.finish()


@pytest.mark.unit
def test_a_load_waits_for_an_idle_engine(tiny) -> None:
    """Loading a bucket holds the GIL for seconds: it waits for a moment with nothing to step."""
    _, decode, fake = with_fake_compiler(tiny)
    busy, naps = [True], []

    def nap(seconds: float) -> None:  # the engine goes idle after three looks
        naps.append(seconds)
        busy[0] = len(naps) < 3

    decode.sleep = nap
    decode.start_compiling(idle=lambda: not busy[0])
    fake.report((1, 1))
    assert len(naps) == 3 and fake.loads == [1] * len(decode.kv_lens)
    fake.finish()


@pytest.mark.unit
def test_under_steady_traffic_a_load_goes_ahead_after_its_wait(tiny) -> None:
    _, decode, fake = with_fake_compiler(tiny)
    clock = itertools.count(0, 10)  # each look at the (fake) clock is 10 s later
    decode.clock, decode.sleep = lambda: next(clock), lambda seconds: None
    decode.start_compiling(idle=lambda: False)  # never idle
    fake.report((1, 1))
    assert list(decode.compiled_keys) == [(1, 1)]
    fake.finish()


def asked(decode: DecodeGraphs, fake: FakeCompile) -> list[tuple[int, int]]:
    """Starts compiling; the buckets the child is asked to compile."""
    decode.start_compiling()
    assert fake.started.wait(WAIT_S) and fake.job is not None and fake.job.buckets is not None
    return list(fake.job.buckets)


@pytest.mark.unit
def test_a_restart_on_a_full_cache_loads_every_bucket_without_a_child(tiny) -> None:
    """The child of an earlier start filled the cache: a restart loads each bucket at once, and no child
    compiles them all again before the first load."""
    eager = generate(make_engine(tiny, background=False), PROMPTS)
    _, decode, fake = with_fake_compiler(tiny)
    assert asked(decode, fake) == [(1, 1), (2, 1), (4, 1), (8, 1)]  # an empty cache: all of them
    fake.report((1, 1), (2, 1), (4, 1), (8, 1))
    fake.finish()
    engine, decode, fake = with_fake_compiler(tiny)  # the restart: a new engine over the same model and cache
    thread = decode.start_compiling()
    assert thread is not None
    thread.join(WAIT_S)
    assert not thread.is_alive() and not fake.started.is_set() and decode._child is None
    progress = decode.compile_progress()
    assert progress["state"] == "done" and progress["error"] is None
    assert [(c["batch"], c["width"]) for c in progress["compiled"]] == [(1, 1), (2, 1), (4, 1), (8, 1)]
    assert fake.loads == [b for b in (1, 2, 4, 8) for _ in decode.kv_lens]
    assert generate(engine, PROMPTS) == eager
    assert set(fake.served) == {4}


@pytest.mark.unit
def test_a_mark_the_cache_does_not_back_sends_the_other_marked_buckets_to_a_child(
    tiny, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The cache lost its entries but kept the marks: the first marked load compiles here (a warning), and
    the other marked buckets go to a child instead of each compiling here for minutes; the marks are
    rewritten from what loads."""
    eager = generate(make_engine(tiny, background=False), PROMPTS)
    _, decode, fake = with_fake_compiler(tiny)
    asked(decode, fake)
    fake.report((1, 1), (2, 1), (4, 1), (8, 1))
    fake.finish()
    misses = itertools.count()
    monkeypatch.setattr("engine.cuda_graphs._cache_misses", lambda: next(misses))  # every load compiles
    engine, decode, fake = with_fake_compiler(tiny)
    with caplog.at_level(logging.WARNING, logger="engine.cuda_graphs"):
        assert asked(decode, fake) == [(2, 1), (4, 1), (8, 1)]
        assert "batch 1 (width 1): its graph was not in the inductor cache" in caplog.text
        fake.report((2, 1), (4, 1), (8, 1))
        fake.finish()
    assert list(decode.compiled_keys) == [(1, 1), (2, 1), (4, 1), (8, 1)]
    assert decode.compile_progress()["state"] == "done"
    assert generate(engine, PROMPTS) == eager
    monkeypatch.setattr("engine.cuda_graphs._cache_misses", lambda: 0)  # the cache holds them now
    _, decode, fake = with_fake_compiler(tiny)  # every bucket loaded (and marked) again: no child
    thread = decode.start_compiling()
    assert thread is not None
    thread.join(WAIT_S)
    assert not fake.started.is_set() and list(decode.compiled_keys) == [(1, 1), (2, 1), (4, 1), (8, 1)]


@pytest.mark.unit
def test_the_child_compiles_only_the_buckets_the_cache_lacks(tiny) -> None:
    """A start that ended early (here: a failed load of batch 2) leaves marks for what it loaded; the next
    start loads those at once and asks its child for the rest."""
    _, decode, fake = with_fake_compiler(tiny, fail=2)
    asked(decode, fake)
    fake.report((1, 1))
    fake.report((2, 1), wait=False)  # compiled by the child, but its load here fails: not marked
    fake.finish()
    assert list(decode.compiled_keys) == [(1, 1)]
    _, decode, fake = with_fake_compiler(tiny)
    assert asked(decode, fake) == [(2, 1), (4, 1), (8, 1)]
    fake.report((2, 1), (4, 1), (8, 1))
    fake.finish()
    assert list(decode.compiled_keys) == [(1, 1), (2, 1), (4, 1), (8, 1)]  # batch 1 first, without the child
    assert fake.loads == [b for b in (1, 2, 4, 8) for _ in decode.kv_lens]


@pytest.mark.unit
def test_marks_belong_to_one_model_and_cache_shape(tiny) -> None:
    """A bucket loaded for one KV cache (or model, or thread count) says nothing about another's graphs."""
    _, decode, fake = with_fake_compiler(tiny)
    asked(decode, fake)
    fake.report((1, 1), (2, 1), (4, 1), (8, 1))
    fake.finish()
    _, decode, fake = with_fake_compiler(tiny, kv_cache_tokens=1024)
    assert asked(decode, fake) == [(1, 1), (2, 1), (4, 1), (8, 1)]
    fake.finish()


@pytest.mark.unit
def test_marks_that_cannot_be_written_leave_compiling_done(tiny, tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    """The marks only spare the next start a child: a cache where they cannot be written compiles as before."""
    (tmp_path / "inductor").mkdir()
    (tmp_path / "inductor" / "lowlat_decode").write_text("not a directory")
    _, decode, fake = with_fake_compiler(tiny)
    with caplog.at_level(logging.WARNING, logger="engine.decode_compiler"):
        asked(decode, fake)
        fake.report((1, 1), (2, 1), (4, 1), (8, 1))
        fake.finish()
    assert decode.compile_progress()["state"] == "done" and "could not mark batch 1" in caplog.text


@pytest.mark.unit
def test_the_skeleton_marks_are_keyed_by_saves_sets_sorted() -> None:
    """A set (a module's non-persistent buffer names) iterates in the order of its strings' hashes, which
    differ per process: saved sorted, the same model gives the same bytes, hence the same key, everywhere."""
    names = {f"buffer_{i:02}" for i in range(20)}
    data = skeleton(names)
    assert [data.index(n.encode()) for n in sorted(names)] == sorted(data.index(n.encode()) for n in names)
    assert from_skeleton(data) == names


@pytest.mark.unit
def test_the_childs_failure_leaves_eager_serving_and_says_why(tiny, caplog: pytest.LogCaptureFixture) -> None:
    eager = generate(make_engine(tiny, background=False), PROMPTS)
    engine, decode, fake = with_fake_compiler(tiny)
    with caplog.at_level(logging.WARNING, logger="engine.cuda_graphs"):
        engine.start_compiling()
        fake.report((1, 1))
        fake.finish(error="the compiler process exited with -9: Killed")
    assert "compiling decode steps failed (compiled: ['batch 1 width 1'])" in caplog.text
    assert "exited with -9" in caplog.text
    progress = decode.compile_progress()
    assert progress["state"] == "failed" and "exited with -9" in str(progress["error"])
    assert [c["batch"] for c in progress["compiled"]] == [1]
    assert [p["batch"] for p in progress["pending"]] == [2, 4, 8]
    assert generate(engine, PROMPTS) == eager  # the buckets the child never reported serve eagerly
    assert 4 not in fake.served


@pytest.mark.unit
def test_without_inductors_cache_no_child_starts_and_steps_stay_eager(
    tiny, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The child hands its graphs over through inductor's FX graph cache: with it off, every load would
    compile in the serving process, so nothing compiles in the background and the steps stay eager."""
    monkeypatch.setattr("engine.cuda_graphs._graph_cache_on", lambda: False)  # TORCHINDUCTOR_FX_GRAPH_CACHE=0
    _, decode, fake = with_fake_compiler(tiny)
    with caplog.at_level(logging.WARNING, logger="engine.cuda_graphs"):
        thread = decode.start_compiling()
        assert thread is not None
        thread.join(WAIT_S)
    assert not fake.started.is_set() and "FX graph cache is off" in caplog.text
    assert decode.compile_progress()["state"] == "failed" and not decode.compile_progress()["compiled"]


@pytest.mark.unit
def test_a_failed_load_leaves_eager_serving_and_says_why(tiny, caplog: pytest.LogCaptureFixture) -> None:
    eager = generate(make_engine(tiny, background=False), PROMPTS)
    engine, decode, fake = with_fake_compiler(tiny, fail=2)
    with caplog.at_level(logging.WARNING, logger="engine.cuda_graphs"):
        engine.start_compiling()
        fake.report((1, 1))
        fake.report((2, 1), wait=False)
        fake.finish()
    assert "failed (compiled: ['batch 1 width 1'])" in caplog.text and "inductor cache entry unreadable" in caplog.text
    assert decode.compile_progress()["state"] == "failed"
    assert [c["batch"] for c in decode.compile_progress()["compiled"]] == [1]
    assert generate(engine, PROMPTS) == eager
    assert 4 not in fake.served
    assert fake.stopped.wait(WAIT_S)  # the child compiling buckets nobody will load is stopped


@pytest.mark.unit
def test_stopping_the_engine_stops_the_child(tiny) -> None:
    engine = make_engine(tiny)
    fake = FakeCompile(engine.runner.decode)
    llm = AsyncLLM(engine)
    llm.start()
    engine.start_compiling()
    fake.report((1, 1))
    llm.stop()
    assert fake.stopped.is_set()
    fake.finish()
    progress = engine.runner.decode.compile_progress()
    assert progress["error"] is None and [c["batch"] for c in progress["compiled"]] == [1]  # stopped, not failed


@pytest.mark.unit
def test_ready_before_compiling_is_done(tiny) -> None:
    """The runtime turns ready on eager steps; compiling starts after that, and /info's progress shows it."""
    engine = make_engine(tiny)
    fake = FakeCompile(engine.runner.decode)
    settings = Settings(enable_classify=False, compile_decode="auto")
    policy = HardwarePolicy(
        device="cpu",
        dtype="float32",
        gen_quantize="none",
        gen_prune=0.0,
        cls_quantize="none",
        prefill_budget=512,
        compile_decode="background",
        engine_core="thread",
        api_servers=1,
        why={},
    )
    runtime = Runtime(settings=settings, device="cpu", served=Served(policy), llm=AsyncLLM(engine))

    async def start() -> None:
        assert runtime.decode_compile == {"state": "not started", "compiled": [], "pending": [
            {"batch": b, "width": 1} for b in (1, 2, 4, 8)], "error": None}  # fmt: skip
        await runtime.start()  # warms up with eager steps
        assert runtime.ready
        assert fake.started.wait(WAIT_S)  # compiling began after ready, and is not done
        assert runtime.decode_compile is not None and runtime.decode_compile["state"] == "compiling"
        fake.report((1, 1), (2, 1), (4, 1), (8, 1))
        fake.finish()
        assert runtime.decode_compile["state"] == "done"
        await runtime.stop()

    asyncio.run(start())


@pytest.mark.live  # starts the compiler process, which compiles C++ (inductor) for the tiny model: tens of seconds
def test_graphs_compiled_in_the_background_serve_the_steps(tiny) -> None:
    """The served steps hit the graphs compiled in the background: a step's inputs pass their guards. (Compiled
    over inference tensors, every guard failed on the steps' dispatch keys, and the "compiled" steps ran eagerly
    through torch._dynamo.run.) Serving through the compiling callable instead, a failed guard would compile a
    new graph, which the counter would show. A restart on that cache then loads every bucket without a child
    and without compiling anything itself."""
    from torch._dynamo.utils import counters

    eager = generate(make_engine(tiny, background=False), PROMPTS)
    for start in ("first", "restart"):
        engine = make_engine(tiny)
        decode = engine.runner.decode
        misses = counters["inductor"]["fxgraph_cache_miss"]
        thread = decode.start_compiling()
        assert thread is not None
        thread.join(600)
        assert decode.compile_progress()["state"] == "done"
        if start == "restart":
            assert decode._child is None and counters["inductor"]["fxgraph_cache_miss"] == misses
        graphs = counters["stats"]["unique_graphs"]
        decode._serve = decode._run
        assert generate(engine, PROMPTS) == eager
        assert generate(engine, PROMPTS[:1]) == eager[:1]
        assert counters["stats"]["unique_graphs"] == graphs

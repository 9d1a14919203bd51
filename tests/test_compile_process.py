"""Background compiling's child process (engine/decode_compiler.py): the model skeleton it gets keeps every
tensor's shape, dtype, strides and aliasing without the weights; and, with a real child, that the graphs it
compiles are what the serving process loads from the cache (no compile of its own), that stopping the engine
ends the child, and that a child that fails says why. The fake-child tests of the serving side are
tests/test_background_compile.py's."""

from __future__ import annotations

import pickle
import threading

import pytest
import torch
from torch import nn

from engine.decode_compiler import CompileJob, CompilerProcess, from_skeleton, skeleton, stable_cache_keys
from models.llama import Llama
from tests.test_background_compile import PROMPTS, generate, make_engine

WAIT_S = 900  # a real child compiles the tiny model's C++ at the lowest priority: minutes on a busy machine


@pytest.mark.unit
def test_the_skeleton_keeps_shapes_and_aliasing_not_weights(tiny) -> None:
    config, state = tiny
    model = Llama.from_hf(config, state)
    model.fuse_projections()
    model.lm_head.weight = model.embed_tokens.weight  # tied: one Parameter in two places
    model.view_of_norm = model.norm.weight[:8]  # a plain attribute viewing a parameter's storage
    data = skeleton(model)
    weight_bytes = sum(t.nbytes for t in model.state_dict().values())
    assert len(data) < weight_bytes / 10  # metadata, not weights
    copy = from_skeleton(data)
    assert isinstance(copy, Llama)
    mine, theirs = dict(model.named_parameters()), dict(copy.named_parameters())
    assert mine.keys() == theirs.keys()
    for name, p in mine.items():
        q = theirs[name]
        assert isinstance(q, nn.Parameter) and q.requires_grad == p.requires_grad
        assert (q.shape, q.dtype, q.stride(), q.storage_offset()) == (p.shape, p.dtype, p.stride(), p.storage_offset())
        assert not q.any()  # zero pages
    for name, b in model.named_buffers():
        c = copy.get_buffer(name)
        assert (c.shape, c.dtype, c.stride()) == (b.shape, b.dtype, b.stride()) and not isinstance(c, nn.Parameter)
    assert copy.lm_head.weight is copy.embed_tokens.weight
    assert copy.view_of_norm.untyped_storage().data_ptr() == copy.norm.weight.untyped_storage().data_ptr()


@pytest.mark.live  # a compiler process compiling C++ (inductor) for the tiny model
def test_the_server_loads_what_the_child_compiled(tiny, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The serving side compiles each bucket from the child's cache entries, never anew (a missed entry would
    compile in this process, the stall the child exists to avoid), and its steps then run those graphs."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # empty: the child fills it
    eager = generate(make_engine(tiny, background=False), PROMPTS)
    engine = make_engine(tiny)
    decode = engine.runner.decode
    before = dict(counters["inductor"])
    thread = decode.start_compiling()
    assert thread is not None
    thread.join(WAIT_S)
    assert decode.compile_progress()["state"] == "done", decode.compile_progress()
    assert decode._child is not None and decode._child.proc.returncode == 0
    new = {k: v - before.get(k, 0) for k, v in counters["inductor"].items()}
    assert new.get("fxgraph_cache_miss", 0) == 0 and new.get("fxgraph_cache_hit", 0) == 2  # batch 1, the rest
    graphs = counters["stats"]["unique_graphs"]
    decode._serve = decode._run  # serving through the compiling callable: a failed guard would compile anew
    assert generate(engine, PROMPTS) == eager
    assert generate(engine, PROMPTS[:1]) == eager[:1]
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.live  # a compiler process
def test_stopping_the_engine_ends_the_child(tiny, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    engine = make_engine(tiny)
    decode = engine.runner.decode
    spawned = threading.Event()
    children: list[CompilerProcess] = []

    def spawn(job: CompileJob) -> CompilerProcess:
        children.append(CompilerProcess(job))
        spawned.set()
        return children[0]

    decode.spawn_compiler = spawn
    thread = decode.start_compiling()
    assert thread is not None and spawned.wait(WAIT_S)
    engine.stop_compiling()  # long before its first C++ compile is done
    thread.join(WAIT_S)
    assert not thread.is_alive()
    assert children[0].proc.returncode is not None  # reaped
    progress = decode.compile_progress()
    assert progress["error"] is None and progress["compiled"] == []  # stopped: eager, not failed


@pytest.mark.live  # a compiler process
def test_a_child_that_fails_says_why(tiny) -> None:
    engine = make_engine(tiny)
    job = engine.runner.decode._job()
    broken = CompileJob(pickle.dumps("not a model"), *[getattr(job, f) for f in list(job.__dataclass_fields__)[1:]])
    child = CompilerProcess(broken)
    assert list(child.compiled()) == []
    assert child.error is not None and "exited with 1" in child.error
    assert "TypeError" in child.error  # a str called as the model
    assert torch.get_num_threads() == job.threads


@pytest.mark.unit
def test_memory_formats_pickle_by_one_name_in_every_process() -> None:
    """Inductor's cache keys pickle memory formats; by default pickle names one through whichever loaded module
    reaches it first, which differs between the server and the compiler process (their keys then differed)."""
    stable_cache_keys()
    for fmt in (torch.contiguous_format, torch.channels_last, torch.preserve_format):
        data = pickle.dumps(fmt)
        assert b"engine.decode_compiler" in data and b"_memory_format" in data
        assert pickle.loads(data) is fmt

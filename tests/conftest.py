"""Shared pytest fixtures, and the tier check: every test is exactly one of unit, integration, live."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from models.sources import embedded_encoder_dir
from server.app import create_app
from server.config import Settings
from server.runtime import Runtime
from tests.virtual_clock import VirtualClockLoop

# Decode steps run eagerly in the suite whatever the device's default (server/hardware.py): compiling costs
# minutes on CI's two cores. The tests of the compiled path ask for it; server processes inherit this.
os.environ.setdefault("LLM_COMPILE_DECODE", "off")
# The suite's server processes share CI's two cores with each other: OpenMP workers that spin between
# parallel regions (python -m server's default, server/__main__.py) would take cores from the rest.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

TIERS = ("unit", "integration", "live")
# Fixtures that load the real models or start a server: a unit test that asks for one is mis-marked.
MODEL_FIXTURES = frozenset({"cache_dir", "settings", "runtime", "client", "live_server"})
HOW_TO_MARK = (
    "mark each test with exactly one tier: a module line `pytestmark = pytest.mark.unit` (or `integration`, "
    "`live`), or a decorator on the test; unit = no model files, no processes, no sleeps; integration = the "
    "real models or real time in-process; live = server processes, fuzzing, linters (README, Tests)"
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Refuses the run when a test has no tier, several, or is a unit test using the real models;
    then orders the run unit → integration → live, so the fast tier fails first."""
    problems = []
    for item in items:
        tiers = {m.name for m in item.iter_markers() if m.name in TIERS}
        if len(tiers) != 1:
            problems.append(f"{item.nodeid}: tiers {sorted(tiers) or 'none'}")
        elif "unit" in tiers and MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            fixtures = sorted(MODEL_FIXTURES & set(item.fixturenames))
            problems.append(f"{item.nodeid}: a unit test using {', '.join(fixtures)}")
    if problems:
        raise pytest.UsageError(
            f"{len(problems)} test(s) without exactly one valid tier; {HOW_TO_MARK}:\n  " + "\n  ".join(problems)
        )
    items.sort(key=lambda item: TIERS.index(next(m.name for m in item.iter_markers() if m.name in TIERS)))


@pytest.fixture(autouse=True)
def _unit_tests_do_not_sleep(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """In a unit test, ``time.sleep`` and a real-time ``asyncio.sleep`` fail: time-dependent code runs on
    the virtual clock (tests/virtual_clock.py) and threads synchronise with events."""
    if request.node.get_closest_marker("unit") is None:
        return
    real_sleep = asyncio.sleep

    def no_sleep(seconds: float) -> None:
        raise AssertionError(f"a unit test slept {seconds} s: use tests/virtual_clock.py or events")

    async def virtual_sleep_only(delay: float, result: object = None) -> object:
        if delay > 0 and not isinstance(asyncio.get_running_loop(), VirtualClockLoop):
            no_sleep(delay)
        return await real_sleep(delay, result)

    monkeypatch.setattr(time, "sleep", no_sleep)
    monkeypatch.setattr(asyncio, "sleep", virtual_sleep_only)


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """Model cache shared by the whole session and across runs (the GGUF conversion takes ~20 s once).

    Same convention as the server: ``$LLM_CACHE_DIR`` or ``~/.cache/lowlat-server``.
    """
    path = Path(os.environ.get("LLM_CACHE_DIR", Path.home() / ".cache" / "lowlat-server"))
    path.mkdir(parents=True, exist_ok=True)
    return path


TEST_SETTINGS = {
    "max_input_tokens": 256,
    "max_new_tokens": 64,
    "default_max_tokens": 16,
    "max_num_seqs": 16,
    "kv_cache_tokens": 8192,
    "cls_max_inputs": 16,
}


@pytest.fixture(scope="session")
def settings(cache_dir: Path) -> Settings:
    return Settings(cache_dir=cache_dir, **TEST_SETTINGS)


@pytest.fixture(scope="session")
async def runtime(settings: Settings) -> AsyncIterator[Runtime]:
    """Both embedded models, loaded and warmed once per session; every ASGI test app shares them."""
    rt = await asyncio.to_thread(Runtime.load, settings)
    await rt.start()
    yield rt
    await rt.stop()


@pytest.fixture(scope="session")
async def client(settings: Settings, runtime: Runtime) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings, runtime)
    async with app.router.lifespan_context(app):
        for _ in range(100):
            if getattr(app.state, "runtime", None) is not None:
                break
            await asyncio.sleep(0.01)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=120) as c:
            yield c


@contextlib.asynccontextmanager
async def app_client(settings: Settings, runtime: Runtime) -> AsyncIterator[httpx.AsyncClient]:
    """An in-process HTTP client of the app over ``runtime``, with the app's lifespan running."""
    app = create_app(settings, runtime)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=120) as c:
            yield c


@contextlib.asynccontextmanager
async def own_runtime_client(
    settings: Settings, prepare: Callable[[Runtime], None] | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    """:func:`app_client` over a runtime of its own, loaded from ``settings`` (``prepare`` adjusts it before
    it starts); its engine is stopped afterwards, not the runtime: that would mark the shared process not
    ready."""
    rt = await asyncio.to_thread(Runtime.load, settings)
    if prepare is not None:
        prepare(rt)
    await rt.start()
    try:
        async with app_client(settings, rt) as c:
            yield c
    finally:
        assert rt.llm is not None
        await asyncio.to_thread(rt.llm.stop)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(target: Callable[..., None], args: tuple[Any, ...], timeout: float, n: int = 2) -> Any:
    """``target(rank, *args, out)`` in ``n`` spawned processes (a process group's ranks); what the first of them
    puts on ``out``. Every rank must exit cleanly; any left (waiting in a collective for a peer that failed) is
    killed."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    ranks = [ctx.Process(target=target, args=(rank, *args, out)) for rank in range(n)]
    for p in ranks:
        p.start()
    try:
        result = out.get(timeout=timeout)
        for p in ranks:
            p.join(60)
            assert p.exitcode == 0
        return result
    finally:
        for p in ranks:
            if p.is_alive():
                p.kill()


def eventually(check: Callable[[], bool], within: float, what: str, every: float = 0.05) -> None:
    """Polls ``check`` until it holds, failing naming ``what`` after ``within`` seconds: how live tests wait
    for a server process's state, which they see only through its HTTP answers."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {within} s")
        time.sleep(every)


@contextlib.contextmanager
def server_process(cache_dir: Path, *args: str, **settings: object) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """A real ``python -m server`` process on loopback with TEST_SETTINGS overridden by ``settings``,
    yielded once ready as ``(process, url)``; terminated on exit if still running."""
    port = free_port()
    env = {**os.environ, "LLM_CACHE_DIR": str(cache_dir)}
    env.update({f"LLM_{k.upper()}": str(v) for k, v in {**TEST_SETTINGS, **settings}.items()})
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "--port", str(port), "--log-level", "warning", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early: {proc.stderr.read() if proc.stderr else ''}")
        try:
            return httpx.get(f"{url}/ready", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        eventually(ready, 300, "the server ready", every=0.5)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


# The two process layouts every live test runs against: the engines on a thread of the one server process
# (the default on a small CPU machine), and engine core + API servers (the default on a GPU host).
LAYOUTS = {"one-process": ("--engine-core", "thread"), "core+2api": ("--engine-core", "process", "--api-servers", "2")}


@pytest.fixture(scope="session", params=list(LAYOUTS))
def live_server(request: pytest.FixtureRequest, cache_dir: Path) -> Iterator[str]:
    """A real ``python -m server`` on loopback, for tests that need real sockets, in each process layout."""
    with server_process(cache_dir, *LAYOUTS[request.param]) as (_, url):
        yield url


TINY_LLAMA = {
    "vocab_size": 97,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
}


def random_llama(seed: int = 0, **overrides: Any) -> LlamaForCausalLM:
    """A random HF Llama of the ``TINY_LLAMA`` shape (with ``overrides``): no model files, so unit tests may
    use it."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **overrides})).eval()


def random_weights(seed: int = 0, **overrides: Any) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """:func:`random_llama`'s config and state dict, each tensor its own copy (as a checkpoint loads them)."""
    hf = random_llama(seed, **overrides)
    return hf.config, {k: v.detach().clone() for k, v in hf.state_dict().items()}


TINY_BERT = {
    "vocab_size": 30522,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
}


def write_head_model(out: Path, labels: list[str], seed: int = 0) -> BertForSequenceClassification:
    """A random ``TINY_BERT`` classifier with named ``labels``, saved to ``out`` with the embedded MiniLM's
    tokenizer (its vocabulary): a local model directory with a classification head, no training needed."""
    config = BertConfig(**TINY_BERT, id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(embedded_encoder_dir() / name, out / name)
    return model


@pytest.fixture(scope="module")
def tiny() -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """A two-layer random Llama (config, HF state dict)."""
    return random_weights()

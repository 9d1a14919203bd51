"""Background compiling of the decode step in a child process (``python -m engine.decode_compiler``).

Compiling on a thread of the serving process held its GIL for the Python half of tracing and lowering,
minutes on a cold cache, and stalled served streams for seconds at a time
(load_tests/results/cpu_vs_llamacpp/background_compile/). Here a child at the lowest priority (nice 19,
one C++ compile at a time) compiles the same step at every bucket into the inductor cache the server uses
(``TORCHINDUCTOR_CACHE_DIR``, inherited), and says on stdout which batch bucket is compiled. The serving
process then compiles that bucket itself from the warm cache: the FX graph and its C++ come from disk,
only dynamo's trace runs in process (engine/cuda_graphs.py). Each bucket loaded so is marked in the cache
(:class:`CompiledMarks`); on a later start the marked buckets load at once and the child compiles only the
others, or does not start at all (it used to compile every bucket again from the warm cache first, seconds
each: load_tests/results/cpu_vs_llamacpp/compile_process/).

The child needs the model's structure, not its weights: graphs and their cache keys depend on the
parameters' shapes, dtypes, strides and aliasing, never their values. The model travels as a pickle whose
tensors are only that metadata (:func:`skeleton`); the child's tensors are zero pages of anonymous memory.
The child exits when the server closes its stdin (or dies), so no compile outlives its server.
"""

from __future__ import annotations

import contextlib
import copyreg
import hashlib
import io
import json
import logging
import mmap
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompileJob:
    """What the child compiles: a DecodeGraphs like the server's, over a skeleton of its model."""

    model: bytes  # skeleton(model)
    kv_shape: tuple[int, ...]
    kv_dtype: torch.dtype
    block_size: int
    config: object  # engine.cuda_graphs.DecodeConfig (not imported here: that module imports this one)
    logits: bool
    threads: int  # torch threads of the server: inductor's C++ is generated for that many
    buckets: tuple[tuple[int, int], ...] | None = None  # the (batch, width) pairs to compile; None: all


class _Skeleton(pickle._Pickler):  # Python's own pickler: C's leaves no hook on how a set is saved
    """Pickles tensors as (storage, metadata), no data: aliasing (tied weights, views) survives. Tensors and
    storages are numbered in the order met, and sets pickle sorted, so the same model's skeleton is the same
    bytes in every process: :func:`job_key` hashes it."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.tensors: dict[int, int] = {}
        self.storages: dict[int, int] = {}
        self.held: list[torch.Tensor] = []  # each numbered tensor alive to the end: no id reused

    def persistent_id(self, obj: object) -> object:
        if not isinstance(obj, torch.Tensor):
            return None
        storage = obj.untyped_storage()
        if id(obj) not in self.tensors:
            self.tensors[id(obj)] = len(self.tensors)
            self.held.append(obj)
        key = self.tensors[id(obj)]
        ptr = self.storages.setdefault(storage.data_ptr(), len(self.storages))
        return (
            key, isinstance(obj, nn.Parameter), obj.requires_grad, obj.dtype, tuple(obj.shape),
            obj.stride(), obj.storage_offset(), ptr, storage.nbytes(),
        )  # fmt: skip

    def _save_set(self, obj: set | frozenset) -> None:  # a set's order follows string hashes: per process
        try:
            items = sorted(obj)
        except TypeError:
            items = list(obj)
        self.save_reduce(type(obj), (items,), obj=obj)

    dispatch: ClassVar[dict] = {**pickle._Pickler.dispatch, set: _save_set, frozenset: _save_set}


class _Unskeleton(pickle.Unpickler):
    """Rebuilds :class:`_Skeleton`'s tensors over zero pages: one storage per original storage, one tensor
    per original tensor object."""

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.tensors: dict[int, torch.Tensor] = {}
        self.storages: dict[int, torch.UntypedStorage] = {}

    def persistent_load(self, pid: tuple) -> torch.Tensor:
        key, param, grad, dtype, shape, stride, offset, ptr, nbytes = pid
        if key not in self.tensors:
            if ptr not in self.storages:  # anonymous memory reads as zeros and holds no pages until written
                buf = mmap.mmap(-1, max(nbytes, 1))
                self.storages[ptr] = torch.frombuffer(buf, dtype=torch.uint8).untyped_storage()
            t = torch.empty(0, dtype=dtype).set_(self.storages[ptr], offset, shape, stride)
            self.tensors[key] = nn.Parameter(t, requires_grad=grad) if param else t.requires_grad_(grad)
        return self.tensors[key]


def _memory_format(name: str) -> torch.memory_format:
    return getattr(torch, name)


def stable_cache_keys() -> None:
    """Makes inductor's cache keys the same in every process. A ``torch.memory_format`` pickles by a name
    that pickle looks up in whichever loaded module reaches it first (``__mp_main__``, ``torch._utils``, …),
    so the same graph's key depended on what the process had imported, and the compiler process's entries
    missed in the server. Pickled through this module's function, it names the same global everywhere.
    The reducer is process-wide (inductor's key pickler copies ``copyreg``'s table): a ``torch.save`` of a
    memory format in this process names that function too, which ``torch.load(weights_only=True)`` is told
    to accept."""
    copyreg.pickle(torch.memory_format, lambda f: (_memory_format, (str(f).removeprefix("torch."),)))
    torch.serialization.add_safe_globals([_memory_format])


def skeleton(obj: object) -> bytes:
    out = io.BytesIO()
    _Skeleton(out).dump(obj)
    return out.getvalue()


def from_skeleton(data: bytes) -> object:
    return _Unskeleton(data).load()


MARKS_FORMAT = 1  # bump when what a mark promises changes


def job_key(job: CompileJob) -> str:
    """What the graphs a job compiles, and so their inductor cache keys, depend on: the model's structure (its
    skeleton), the KV cache's shape, the decode config, the threads; and what this key cannot see inside
    inductor's own key: the sources of the code traced (every module of engine/ and models/, a superset),
    torch's and Python's versions, the CPU's vector capability, inductor's settings from the environment.
    Anything else the same graph's key might depend on errs the safe way: a mark the cache does not back
    makes the load compile in process, which :class:`DecodeGraphs` reports."""
    h = hashlib.sha256()
    settings = sorted((k, v) for k, v in os.environ.items() if k.startswith(("TORCHINDUCTOR_", "TORCH_COMPILE")))
    fields = (
        MARKS_FORMAT, torch.__version__, sys.version, torch.backends.cpu.get_cpu_capability(), settings,
        job.kv_shape, str(job.kv_dtype), job.block_size, repr(job.config), job.logits, job.threads,
    )  # fmt: skip
    h.update(repr(fields).encode())
    h.update(job.model)
    h.update(_SOURCES)
    return h.hexdigest()[:32]


def _sources_digest() -> bytes:
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for path in sorted([*root.glob("engine/*.py"), *root.glob("models/*.py")]):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return h.digest()


# Read once, as this process imports its code: a tree upgraded under a running server must not key the marks of
# graphs traced from the old code with the new sources.
_SOURCES = _sources_digest()


class CompiledMarks:
    """Which buckets of a job the inductor cache holds: a file per (batch, width), made once that bucket has
    loaded in the serving process, under the cache directory itself (``TORCHINDUCTOR_CACHE_DIR``), so a
    removed cache takes its marks along. A restart on a warm cache loads the marked buckets in process
    at once instead of waiting for a compiler process to compile them again (seconds each, for nothing)."""

    def __init__(self, job: CompileJob) -> None:
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        self.dir = Path(cache_dir()) / "lowlat_decode" / job_key(job)

    def __contains__(self, key: tuple[int, int]) -> bool:
        return self._path(key).exists()

    def add(self, key: tuple[int, int]) -> None:
        """Marks ``key``; a mark that cannot be written (a read-only cache) only means a child next time."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._path(key).touch()
        except OSError as exc:
            log.warning("could not mark batch %d (width %d) compiled in %s: %s", *key, self.dir, exc)

    def clear(self) -> None:
        """Forgets every mark of this job: one proved unbacked by the cache, so the others are not trusted."""
        shutil.rmtree(self.dir, ignore_errors=True)

    def _path(self, key: tuple[int, int]) -> Path:
        batch, width = key
        return self.dir / f"batch{batch}-width{width}"


class CompilerProcess:
    """The server's handle on the child: :meth:`compiled` yields each (batch, width) the child has compiled,
    in order, and ends when the child exits; then :attr:`error` says why it stopped early, if it did."""

    def __init__(self, job: CompileJob) -> None:
        self.error: str | None = None
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115  # the child's lifetime: closed in compiled()
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}  # its idle OpenMP workers must not spin
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # its metrics are nobody's: no files in the server's scrape
        # The packages this process imported (engine, models) from wherever they are, whatever the directory.
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "engine.decode_compiler"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
            start_new_session=True,  # a group of its own: stopping it ends its compiler subprocesses too
        )
        if hasattr(os, "setpriority"):  # from its first instruction, not once it has imported torch
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, self.proc.pid, 19)
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL))
            self.proc.stdin.flush()
        except OSError:  # the child died at once: its exit status and stderr say why
            pass

    def compiled(self) -> Iterator[tuple[int, int]]:
        assert self.proc.stdout is not None
        try:
            for line in self.proc.stdout:  # blocks without the GIL
                batch, width = json.loads(line)["compiled"]
                yield batch, width
            code = self.proc.wait()
            if code != 0:
                self._stderr.seek(0)
                tail = self._stderr.read().decode(errors="replace").strip().splitlines()[-3:]
                self.error = f"the compiler process exited with {code}: {' | '.join(tail)}"[:500]
        finally:  # read to the end, or left early (a failed load): this thread closes what it reads
            self.proc.stdout.close()
            self._stderr.close()

    def stop(self) -> None:
        """Kills the child and its compiler subprocesses (its compile is lost; entries already in the cache
        stay) and reaps it; :meth:`compiled` then ends, on the thread reading it."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()


def main() -> None:
    """The child: reads a pickled :class:`CompileJob` on stdin, compiles its buckets, prints each as done.
    It leaves through ``os._exit``: an interpreter shutting down while a daemon thread reads stdin aborts,
    and its status would hide the error."""
    try:
        _compile()
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    os._exit(0)


def _compile() -> None:
    if hasattr(os, "setpriority"):  # Unix: yield the cores to the server's steps
        os.setpriority(os.PRIO_PROCESS, 0, 19)
    job: CompileJob = pickle.load(sys.stdin.buffer)  # the server writes it first; stdin stays open after it
    # The server closing stdin (stopping, or dead) ends the compile: nothing outlives it.
    threading.Thread(target=lambda: (sys.stdin.buffer.read(), os.killpg(0, signal.SIGKILL)), daemon=True).start()
    from engine.cuda_graphs import DecodeGraphs
    from engine.model_runner import zeros

    torch.set_num_threads(job.threads)
    cpu = torch.device("cpu")
    model = from_skeleton(job.model)
    kv = (zeros(job.kv_shape, cpu, job.kv_dtype), zeros(job.kv_shape, cpu, job.kv_dtype))
    decode = DecodeGraphs(model, kv, job.block_size, job.config, cpu, job.logits)
    for batch, width in decode.compile_buckets(only=job.buckets):
        print(json.dumps({"compiled": [batch, width]}), flush=True)


if __name__ == "__main__":
    main()

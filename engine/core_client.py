"""An API server's side of the engine cores: one connection to each core, one listening path for all replies.

Generation goes through an :class:`LLMClient` whose commands this client routes: a new request to the
least-loaded core (the conversation's core where its prefix is likely cached and that core is not much
busier), an abort to the core that has the request. Classification goes through :meth:`submit_many`,
which has the batcher's interface, so routes do not know whether the engine is local or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass

from engine import protocol
from engine.batcher import BatcherClosed, BatcherFull
from engine.classifier import ClassifierInputError, ClassifyItem, ClassResult, Embedding
from engine.frames import Sender, listen, read_frames
from engine.llm_engine import LLMClient

log = logging.getLogger(__name__)

AFFINITY_SLACK = 4  # sequences a conversation's core may run beyond the least-loaded one and still get it
AFFINITY_TOKENS = 64  # prompt tokens hashed to find a conversation's core (a system prompt's first blocks)


WATCH_INTERVAL_S = 0.25
DIAL_RETRY_S = 0.01  # a starting core listens once its models are loaded: tried again this often until then


@dataclass(frozen=True)
class CoreLink:
    """How an API server reaches the engine cores (addresses are paths of Unix sockets, engine/frames.py)."""

    api_index: int
    core_addresses: list[str]
    own_address: str


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (an exited process not yet reaped by its parent counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:  # no procfs: fall back to a signal-0 probe
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


class CoreClient:
    def __init__(self, link: CoreLink) -> None:
        self.api_index = api_index = link.api_index
        self.own_address = own_address = link.own_address
        core_addresses = link.core_addresses
        self._core_addresses = core_addresses
        self._listener = listen(own_address)
        self._cores: list[Sender] = []  # connected in connect(), in core order
        self._ready: list[protocol.Ready | None] = [None] * len(core_addresses)
        self._all_ready = asyncio.Event()
        self.llm: LLMClient | None = None
        self._gen_core: dict[int, int] = {}  # key -> core, while the request runs
        self._gen_load = [0] * len(core_addresses)  # this API server's requests per core
        self._core_load = [0] * len(core_addresses)  # running + waiting, as each core last reported
        self._cls_keys = iter(range(api_index, 1 << 62, protocol.API_STRIDE))
        self._cls_waiting: dict[int, asyncio.Future[protocol.ClassifyResults]] = {}
        self._cls_load = [0] * len(core_addresses)
        self._heard = [0.0] * len(core_addresses)  # loop time of each core's latest frame
        self._pending: list[list[protocol.Command]] = [[] for _ in core_addresses]  # this loop turn's
        self._receiver: asyncio.Task[None] | None = None
        self._pids: list[int] = []
        self.error: str | None = None

    async def connect(self, timeout: float) -> list[protocol.Ready]:
        """Introduces this API server to every core, once each listens; returns their answers, in core order."""
        loop = asyncio.get_running_loop()
        self._receiver = asyncio.create_task(read_frames(self._listener, self._on_frame))

        async def introduce() -> None:
            for address in self._core_addresses:
                while True:
                    try:
                        self._cores.append(Sender(address, loop))
                        break
                    except (FileNotFoundError, ConnectionRefusedError):
                        await asyncio.sleep(DIAL_RETRY_S)
                self._cores[-1].send(protocol.encode(protocol.Hello(self.api_index, self.own_address)))
            await self._all_ready.wait()

        await asyncio.wait_for(introduce(), timeout)
        self._pids = [r.pid for r in self._ready if r is not None]
        return self._ready  # type: ignore[return-value]

    async def watch(self, on_failure: Callable[[], None], hang_s: float) -> None:
        """Fails everything in flight, and all later work, as soon as a core process is gone or this server
        can no longer read the cores' frames. A core that has work from this API server and sends nothing for
        ``hang_s`` is hung: it is killed, which ends the server (the supervisor's rule for a core that exits),
        rather than holding requests forever."""
        loop = asyncio.get_running_loop()
        while self.error is None:
            receiver = self._receiver
            if receiver is not None and receiver.done() and not receiver.cancelled():
                why = f"reading the engine cores' frames failed: {receiver.exception()!r}"
                log.error("%s", why)  # a bug: without the frames nothing in flight would ever finish
                self.fail(why)
                on_failure()
                return
            for index, pid in enumerate(self._pids):
                busy = self._gen_load[index] > 0 or self._cls_load[index] > 0
                if busy and loop.time() - self._heard[index] > hang_s:
                    log.error(
                        "engine core %d (pid %d) sent nothing for %.0f s with work in flight: killing it",
                        index,
                        pid,
                        hang_s,
                    )
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                if not _alive(pid):
                    log.error("engine core %d (pid %d) is gone", index, pid)
                    self.fail(f"engine core {index} stopped")
                    on_failure()
                    return
            await asyncio.sleep(WATCH_INTERVAL_S)

    def _sending(self, core: int) -> None:
        """Work goes to ``core``: if it had none from here, its silence counts from now."""
        if self._gen_load[core] == 0 and self._cls_load[core] == 0:
            self._heard[core] = asyncio.get_running_loop().time()

    def attach(self, llm: LLMClient) -> None:
        self.llm = llm

    # ------------------------------------------------------------------ generation

    def send_generation(self, command: protocol.AddRequest | protocol.Abort) -> None:
        """``LLMClient.send``: picks a core for a new request, follows it for an abort."""
        if isinstance(command, protocol.AddRequest):
            core = self._pick_core(command.prompt_ids)
            self._sending(core)
            self._gen_core[command.key] = core
            self._gen_load[core] += 1
        else:
            core = self._gen_core.pop(command.key, -1)
            if core < 0:  # finished meanwhile
                return
            self._gen_load[core] -= 1
        self._command(core, command)

    def _command(self, core: int, command: protocol.Command) -> None:
        """Queues ``command`` for ``core``: the commands of one event-loop turn go in one frame."""
        pending = self._pending[core]
        pending.append(command)
        if len(pending) == 1:  # the first of this loop turn: send them all when the turn's tasks have run
            asyncio.get_running_loop().call_soon(self._flush, core)

    def _flush(self, core: int) -> None:
        commands, self._pending[core] = self._pending[core], []
        self._cores[core].send(protocol.encode(protocol.Commands(commands)))

    def _pick_core(self, prompt_ids: list[int]) -> int:
        if len(self._cores) == 1:
            return 0
        load = [mine + theirs for mine, theirs in zip(self._gen_load, self._core_load, strict=True)]
        best = min(range(len(load)), key=load.__getitem__)
        home = hash(tuple(prompt_ids[:AFFINITY_TOKENS])) % len(load)
        return home if load[home] <= load[best] + AFFINITY_SLACK else best

    def _on_step(self, step: protocol.StepOutputs) -> None:
        self._heard[step.core] = asyncio.get_running_loop().time()
        self._core_load[step.core] = step.running + step.waiting
        for out in step.outputs:
            if out.finish_reason is not None and self._gen_core.pop(out.key, None) is not None:
                self._gen_load[step.core] -= 1
        assert self.llm is not None
        self.llm.on_step(step)

    # ------------------------------------------------------------------ classification

    def check_room(self, n: int) -> None:
        """Refuses at once when the cores are gone; the queue bound itself is the cores' (``submit_many``)."""
        if self.error is not None:
            raise BatcherClosed(self.error)

    async def submit_many(self, items: list[ClassifyItem]) -> list[ClassResult | Embedding | ClassifierInputError]:
        """The batcher's interface: results in input order; a full queue raises ``BatcherFull``."""
        if self.error is not None:
            raise BatcherClosed(self.error)
        key = next(self._cls_keys)
        core = min(range(len(self._cls_load)), key=self._cls_load.__getitem__)
        future: asyncio.Future[protocol.ClassifyResults] = asyncio.get_running_loop().create_future()
        self._cls_waiting[key] = future
        self._sending(core)
        self._cls_load[core] += len(items)
        self._command(core, protocol.ClassifyRequest(key, items))
        try:
            reply = await future
        except asyncio.CancelledError:
            if self._cls_waiting.pop(key, None) is not None:
                self._command(core, protocol.CancelClassify(key))
            raise
        finally:
            self._cls_load[core] -= len(items)
        if reply.refused is not None:
            if reply.refused.startswith("full"):
                raise BatcherFull(reply.refused.removeprefix("full: "))
            if reply.refused.startswith("failed"):  # the batch failed in the core, as it raises in process
                raise RuntimeError(f"classification failed in engine core {core}: {reply.refused}")
            raise BatcherClosed(reply.refused)
        return [protocol.unpack_result(r) for r in reply.results]

    # ------------------------------------------------------------------ receiving

    def _on_frame(self, frame: bytes) -> None:
        message = protocol.decode_from_core(frame)
        if isinstance(message, protocol.StepOutputs):
            self._on_step(message)
        elif isinstance(message, protocol.ClassifyReplies):
            self._heard[message.core] = asyncio.get_running_loop().time()
            for reply in message.items:
                future = self._cls_waiting.pop(reply.key, None)
                if future is not None and not future.done():
                    future.set_result(reply)
        else:  # Ready: a core's answer to connect()'s Hello
            self._ready[message.core_index] = message
            if all(self._ready):
                self._all_ready.set()

    def fail(self, message: str) -> None:
        """A core is gone: everything in flight fails with ``message``, and so does all later work."""
        self.error = message
        if self.llm is not None:
            self.llm.fail_all(message)
        waiting, self._cls_waiting = self._cls_waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_exception(BatcherClosed(message))

    async def close(self) -> None:
        if self._receiver is not None:
            self._receiver.cancel()
            await asyncio.gather(self._receiver, return_exceptions=True)  # a failure was watch()'s to report
        self._listener.close()  # closed already where reading started
        for sender in self._cores:
            sender.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.own_address)

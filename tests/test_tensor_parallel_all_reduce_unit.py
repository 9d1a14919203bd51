"""Which all-reduce a tensor-parallel rank uses (models/tensor_parallel.py): the one-shot kernel over symmetric
memory for tensors it can sum, NCCL/gloo otherwise, NCCL for every rank when setting it up fails anywhere;
and the step frames rank 0 sends its followers (engine/tp.py). No GPU, no process group: the collective
parts are stood in for."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.distributed as dist

import models.tensor_parallel as tp
from engine.tp import DECODE, Decode, Prefill, decode, encode
from models.llama import Llama
from models.tensor_parallel import (
    SYMMETRIC_MAX_BYTES,
    AllReduce,
    SymmetricAllReduce,
    fits_symmetric,
    make_all_reduce,
)

pytestmark = pytest.mark.unit

CUDA = torch.device("cuda", 0)
BF16 = torch.bfloat16


def test_fits_small_aligned_contiguous_tensors_of_the_buffers_dtype() -> None:
    row = torch.zeros(1, 4096, dtype=BF16)  # one decode row of an 8B-class model
    assert fits_symmetric(row, BF16, SYMMETRIC_MAX_BYTES)
    whole = torch.zeros(SYMMETRIC_MAX_BYTES // 2, dtype=BF16)
    assert fits_symmetric(whole, BF16, SYMMETRIC_MAX_BYTES)
    assert not fits_symmetric(torch.zeros(SYMMETRIC_MAX_BYTES // 2 + 8, dtype=BF16), BF16, SYMMETRIC_MAX_BYTES)
    assert not fits_symmetric(row.half(), BF16, SYMMETRIC_MAX_BYTES)  # another dtype than the buffer's
    assert not fits_symmetric(torch.zeros(64, 32, dtype=BF16).t(), BF16, SYMMETRIC_MAX_BYTES)  # not contiguous
    assert not fits_symmetric(torch.zeros(4100, dtype=BF16)[4:], BF16, SYMMETRIC_MAX_BYTES)  # 8-byte offset
    assert not fits_symmetric(torch.zeros(3, dtype=BF16), BF16, SYMMETRIC_MAX_BYTES)  # 6 bytes
    assert not fits_symmetric(torch.zeros(0, 4096, dtype=BF16), BF16, SYMMETRIC_MAX_BYTES)


class FakeSymmetric(SymmetricAllReduce):
    """The one-shot all-reduce without symmetric memory: records what it sums (doubles it, as two ranks of
    equal tensors would); ``fail`` raises at setup, ``wrong`` makes its self-check fail."""

    fail: str | None = None
    wrong: str | None = None
    made: list[FakeSymmetric] = []  # noqa: RUF012 (the instances the factory made)

    def __init__(self, group: object, device: torch.device, dtype: torch.dtype, max_bytes: int) -> None:
        if self.fail:
            raise RuntimeError(self.fail)
        self.dtype, self.max_bytes, self.summed = dtype, max_bytes, []
        FakeSymmetric.made.append(self)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.summed.append(tuple(x.shape))
        return x * 2

    def check(self, rank: int, world: int) -> str | None:
        return self.wrong


@pytest.fixture
def fake_group(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """Two ranks agreeing (``_all_ranks`` answers this rank's own verdict); returns what NCCL summed."""
    FakeSymmetric.made, FakeSymmetric.fail, FakeSymmetric.wrong = [], None, None
    nccl: list[torch.Tensor] = []
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "all_reduce", lambda x, group=None: nccl.append(x))
    monkeypatch.setattr(tp, "_all_ranks", lambda ok, group, device: ok)
    return nccl


def test_auto_on_cuda_sums_decode_rows_one_shot_and_larger_tensors_with_nccl(
    fake_group: list[torch.Tensor], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="models.tensor_parallel"):
        reduce = make_all_reduce("auto", CUDA, BF16, symmetric=FakeSymmetric)
    assert isinstance(reduce.symmetric, FakeSymmetric)
    assert "one-shot over symmetric memory up to 8388608 bytes" in caplog.text
    rows = torch.ones(16, 4096, dtype=BF16)
    assert reduce(rows).max().item() == 2 and not fake_group
    prefill = torch.ones(1, 2048, 4096, dtype=BF16)  # 16 MiB: NCCL's
    assert reduce(prefill) is prefill and fake_group == [prefill]
    assert reduce.symmetric.summed == [(16, 4096)]


@pytest.mark.parametrize(
    ("kind", "device", "dtype"),
    [("nccl", CUDA, BF16), ("auto", torch.device("cpu"), torch.float32)],
    ids=["asked-for-nccl", "cpu-gloo"],
)
def test_nccl_or_cpu_never_sets_symmetric_memory_up(
    fake_group: list[torch.Tensor], kind: tp.AllReduceKind, device: torch.device, dtype: torch.dtype
) -> None:
    reduce = make_all_reduce(kind, device, dtype, symmetric=FakeSymmetric)
    assert reduce.symmetric is None and FakeSymmetric.made == []
    x = torch.ones(1, 64, dtype=dtype)
    assert reduce(x) is x and fake_group == [x]


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        ({"fail": "no peer access"}, "RuntimeError: no peer access"),
        ({"wrong": "one-shot sum of 16 elements differs"}, "one-shot sum of 16 elements differs"),
        ({"dtype": torch.float16}, "not torch.float16"),
    ],
    ids=["setup-raises", "self-check-fails", "dtype-it-cannot-sum"],
)
def test_any_failure_falls_back_to_nccl_with_a_log_line(
    fake_group: list[torch.Tensor], caplog: pytest.LogCaptureFixture, setup: dict, reason: str
) -> None:
    FakeSymmetric.fail, FakeSymmetric.wrong = setup.get("fail"), setup.get("wrong")
    with caplog.at_level(logging.WARNING, logger="models.tensor_parallel"):
        reduce = make_all_reduce("auto", CUDA, setup.get("dtype", BF16), symmetric=FakeSymmetric)
    assert reduce.symmetric is None
    assert "falls back to NCCL" in caplog.text and reason in caplog.text
    x = torch.ones(1, 4096, dtype=BF16)
    assert reduce(x) is x and fake_group == [x]


def test_a_peer_that_failed_takes_every_rank_to_nccl(
    fake_group: list[torch.Tensor], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """This rank set it up and checked it, but the group's verdict after setup is no: NCCL here too, or the
    ranks would wait at different collectives."""
    verdicts = iter([True, False])
    monkeypatch.setattr(tp, "_all_ranks", lambda ok, group, device: ok and next(verdicts))
    with caplog.at_level(logging.WARNING, logger="models.tensor_parallel"):
        reduce = make_all_reduce("auto", CUDA, BF16, symmetric=FakeSymmetric)
    assert len(FakeSymmetric.made) == 1 and reduce.symmetric is None
    assert "symmetric memory failed on a peer" in caplog.text


def test_a_compiled_step_sums_through_one_opaque_op_into_new_tensors(fake_group: list[torch.Tensor]) -> None:
    """Traced by dynamo, the all-reduce is one node of the ``lowlat::tp_all_reduce`` op (inductor compiles
    around it); run, it sums as the eager call does (one-shot where the tensor fits, else NCCL) but into a new
    tensor, its input untouched, as a functional op must."""
    reduce = make_all_reduce("auto", CUDA, BF16, max_bytes=1024, symmetric=FakeSymmetric)
    ops: list[object] = []

    def backend(gm: torch.fx.GraphModule, inputs: list[torch.Tensor]) -> object:
        ops.extend(node.target for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    step = torch.compile(lambda x: reduce(x) + 1, backend=backend, fullgraph=True, dynamic=False)
    row, prefill = torch.ones(1, 256, dtype=BF16), torch.ones(1, 1024, dtype=BF16)  # 512 B fits, 2 KiB does not
    assert step(row).max().item() == 3 and row.max().item() == 1  # doubled by the fake one-shot kernel
    assert not fake_group
    summed = step(prefill)
    assert len(fake_group) == 1 and fake_group[0] is not prefill  # NCCL summed a copy
    assert summed.max().item() == 2 and prefill.max().item() == 1
    assert ops.count(torch.ops.lowlat.tp_all_reduce.default) == 2  # one per compiled graph (two shapes)
    assert reduce.symmetric.summed == [(1, 256)]


def test_row_parallel_layers_share_the_ranks_all_reduce(tiny: tuple) -> None:
    config, state = tiny
    reduce = AllReduce()
    model = tp.shard_llama(Llama.from_hf(config, state), 1, 2, reduce)
    assert {id(layer.self_attn.o_proj.all_reduce) for layer in model.layers} == {id(reduce)}
    assert {id(layer.mlp.down_proj.all_reduce) for layer in model.layers} == {id(reduce)}


def test_decode_steps_travel_as_raw_rows_and_prefill_steps_pickled() -> None:
    staging = np.arange(8 * 40, dtype=np.int64).reshape(8, 40)
    step = Decode(batch=4, kv_len=256, width=18, rows=staging[:4, :18], q=3)  # a strided view, as rank 0 sends
    frame = encode(step)
    assert len(frame) == DECODE.size + 4 * 18 * 8
    got = decode(memoryview(frame))
    assert isinstance(got, Decode) and (got.batch, got.kv_len, got.width, got.q) == (4, 256, 18, 3)
    np.testing.assert_array_equal(got.rows, staging[:4, :18])
    prefill = Prefill(torch.ones(2, 5, dtype=torch.long), torch.arange(10).view(2, 5), torch.zeros(2, 1), [5, 3])
    back = decode(memoryview(encode(prefill)))
    assert isinstance(back, Prefill) and back.q_lens == [5, 3]
    torch.testing.assert_close(back.positions, prefill.positions)

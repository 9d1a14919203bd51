"""Generation admission by size (issue 18 item 2), without models or processes: a request holds one slot
per sequence and the tokens those sequences may use (prompt + max_tokens); a request bigger than the
server would ever admit is refused with 400 naming the limit, even when the server is idle."""

from __future__ import annotations

import multiprocessing

import pytest

from server.admission import Admission, shared_counts
from server.config import Settings
from server.errors import APIError

pytestmark = pytest.mark.unit


def admission(**overrides: object) -> Admission:
    limits = {"max_num_seqs": 4, "max_queued_requests": 4, "kv_cache_tokens": 1024, "max_input_tokens": 256}
    return Admission.from_settings(Settings(**{**limits, **overrides}))


def test_a_request_larger_than_the_server_admits_is_400_naming_the_limit_even_when_idle() -> None:
    gates = admission()  # 8 sequences, 2,048 tokens
    with pytest.raises(APIError) as err:
        gates.generation([20] * 9, field="n")
    assert err.value.status == 400 and err.value.field == "n"
    assert "9 generation sequences" in err.value.message and "at most 8" in err.value.message
    assert "max_num_seqs + max_queued_requests" in err.value.message
    with pytest.raises(APIError) as err:
        gates.generation([300] * 7)
    assert err.value.status == 400 and err.value.field == "max_tokens"
    assert "2100 generation tokens" in err.value.message and "(max_admitted_tokens)" in err.value.message
    assert gates.idle()  # nothing was taken


def test_tokens_are_counted_as_well_as_sequences() -> None:
    gates = admission()
    with gates.generation([1000]), gates.generation([1000]):  # two sequences of 8, but all 2,048 tokens but 48
        with pytest.raises(APIError) as err:
            gates.generation([100])
        assert err.value.status == 429 and err.value.headers == {"Retry-After": "1"}
        assert "max_admitted_tokens" in err.value.message
        assert gates.generate.count == 2  # the refused request holds nothing
        with gates.generation([48]):
            pass
    assert gates.idle()


def test_sequences_bound_short_requests() -> None:
    gates = admission()
    with gates.generation([10] * 5, field="n"):
        with pytest.raises(APIError) as err:
            gates.generation([10] * 4, field="n")
        assert err.value.status == 429 and "generation sequences" in err.value.message
        with gates.generation([10] * 3, field="n"):
            assert (gates.generate.count, gates.tokens.count) == (8, 80)
    assert gates.idle()


def test_the_token_bound_defaults_to_twice_the_kv_cache_per_engine_core() -> None:
    assert admission().tokens.limit == 2048
    assert admission(max_admitted_tokens=600).tokens.limit == 600
    assert admission(max_admitted_tokens=600, data_parallel_size=2, engine_core="process").tokens.limit == 1200


def test_counts_in_shared_memory_are_one_decision_for_every_api_server() -> None:
    """What API-server processes share (multiprocessing Values): two Admissions over the same counts."""
    counts = shared_counts(multiprocessing.get_context("spawn"))
    settings = Settings(max_num_seqs=2, max_queued_requests=0, max_admitted_tokens=1024, max_input_tokens=256)
    first, second = Admission.from_settings(settings, counts), Admission.from_settings(settings, counts)
    with first.generation([700]):
        with pytest.raises(APIError) as err:
            second.generation([700])  # 700 of 1,024 tokens held by the other API server
        assert err.value.status == 429
        with second.generation([300], stream=True):
            assert (first.generate.count, first.tokens.count, first.streams.count) == (2, 1000, 1)
    assert first.idle() and second.idle()

"""The official ``openai`` client against a real server process: chat (whole, streamed, n > 1),
completions, models, embeddings, errors in OpenAI's shape; request ids."""

from __future__ import annotations

import math

import httpx
import openai
import pytest

from load_tests.loadgen import make_scenario, run_sweep_sync
from tests.test_live_server import wait_idle

pytestmark = pytest.mark.live

GEN = "SmolLM2-135M-Instruct"
EMB = "all-MiniLM-L6-v2"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(live_server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live_server}/v1", api_key="unused", max_retries=0, timeout=60)


def test_models(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {GEN, EMB}
    assert models[GEN].owned_by and models[GEN].created > 0
    assert models[GEN].model_extra["task"] == "generate"
    assert "load_seconds" in models[GEN].model_extra["details"]


def test_chat_whole(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=GEN, messages=FRANCE, max_tokens=16, temperature=0)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == GEN
    assert len(r.choices) == 1
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    u = r.usage
    assert u.prompt_tokens > 10 and 0 < u.completion_tokens <= 16
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens


def test_chat_streamed_matches_whole(client: openai.OpenAI) -> None:
    kwargs = {"model": GEN, "messages": FRANCE, "max_completion_tokens": 12, "temperature": 0}
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_n_seeded_choices_and_penalties(client: openai.OpenAI) -> None:
    kwargs = {"model": GEN, "messages": FRANCE, "max_tokens": 8, "temperature": 1.0, "seed": 3, "n": 3}
    first = client.chat.completions.create(**kwargs)
    again = client.chat.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    assert len({c.message.content for c in first.choices}) > 1  # seed + i: the choices differ
    single = client.chat.completions.create(**{**kwargs, "n": 1})
    assert first.usage.prompt_tokens == single.usage.prompt_tokens  # the prompt counts once
    assert 3 <= first.usage.completion_tokens <= 3 * 8
    streamed = list(client.chat.completions.create(**kwargs, stream=True))
    by_index = {
        i: "".join(c.choices[0].delta.content or "" for c in streamed if c.choices[0].index == i) for i in range(3)
    }
    assert [by_index[i] for i in range(3)] == [c.message.content for c in first.choices]

    story = {"model": GEN, "max_tokens": 24, "temperature": 0}
    prompt = "Repeat after me: the cat, the cat, the cat, the cat,"
    plain = client.completions.create(prompt=prompt, **story).choices[0].text
    penalized = client.completions.create(prompt=prompt, frequency_penalty=2.0, **story).choices[0].text
    assert penalized != plain
    assert penalized.count("cat") < plain.count("cat")


def test_completions(client: openai.OpenAI) -> None:
    r = client.completions.create(model=GEN, prompt="Once upon a time", max_tokens=5, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    echoed = client.completions.create(model=GEN, prompt="Once upon a time", max_tokens=5, temperature=0, echo=True)
    assert echoed.choices[0].text == "Once upon a time" + r.choices[0].text
    streamed = list(
        client.completions.create(model=GEN, prompt="Once upon a time", max_tokens=5, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text
    assert streamed[-1].choices[0].finish_reason == "length"
    two = client.completions.create(model=GEN, prompt=["Once upon a time", "The sea is"], max_tokens=3, temperature=0)
    assert [c.index for c in two.choices] == [0, 1]
    assert (
        two.choices[0].text
        == client.completions.create(model=GEN, prompt="Once upon a time", max_tokens=3, temperature=0).choices[0].text
    )


def test_embeddings(client: openai.OpenAI) -> None:
    texts = ["I was charged twice", "There is a double charge on my card", "Where is my parcel?"]
    r = client.embeddings.create(model=EMB, input=texts)  # the client asks for base64 and decodes it
    vectors = [d.embedding for d in r.data]
    assert [d.index for d in r.data] == [0, 1, 2] and len(vectors[0]) == 384
    assert all(math.isclose(sum(x * x for x in v), 1.0, rel_tol=1e-4) for v in vectors)
    cos = [sum(a * b for a, b in zip(vectors[0], v, strict=True)) for v in vectors[1:]]
    assert cos[0] > cos[1]  # the paraphrase is closer than the unrelated question
    floats = client.embeddings.create(model=EMB, input=texts[0], encoding_format="float")
    assert floats.data[0].embedding == pytest.approx(vectors[0], abs=1e-6)
    assert r.usage.prompt_tokens > 3 and r.usage.total_tokens == r.usage.prompt_tokens


def test_errors_in_openai_shape(client: openai.OpenAI, live_server: str) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=FRANCE)
    assert e.value.code == "model_not_found" and e.value.param == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=GEN, messages=FRANCE, logit_bias={"1": 5})
    assert e.value.code == "unsupported_parameter" and e.value.param == "logit_bias"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=GEN, messages=FRANCE, temperature=3)
    assert e.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=GEN, messages=FRANCE, max_tokens=10_000)
    assert e.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=GEN, prompt="word " * 400)
    assert e.value.param == "prompt" and e.value.code == "input_too_long"
    assert e.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=EMB, input="hi", dimensions=8)
    assert e.value.param == "dimensions"
    # Neutral values of unsupported fields (sent by some clients) are fine.
    ok = client.chat.completions.create(model=GEN, messages=FRANCE, max_tokens=2, logprobs=False, tools=[])
    assert ok.choices[0].message.content
    raw = httpx.post(f"{live_server}/v1/chat/completions", json={"model": GEN, "messages": FRANCE, "bogus": 1})
    assert raw.status_code == 400
    assert raw.json() == {
        "error": {"message": "bogus: unknown field", "type": "invalid_request_error", "param": "bogus", "code": None}
    }


def test_request_ids(live_server: str) -> None:
    r = httpx.post(
        f"{live_server}/generate", json={"prompt": "Hi", "max_tokens": 2}, headers={"X-Request-ID": "abc-123"}
    )
    assert r.headers["x-request-id"] == "abc-123"
    generated = httpx.get(f"{live_server}/health").headers["x-request-id"]
    assert len(generated) == 32
    bad = httpx.get(f"{live_server}/health", headers={"X-Request-ID": "no spaces allowed"}).headers["x-request-id"]
    assert bad != "no spaces allowed" and len(bad) == 32
    chat = httpx.post(
        f"{live_server}/v1/chat/completions",
        json={"model": GEN, "messages": FRANCE, "max_tokens": 2},
        headers={"X-Request-ID": "req-42"},
    )
    assert chat.json()["id"] == "chatcmpl-req-42" and chat.headers["x-request-id"] == "req-42"


def test_load_generator_openai_scenarios(live_server: str) -> None:
    for name in ("openai-chat-stream", "openai-completions"):
        result = run_sweep_sync(
            f"{live_server}/v1", make_scenario(name, max_tokens=4), concurrencies=[2], requests=4, timeout=60
        )
        summary = result.levels[0].summary
        assert summary.ok == 4 and not summary.errors, (name, summary.errors)
        assert summary.output_tokens_per_s > 0


def test_disconnected_stream_with_n_choices_frees_every_sequence(live_server: str) -> None:
    story = [{"role": "user", "content": "Tell me a very long story about a dragon."}]
    body = {"model": GEN, "messages": story, "max_tokens": 64, "n": 2, "temperature": 0, "stream": True}
    with (
        httpx.Client(base_url=live_server, timeout=60) as c,
        c.stream("POST", "/v1/chat/completions", json=body) as r,
    ):
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content": "' in line and '"content": ""' not in line:
                break  # first token of some choice arrived: hang up mid-generation
        else:
            raise AssertionError("no content streamed")
    wait_idle(live_server)  # both choices aborted: no running sequence, no KV block in use

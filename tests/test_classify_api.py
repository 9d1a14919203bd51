"""/classify through httpx on the ASGI app, with the real embedded MiniLM."""

from __future__ import annotations

import asyncio

import httpx
import pytest

pytestmark = pytest.mark.integration

LABELS = [
    "billing or payment problem",
    "shipping and delivery of an order",
    "returning or exchanging an item",
    "technical problem with the app or website",
]
MESSAGES = [
    "I was charged twice for my order this month",
    "Where is my package? Tracking has not moved in a week",
    "How do I send back the shoes? They are too small",
    "The app crashes every time I open it",
]


async def test_zero_shot_batch(client: httpx.AsyncClient) -> None:
    r = await client.post("/classify", json={"inputs": MESSAGES, "labels": LABELS})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [res["label"] for res in results] == LABELS
    for res in results:
        scores = [s["score"] for s in res["scores"]]
        assert scores == sorted(scores, reverse=True)
        assert res["score"] == scores[0]
        assert sum(scores) == pytest.approx(1.0, abs=1e-4)


async def test_single_string_input(client: httpx.AsyncClient) -> None:
    r = await client.post("/classify", json={"inputs": MESSAGES[0], "labels": LABELS})
    assert len(r.json()["results"]) == 1


async def test_multi_label_scores_independent(client: httpx.AsyncClient) -> None:
    r = await client.post("/classify", json={"inputs": MESSAGES[:1], "labels": LABELS, "multi_label": True})
    scores = [s["score"] for s in r.json()["results"][0]["scores"]]
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert sum(scores) != pytest.approx(1.0, abs=1e-3)


async def test_batched_equals_alone(client: httpx.AsyncClient) -> None:
    alone = [(await client.post("/classify", json={"inputs": m, "labels": LABELS})).json() for m in MESSAGES]
    together = await asyncio.gather(
        *(client.post("/classify", json={"inputs": m, "labels": LABELS}) for m in MESSAGES * 4)
    )
    for i, r in enumerate(together):
        got = {s["label"]: s["score"] for s in r.json()["results"][0]["scores"]}
        want = {s["label"]: s["score"] for s in alone[i % len(MESSAGES)]["results"][0]["scores"]}
        assert got == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"inputs": "help"}, 400, "labels"),
        ({"inputs": []}, 422, "inputs"),
        ({"inputs": ["ok", "  "], "labels": ["a"]}, 422, "inputs"),
        ({"inputs": "hi", "labels": []}, 422, "labels"),
        ({"inputs": "hi", "labels": ["a", "a"]}, 422, "labels"),
        ({"inputs": "hi", "labels": ["a"], "multi_label": "no"}, 422, "multi_label"),
        ({"inputs": "hi", "labels": ["a"], "extra": 1}, 422, "extra"),
        ({"inputs": 3, "labels": ["a"]}, 422, "inputs"),
        ({"inputs": ["x"] * 17, "labels": ["a"]}, 400, "inputs"),
        ({"inputs": "word " * 600, "labels": ["a"]}, 400, "inputs"),
    ],
)
async def test_bad_input_names_the_field(client: httpx.AsyncClient, body: dict, status: int, field: str) -> None:
    r = await client.post("/classify", json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["field"] == field

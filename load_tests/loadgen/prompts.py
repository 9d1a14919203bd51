"""Prompts for the scenarios: a built-in customer-service set, or a file of realistic traffic."""

from __future__ import annotations

import json
from pathlib import Path

Message = dict[str, str]
PromptItem = str | list[Message]
"""A prompt is either plain text or a chat conversation (list of {"role", "content"})."""

# Customer-service words that synthetic long texts are drawn from (load_tests/size_abuse.py,
# load_tests/labels_abuse.py): real words, so token counts are like a real user's.
SUPPORT_WORDS = (
    "order", "refund", "parcel", "invoice", "account", "password", "delivery", "billing", "warranty", "return",
    "app", "crash", "payment",
)  # fmt: skip

BUILTIN_PROMPTS: tuple[PromptItem, ...] = (
    "How do I reset my password?",
    "My order hasn't arrived yet. It was supposed to be delivered three days ago. What should I do?",
    "Can I change the shipping address on an order I already placed?",
    "I was charged twice for the same purchase. How do I get a refund?",
    "What is your return policy for items bought on sale?",
    "How can I cancel my subscription before the next billing cycle?",
    "The app keeps crashing when I try to upload a photo. Any ideas?",
    "Do you ship internationally, and how long does it take to reach Canada?",
    "I received the wrong size. Can I exchange it for a larger one?",
    "How do I update the credit card on my account?",
    "Is there a student discount available?",
    "My promo code says it's invalid, but it doesn't expire until next month.",
    "Can you explain the difference between the basic and premium plans?",
    "I forgot which email address I used to sign up. How can I find my account?",
    "The package arrived damaged. The box was crushed and the item is broken.",
    "How do I enable two-factor authentication?",
    "Write a short, polite reply to a customer asking when their refund will be processed.",
    "Summarize our refund policy in two sentences for a customer.",
    "Why was my account suspended?",
    "Can I speak to a human agent, please?",
    [
        {"role": "system", "content": "You are a helpful customer-service assistant. Be concise."},
        {"role": "user", "content": "Hi, I'd like to return a pair of shoes I bought last week."},
    ],
    [
        {"role": "user", "content": "My internet has been dropping every evening."},
        {"role": "assistant", "content": "Sorry to hear that. Have you tried restarting your router?"},
        {"role": "user", "content": "Yes, twice. It still disconnects around 8pm."},
    ],
    [
        {"role": "system", "content": "You answer billing questions for a streaming service."},
        {"role": "user", "content": "Why did my monthly bill go up this month?"},
    ],
    [
        {"role": "user", "content": "Where is my order #48213?"},
        {"role": "assistant", "content": "It shipped yesterday and should arrive in 2-3 days."},
        {"role": "user", "content": "Can I get it delivered to my office instead?"},
    ],
)


def load_prompts(path: str | Path) -> list[PromptItem]:
    """Read prompts from a file, so benchmarks can use realistic traffic.

    ``.jsonl``: one JSON value per line: a string, a list of messages, or an object with
    ``"prompt"``, ``"text"`` or ``"messages"``. Anything else: one prompt per non-blank line.
    """
    p = Path(path)
    items: list[PromptItem] = []
    lines = p.read_text(encoding="utf-8").splitlines()
    if p.suffix.lower() in (".jsonl", ".ndjson"):
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            value = json.loads(line)
            if isinstance(value, dict):
                value = value.get("messages") or value.get("prompt") or value.get("text")
            if isinstance(value, str) and value:
                items.append(value)
            elif isinstance(value, list) and all(isinstance(m, dict) and "content" in m for m in value):
                items.append([{"role": str(m.get("role", "user")), "content": str(m["content"])} for m in value])
            else:
                raise ValueError(f"{p}:{n}: expected a string, a message list, or prompt/text/messages")
    else:
        items = [line.strip() for line in lines if line.strip()]
    if not items:
        raise ValueError(f"{p}: no prompts")
    return items


def as_messages(item: PromptItem) -> list[Message]:
    """Chat form of a prompt (plain text becomes one user message)."""
    return [{"role": "user", "content": item}] if isinstance(item, str) else list(item)


def as_text(item: PromptItem) -> str:
    """Text form of a prompt, for text-only endpoints: the last user message of a conversation."""
    if isinstance(item, str):
        return item
    users = [m["content"] for m in item if m.get("role") == "user"]
    return users[-1] if users else item[-1]["content"]

"""Writes tests/data/chat_small.jsonl: 400 short synthetic conversations (seeded, so the file is always the
same), the example chat data of docs/data.md and of the fine-tuning tests.

Tasks a tiny model can learn from a few hundred examples, whose answers follow from the question:
addition, reversing a word, capitals, counting letters, fixed facts, greetings before a task, and a
system message asking for terse answers. ``python tests/data/make_chat_small.py`` rewrites the file.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = [
    "apple", "river", "stone", "cloud", "table", "garden", "pencil", "window", "orange", "silver",
    "rabbit", "candle", "forest", "bridge", "planet", "rocket", "winter", "summer", "yellow", "purple",
    "basket", "mirror", "ladder", "island", "castle", "dragon", "violin", "button", "carpet", "butter",
]  # fmt: skip
FACTS = [
    ("What colour is the sky?", "The sky is blue."),
    ("What colour is grass?", "Grass is green."),
    ("How many days are in a week?", "A week has 7 days."),
    ("How many legs does a cat have?", "A cat has 4 legs."),
    ("What do bees make?", "Bees make honey."),
    ("What is frozen water called?", "Frozen water is called ice."),
    ("How many hours are in a day?", "A day has 24 hours."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
]
GREETINGS = [
    ("Hi!", "Hello! How can I help?"),
    ("Hello there.", "Hi! What do you need?"),
    ("Good morning!", "Good morning! Ask away."),
]
SYSTEM = "You are a terse assistant. Answer in one line."
LONGEST = 240  # bytes a conversation may render to: one row of configs/chat_tiny.yaml (seq_len 256) holds it


def task(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(5)
    if kind == 0:
        a, b = rng.randrange(1, 50), rng.randrange(1, 50)
        return f"What is {a} + {b}?", f"{a} + {b} = {a + b}."
    word = rng.choice(WORDS)
    if kind == 1:
        return f"Reverse the word '{word}'.", word[::-1]
    if kind == 2:
        return f"Write '{word}' in capitals.", word.upper()
    if kind == 3:
        return f"How many letters are in '{word}'?", f"'{word}' has {len(word)} letters."
    return rng.choice(FACTS)


def conversation(rng: random.Random) -> dict:
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": SYSTEM})
    if rng.random() < 0.3:
        hi, hello = rng.choice(GREETINGS)
        messages += [{"role": "user", "content": hi}, {"role": "assistant", "content": hello}]
    for k in range(rng.choice([1, 1, 1, 2])):
        question, answer = task(rng)
        turn = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        if k and rendered_bytes(messages + turn) > LONGEST:
            break
        messages += turn
    return {"messages": messages}


def rendered_bytes(messages: list[dict]) -> int:
    """The bytes configs/chat_tiny.yaml's template renders them to: '<|role|>\n' content '<|end|>\n' each."""
    return sum(len(m["role"]) + 5 + len(m["content"].encode()) + 8 for m in messages)


def main() -> None:
    rng = random.Random(26)
    out = Path(__file__).with_name("chat_small.jsonl")
    lines = [json.dumps(conversation(rng)) for _ in range(400)]
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {len(lines)} conversations to {out}")


if __name__ == "__main__":
    main()

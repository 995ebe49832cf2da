"""Shared by the chat tests: the example template, tiny JSON Lines files, a data config for them, and the
expected tokens and loss mask of a conversation computed without moetrain's renderer (byte tokenizer)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml
from conftest import REPO

from moetrain.config.data import DataConfig

CHAT_CONFIG = REPO / "configs" / "chat_tiny.yaml"
CHAT_SMALL = REPO / "tests" / "data" / "chat_small.jsonl"
TEMPLATE = yaml.safe_load(CHAT_CONFIG.read_text())["data"]["chat_template"]  # configs/chat_tiny.yaml's


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def conversation(i: int, turns: int = 1) -> dict:
    messages = [{"role": "system", "content": f"sys {i}"}] if i % 3 == 0 else []
    for t in range(turns):
        messages += [
            {"role": "user", "content": f"question {i}.{t}?"},
            {"role": "assistant", "content": f"answer {i}.{t}"},
        ]
    return {"messages": messages}


def chat_cfg(paths, cache_dir, **fields) -> DataConfig:
    base = dict(
        paths=[str(p) for p in paths],
        format="chat",
        chat_template=TEMPLATE,
        seq_len=256,
        val_fraction=0.1,
        cache_dir=str(cache_dir),
        num_workers=0,
    )
    return DataConfig(**{**base, **fields})


def expected_tokens_and_mask(messages: list[dict], train_on: str = "all_assistant") -> tuple[np.ndarray, np.ndarray]:
    """The template of configs/chat_tiny.yaml written out by hand: '<|role|>\\n' (never a target), then the
    content and '<|end|>\\n' (targets in an assistant turn: every one, or the last)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    ids, mask = [], []
    for i, m in enumerate(messages):
        head = f"<|{m['role']}|>\n".encode()
        body = (m["content"] + "<|end|>\n").encode()
        counts = m["role"] == "assistant" and (train_on == "all_assistant" or i == last)
        ids += list(head) + list(body)
        mask += [0] * len(head) + [int(counts)] * len(body)
    return np.asarray(ids), np.asarray(mask, dtype=np.uint8)

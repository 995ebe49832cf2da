"""Chat and prompt-completion records -> tokens and a loss mask (``mask[j] = 1``: token j is a target).

- chat: the conversation rendered with the chat template (``chat_template.py``) and tokenized whole (as
  ``apply_chat_template(..., tokenize=True)`` does: no special tokens added, the template writes its
  own); a token is a target when its characters overlap an assistant span -- every assistant turn, or
  the last one (``data.train_on``). The same rule as transformers' ``return_assistant_tokens_mask``.
- prompt_completion: the prompt's tokens, then the completion's (each tokenized alone, so no token
  straddles the boundary), then the end-of-document token; the completion and that token are targets,
  so a model learns where a completion ends.

An encoder is described by a ``SampleEncoder`` (plain values, sent to spawned tokenizer workers) and
built once per process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from moetrain.data.chat_template import ChatTemplate
from moetrain.data.records import RecordSource, Where, checked_record
from moetrain.data.tokenizers import build_tokenizer, token_dtype
from moetrain.errors import UserError

# A chunk's samples: tokens (concatenated), mask (uint8, aligned with the tokens), tokens per sample.
EncodedSamples = tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclass(frozen=True)
class SampleEncoder:
    tokenizer: str  # data.tokenizer as a string (a trained BPE: its file)
    fmt: str  # "chat" or "prompt_completion"
    template: ChatTemplate | None  # chat only
    train_on: str  # "all_assistant" or "last_assistant"
    sources: tuple[RecordSource, ...]  # to name a record in a message

    def build(self) -> Callable[[list[dict], list[Where]], EncodedSamples]:
        """``encode(records, wheres)`` for this process (the tokenizer loaded once)."""
        tok = build_tokenizer(self.tokenizer)
        dtype = token_dtype(tok.vocab_size)

        def encode(records: list[dict], wheres: list[Where]) -> EncodedSamples:
            tokens, masks, lengths = [], [], []
            for record, where in zip(records, wheres):
                ids, mask = self.encode_one(tok, record, where)
                tokens.append(ids.astype(dtype))
                masks.append(mask)
                lengths.append(len(ids))
            if not tokens:
                return np.zeros(0, dtype), np.zeros(0, np.uint8), np.zeros(0, np.int64)
            return np.concatenate(tokens), np.concatenate(masks), np.asarray(lengths, dtype=np.int64)

        return encode

    def describe(self, where: Where) -> str:
        return self.sources[where.source].describe(where.row)

    def encode_one(self, tok, record: dict, where: Where) -> tuple[np.ndarray, np.ndarray]:
        """One record's tokens and uint8 mask; UserError naming the record when it is bad or has no target."""
        label = self.describe(where)
        rec = checked_record(record, self.fmt, label)
        if self.fmt == "prompt_completion":
            prompt, completion = tok.encode(rec["prompt"]), tok.encode(rec["completion"])
            ids = np.concatenate([prompt, completion, [tok.eos_id]]).astype(np.int64)
            mask = np.concatenate([np.zeros(len(prompt), np.uint8), np.ones(len(completion) + 1, np.uint8)])
            return ids, mask
        text, spans = self.template.assistant_spans(rec["messages"], label)
        if self.train_on == "last_assistant":
            spans = spans[-1:]
        ids, offsets_T2 = tok.encode_with_offsets(text)
        mask = span_mask(offsets_T2, spans)
        if not mask[1:].any():  # token 0 has nothing before it: never a target
            raise UserError(
                f"{label}: no assistant token to train on after rendering it with the chat template "
                f"({self.template.origin}): the assistant turns render to nothing, or the template's "
                "{% generation %} markers mark none; fix the record or the template"
            )
        return ids.astype(np.int64), mask


def span_mask(offsets_T2: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """1 for each token whose characters [start, end) overlap one of ``spans``."""
    mask_T = np.zeros(len(offsets_T2), dtype=bool)
    for start, end in spans:
        mask_T |= (offsets_T2[:, 0] < end) & (offsets_T2[:, 1] > start)
    return mask_T.astype(np.uint8)

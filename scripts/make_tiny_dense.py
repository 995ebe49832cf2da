"""A tiny dense Llama for the upcycling example (docs/finetuning.md), built offline.

    python scripts/make_tiny_dense.py runs/dense_tiny [--seed 0]

Writes a ``LlamaForCausalLM`` folder (``config.json``, ``model.safetensors``) made with transformers'
``LlamaConfig`` (d=64, 2 blocks, FFN width 128, 4 query heads sharing 2 key/value heads, 256 positions)
and its tokenizer: a byte-level BPE of 384 tokens trained here on tests/data/chat_small.jsonl with the
``tokenizers`` library, the chat roles and ``<|end|>`` as special tokens, and configs/chat_tiny.yaml's chat
template (``chat_template.jinja``), so ``data.format: chat`` needs no ``data.chat_template``. The weights
are transformers' own random init (``--seed``): the example fine-tunes from there.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

REPO = Path(__file__).resolve().parents[1]
CHAT = REPO / "tests" / "data" / "chat_small.jsonl"
SPECIAL = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
TEMPLATE = (
    "{%- for m in messages -%}\n"
    "{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}"
)
VOCAB = 384


def tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE of exactly ``VOCAB`` tokens trained on the chat example's text."""
    text = [m["content"] for line in CHAT.read_text().splitlines() for m in json.loads(line)["messages"]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(text, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>")  # fmt: skip
    fast.chat_template = TEMPLATE
    return fast


def dense_llama(vocab: int, seed: int) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the folder to write (new or empty)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    tok = tokenizer()
    dense_llama(len(tok), args.seed).save_pretrained(args.out)
    tok.save_pretrained(args.out)
    print(f"wrote {args.out}: LlamaForCausalLM, {len(tok)} tokens")


if __name__ == "__main__":
    main()

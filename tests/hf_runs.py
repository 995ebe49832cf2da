"""Hugging Face model folders as ``moetrain import`` reads them, built offline (tests/test_import*.py).

A folder holds a tiny random model of one family variant -- transformers' own classes (the variants of
tests/hf_tiny.py and tests/test_deepseek_v3.py), every weight redrawn -- written by ``save_pretrained`` in
one of the layouts models come in, and a real tokenizer: a byte-level BPE trained here with the
``tokenizers`` library to exactly the model's vocabulary, saved as a ``PreTrainedTokenizerFast``.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
import transformers
from hf_import import randomize
from hf_tiny import VARIANTS as TINY
from hf_tiny import hf_model
from test_deepseek_v3 import BASE as DEEPSEEK_BASE
from test_deepseek_v3 import VARIANTS as DEEPSEEK
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

VOCAB = 320  # 256 bytes, 3 special tokens and 61 merges
DEEPSEEK_EOS = "<｜end▁of▁sentence｜>"  # DeepSeek-V3's end-of-document token (moetrain.data.EOS_TOKENS)
WORDS = ("the quick brown fox jumps over a lazy dog while experts route tokens and gates weigh "
         "them naïve café façade über straße").split()  # fmt: skip
# variant -> how save_pretrained writes it: "files" (one safetensors file, one tensor per expert),
# "sharded" (several shards and model.safetensors.index.json), "fused" (transformers 5's fused experts,
# read by slice), "bf16" (bf16 weights)
LAYOUTS = {
    "mixtral": "bf16",
    "qwen2_moe-mlp_only": "sharded",
    "qwen3_moe-head_dim-renorm-mlp_only": "fused",
    "deepseek_v3-dense1-shared1-yarn": "sharded",
    "deepseek_v3-no-dense-no-interleave-tied": "fused",
}
VARIANTS = [*TINY, *(f"deepseek_v3-{v}" for v in DEEPSEEK)]


def corpus(words: int = 3000, seed: int = 0) -> str:
    """Text of the lexicon's words: sentences, some lines, a few non-ASCII letters."""
    rng = random.Random(seed)
    out = []
    for i in range(words):
        out.append(rng.choice(WORDS))
        out.append("\n" if i % 17 == 16 else (". " if i % 7 == 6 else " "))
    return "".join(out)


def bpe_tokenizer(vocab: int = VOCAB, eos: str = "</s>") -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE of exactly ``vocab`` tokens: <pad> 0, <s> 1, ``eos`` 2, the 256 bytes, merges."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<pad>", "<s>", eos],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([corpus(seed=1)], trainer)
    assert tok.get_vocab_size() == vocab
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token=eos, pad_token="<pad>")


def hf_variant(variant: str, seed: int = 0) -> transformers.PreTrainedModel:
    """The variant's model, fp32, vocabulary ``VOCAB``, token ids <pad> 0, <s> 1, end-of-document 2."""
    ids = {"vocab_size": VOCAB, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    if not variant.startswith("deepseek_v3-"):
        return hf_model(variant, seed, **ids)
    config = transformers.DeepseekV3Config(**{**DEEPSEEK_BASE, **DEEPSEEK[variant.removeprefix("deepseek_v3-")], **ids})
    model = transformers.DeepseekV3ForCausalLM(config).eval()
    randomize(model, seed)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


def hf_folder(variant: str, folder: Path, layout: str | None = None):
    """Save the variant with its tokenizer into ``folder`` (layout: :data:`LAYOUTS`, default "files").
    Returns (the fp32 model, the tokenizer)."""
    model, layout = hf_variant(variant), layout or LAYOUTS.get(variant, "files")
    tok = bpe_tokenizer(eos=DEEPSEEK_EOS if variant.startswith("deepseek_v3") else "</s>")
    if layout == "bf16":
        model.to(torch.bfloat16).save_pretrained(folder)
        # the reference: the saved bf16 weights in fp32 (the cast above also rounded the rotary buffers)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    else:
        shard = {"max_shard_size": "40KB"} if layout == "sharded" else {}
        model.save_pretrained(folder, save_original_format=layout != "fused", **shard)
    tok.save_pretrained(folder)
    return model, tok

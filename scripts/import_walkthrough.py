"""docs/import.md's walkthrough, on the CPU: for each family, a tiny random model built with transformers
from its own config class and saved with a tokenizer; ``moetrain import``; a few training steps under
``torchrun`` with 2 ranks and ``moe.expert_parallel_size=2``; ``moetrain eval``; ``moetrain export``;
the export loaded back with transformers (no remote code). Every command is printed before it runs.

    python scripts/import_walkthrough.py                       # all five families, into ./walkthrough
    python scripts/import_walkthrough.py --families qwen3_moe --dir /tmp/w

Needs transformers (``pip install -e ".[hf]"``); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import random
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

VOCAB = 512
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256, num_experts_per_tok=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
FAMILIES = {  # model_type: (config class, model class, the family's own fields)
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(intermediate_size=64, num_local_experts=4)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(intermediate_size=96, moe_intermediate_size=32,
                  shared_expert_intermediate_size=64, num_experts=4, mlp_only_layers=[0])),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(intermediate_size=96, moe_intermediate_size=32,
                  num_experts=4, head_dim=16, norm_topk_prob=True)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(intermediate_size=32, num_experts=4, clip_qkv=4.0)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(num_key_value_heads=4, intermediate_size=96,
                    moe_intermediate_size=32, n_routed_experts=4, n_shared_experts=1, n_group=2, topk_group=1,
                    first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
                    qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)),
}  # fmt: skip
WORDS = "the quick brown fox jumps over a lazy dog while experts route tokens and gates weigh them".split()


def text(words: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(WORDS) + ("\n" if i % 13 == 12 else " ") for i in range(words))


def tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE of ``VOCAB`` tokens trained here (<pad> 0, <s> 1, </s> 2)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)  # fmt: skip
    tok.train_from_iterator([text(20000, 0)], trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def run(*cmd: str) -> str:
    """Print and run ``moetrain CMD``; returns its output."""
    print(f"$ moetrain {shlex.join(cmd)}", flush=True)
    proc = subprocess.run([sys.executable, "-m", "moetrain.cli", *cmd], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(proc.stdout[-3000:] + proc.stderr[-3000:])
    lines = [line for line in proc.stdout.splitlines() if not line.startswith("[")]
    print("\n".join(f"  {line}" for line in lines[-4:]), flush=True)
    return proc.stdout


def walk(model_type: str, root: Path, steps: int) -> None:
    config_name, model_name, fields = FAMILIES[model_type]
    config = getattr(transformers, config_name)(**{**SHAPE, **fields})
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config)
    src, run_dir = root / model_type / "hf_model", root / model_type / "run"
    model.save_pretrained(src)  # 1. a Hugging Face folder: config.json, model.safetensors
    tokenizer().save_pretrained(src)  # ... and its tokenizer
    corpus = root / "corpus.txt"
    run("import", str(src), str(run_dir), f"train.steps={steps}", f"data.paths=[{corpus}]",  # 2.
        f"data.cache_dir={root / 'cache'}", "data.seq_len=64", "train.micro_batch_size=2", "train.eval_interval=0",
        "moe.expert_parallel_size=2", "moe.router.load_balance_coeff=0.01")  # fmt: skip
    run("launch", str(run_dir / "config.yaml"), "--procs-per-node", "2")  # 3. torchrun, 2 ranks: EP 2
    run("eval", str(run_dir), "--data", str(corpus), "--max-batches", "4")  # 4.
    run("export", str(run_dir), str(root / model_type / "exported"))  # 5. the family's own class
    back = transformers.AutoModelForCausalLM.from_pretrained(root / model_type / "exported")  # 6.
    print(f"  transformers loads {type(back).__name__} (no remote code)\n", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--dir", default="walkthrough", help="where everything goes (replaced)")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    root = Path(args.dir).resolve()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    (root / "corpus.txt").write_text(text(30000, 1))
    for model_type in args.families:
        walk(model_type, root, args.steps)


if __name__ == "__main__":
    main()

"""Peak memory of ``moetrain import`` on a model larger than 1 GB: it streams, one tensor at a time.

1. Write a synthetic Mixtral folder (bf16 safetensors shards with an index, random weights, written one
   tensor at a time) of ``--params`` parameters into a temporary folder;
2. run ``moetrain import SRC RUN data.tokenizer=byte`` in a child process (the byte tokenizer: the folder
   has none, and the tokenizer is not what is measured) and record its peak RSS (``VmHWM`` at exit);
3. run a child that imports the same modules and stops: the floor (interpreter, torch, moetrain);
4. write ``bench/results/import_memory.json``: source and checkpoint sizes, both peaks, the largest single
   tensor, the wall time.

The claim checked: peak RSS minus the floor is of the order of the largest tensor the import converts (a
few times its fp32 size: the bf16 source, its fp32 copy), far below one copy of the model.

    python bench/import_memory.py                 # ~1.3 GB of bf16 weights (630 M parameters)
    python bench/import_memory.py --layers 1      # smaller and quicker, for a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from moetrain.checkpoint.streaming import SafetensorsWriter, TensorSpec

HERE = Path(__file__).resolve().parent


def mixtral_config(args) -> dict:
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": args.vocab,
        "hidden_size": args.hidden,
        "intermediate_size": args.ffn,
        "num_hidden_layers": args.layers,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "num_local_experts": args.experts,
        "num_experts_per_tok": 2,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e6,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
    }


def tensor_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Mixtral checkpoint in the Hub's layout (one tensor per expert)."""
    D, F, V, kv = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_key_value_heads"]
    A = D // c["num_attention_heads"]
    out = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,), "lm_head.weight": (V, D)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,)})
        out.update({p + "self_attn.q_proj.weight": (D, D), p + "self_attn.k_proj.weight": (kv * A, D),
                    p + "self_attn.v_proj.weight": (kv * A, D), p + "self_attn.o_proj.weight": (D, D)})  # fmt: skip
        out[p + "block_sparse_moe.gate.weight"] = (c["num_local_experts"], D)
        for e in range(c["num_local_experts"]):
            q = f"{p}block_sparse_moe.experts.{e}."
            out.update({q + "w1.weight": (F, D), q + "w3.weight": (F, D), q + "w2.weight": (D, F)})
    return out


def write_source(folder: Path, config: dict, shard_bytes: int) -> int:
    """The folder, shard by shard, one random bf16 tensor at a time; returns the weights' bytes."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensor_shapes(config).items():
        n = torch.Size(shape).numel() * 2
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        specs = [TensorSpec(name, torch.bfloat16, shape) for name, shape in names]
        with SafetensorsWriter(folder / file, specs, metadata={"format": "pt"}) as out:
            for name, shape in names:
                out.write(name, (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16))
        weight_map.update(dict.fromkeys((n for n, _ in names), file))
        total += sum(s.nbytes for s in specs)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return total


CHILD = """
import json, sys, time
start = time.perf_counter()
import torch, moetrain.cli, moetrain.hf.import_run  # the floor: what every import loads
code = moetrain.cli.main(sys.argv[2:]) if sys.argv[2:] else 0
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
kb = lambda key: int(status[key].split()[0])
json.dump({"code": code, "vm_hwm_mb": kb("VmHWM") / 1024, "wall_s": time.perf_counter() - start}, open(sys.argv[1], "w"))
"""


def child(result: Path, *args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", CHILD, str(result), *args], check=True, env=env)
    return json.loads(result.read_text())


def folder_bytes(folder: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in folder.rglob(pattern) if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--shard-mb", type=int, default=300)
    parser.add_argument("--workdir", default=None, help="where the source and the run go (default: a temp folder)")
    parser.add_argument("--out", default=str(HERE / "results" / "import_memory.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="import_memory-", dir=args.workdir))
    try:
        config = mixtral_config(args)
        src, run = work / "src", work / "run"
        t0 = time.perf_counter()
        source_bytes = write_source(src, config, args.shard_mb * 10**6)
        print(f"wrote {src}: {source_bytes / 1e9:.2f} GB of bf16 weights in {time.perf_counter() - t0:.0f} s")
        floor = child(work / "floor.json")
        imported = child(work / "import.json", "import", str(src), str(run), "data.tokenizer=byte")
        assert imported["code"] == 0
        ckpt = run / "checkpoints" / "step_000000"
        largest = max(torch.Size(s).numel() for s in tensor_shapes(config).values())
        result = {
            "params": sum(torch.Size(s).numel() for s in tensor_shapes(config).values()),
            "config": {
                k: config[k]
                for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_local_experts", "vocab_size")
            },  # fmt: skip
            "source_bytes": source_bytes,
            "source_shards": len(list(src.glob("*.safetensors"))),
            "checkpoint_bytes": folder_bytes(ckpt, "*.safetensors"),
            "largest_tensor_fp32_bytes": largest * 4,
            "peak_rss_import_mb": imported["vm_hwm_mb"],
            "peak_rss_floor_mb": floor["vm_hwm_mb"],
            "import_wall_s": imported["wall_s"],
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "cpu": next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), "?"),
            "torch": torch.__version__,
            "load_average": os.getloadavg(),
        }
        above = result["peak_rss_import_mb"] - result["peak_rss_floor_mb"]
        print(
            f"import: peak RSS {result['peak_rss_import_mb']:.0f} MB (floor {result['peak_rss_floor_mb']:.0f} MB, "
            f"+{above:.0f} MB) for a {source_bytes / 1e9:.2f} GB source -> {result['checkpoint_bytes'] / 1e9:.2f} GB "
            f"fp32 checkpoint; largest tensor {largest * 4 / 1e6:.0f} MB in fp32; {result['import_wall_s']:.0f} s"
        )
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

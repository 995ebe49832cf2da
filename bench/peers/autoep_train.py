"""The AutoEP side of bench/peers/autoep_e2e.py: moetrain's Llama/Mixtral model as a Hugging Face
``MixtralForCausalLM``, trained by DeepSpeed with AutoEP (``expert_parallel`` in its config).

Shape suffixes: the legend in ``moetrain/moe/__init__.py`` (B micro-batch, S sequence length).

    python bench/peers/autoep_train.py configs/llama_tiny.yaml KEY=VALUE ... --result out.json
    python -m torch.distributed.run --standalone --nproc-per-node=2 bench/peers/autoep_train.py \\
        configs/llama_tiny.yaml KEY=VALUE ... moe.expert_parallel_size=2 --result out.json

It reads the moetrain job config (with the moetrain run's overrides), so both sides train one model on
one stream of batches:

- the weights: moetrain's model built from the seed as its trainer builds it, exported with
  moetrain's own Mixtral export (``moetrain.export.mixtral``) into a folder that
  ``MixtralForCausalLM.from_pretrained`` loads; the parameter counts are asserted equal;
- the data: moetrain's token store and :class:`moetrain.data.TrainStream` (seed, micro-batch, rank);
- the loss: cross-entropy of the logits against moetrain's next-token targets (moetrain's LM loss), no
  router loss (the moetrain side runs with ``moe.router.load_balance_coeff=0``; Mixtral's is off unless
  ``output_router_logits``, and AutoEP adds none);
- the loop: ``deepspeed.initialize`` with ``expert_parallel: {enabled, autoep_size, preset_model:
  mixtral}``, AdamW with moetrain's groups and schedule, the job's ZeRO stage and precision and
  DeepSpeed's gradient clipping at ``optim.grad_clip``. The optimizer and schedule are handed over
  as callables: AutoEP replaces the MoE blocks inside ``deepspeed.initialize``, so the parameter
  groups are remapped there and then split into DeepSpeed's MoE groups, which ZeRO-1/2 require;
- ``--retain-host-memory``: the allocator setting moetrain's trainer applies (``train.retain_host_memory``);
  the oneDNN kernel-cache bound (``train.cpu_kernel_cache``) is applied as moetrain's trainer does.

Work-arounds for DeepSpeed 0.19.8 with transformers 5.x on the CPU, all here and none in moetrain:

- ``DS_ACCELERATOR=cpu`` before DeepSpeed is imported (no accelerator probe);
- the model is created in fp32 with ``attn_implementation="sdpa"`` and ``output_router_logits`` off;
- AutoEP re-installs transformers' output-capture hooks and reads the registry as a dict of strings,
  ``registry.get(key, default)``; transformers 5.24's ``_CanRecordRegistry.get(model)`` takes a model
  and no default (``TypeError: _CanRecordRegistry.get() takes 2 positional arguments but 3 were
  given`` in ``deepspeed.initialize``). :func:`patch_output_capture_registry` gives string keys the
  plain dict behaviour for the length of this process.

Rank 0 writes ``--result``: per-step wall time (data + forward + backward + step), global tokens and
the LM loss (mean over ranks), and both parameter counts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
if not torch.cuda.is_available():  # before deepspeed is imported: its CPU accelerator, without probing
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from bench.e2e_baseline import init_distributed  # noqa: E402
from moetrain.config import load_config  # noqa: E402
from moetrain.config.job import JobConfig  # noqa: E402


def hf_model(cfg: JobConfig, vocab_size: int):
    """moetrain's initial model (the trainer's seed draw) exported to a ``MixtralForCausalLM``."""
    from safetensors.torch import save_file
    from transformers import MixtralForCausalLM

    from moetrain.export import mixtral
    from moetrain.export.family import family_config, family_tensors
    from moetrain.hf.families import family_for
    from moetrain.model import MoETransformer

    m = cfg.model.model_copy(update={"vocab_size": cfg.model.vocab_size or vocab_size})
    why = mixtral.mismatches(m, cfg.moe)
    if why:
        raise SystemExit("autoep_train needs a Mixtral-shaped moetrain model: " + "; ".join(why))
    torch.manual_seed(cfg.seed)
    ref = MoETransformer(m, cfg.moe)
    with tempfile.TemporaryDirectory(prefix="autoep_hf_") as folder:
        # `moetrain export --target mixtral`'s two steps, on the initial model instead of a checkpoint (a run
        # folder with no import record: the config is grown from the token ids alone, as for a model trained here)
        loaded = SimpleNamespace(
            cfg=cfg.model_copy(update={"model": m}), model=ref, run_dir=Path(folder), folder=Path(folder)
        )
        family = family_for("mixtral")
        config = family_config(family, loaded, {"bos_token_id": 0, "eos_token_id": 0})
        (Path(folder) / "config.json").write_text(json.dumps(config))
        save_file(family_tensors(family, loaded, config), str(Path(folder) / "model.safetensors"))
        model = MixtralForCausalLM.from_pretrained(folder, torch_dtype=torch.float32, attn_implementation="sdpa")
    model.config.output_router_logits = False
    n_ref = sum(p.numel() for p in ref.parameters())
    n_hf = sum(p.numel() for p in model.parameters())
    return model, n_hf, n_ref


def patch_output_capture_registry() -> None:
    """The DeepSpeed 0.19.8 / transformers 5.24 work-around of the module docstring."""
    from transformers.utils import output_capturing

    registry_class = output_capturing._CanRecordRegistry
    by_model = registry_class.get

    def get(self, key, *default):
        if isinstance(key, str):  # DeepSpeed's use: a class-name key and a default
            return dict.get(self, key, *default)
        return by_model(self, key)

    registry_class.get = get


def optimizer_groups(model, weight_decay: float) -> list[dict]:
    """moetrain's rule: no decay on norms and other 1-D parameters."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def train(cfg: JobConfig, rank: int, world: int) -> dict:
    import deepspeed

    from moetrain import data
    from moetrain.training.optim import lr_lambda

    prepared = data.wait_for_data(cfg.data)
    blocks = data.PackedBlocks(prepared.stores[0].tokens("train"), cfg.data.seq_len)
    stream = data.TrainStream(blocks, cfg.seed, cfg.train.micro_batch_size, 1, rank, world)
    model, n_hf, n_mt = hf_model(cfg, prepared.vocab_size)
    assert n_hf == n_mt, f"parameter counts differ: Hugging Face {n_hf}, moetrain {n_mt}"
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    o = cfg.optim

    def optimizer(groups):
        # called by deepspeed.initialize after AutoEP replaced the MoE blocks (the groups are remapped
        # to the new expert parameters); ZeRO-1/2 need the experts in groups marked "moe"
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
        return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps)

    def schedule(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(o, cfg.train.steps))

    zero_stage = cfg.deepspeed.get("zero_optimization", {}).get("stage", 0)
    ds_config = {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": o.grad_clip,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": cfg.train.precision == "bf16"},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,
        "expert_parallel": {"enabled": True, "autoep_size": cfg.moe.expert_parallel_size, "preset_model": "mixtral"},
    }
    patch_output_capture_registry()
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=optimizer_groups(model, o.weight_decay),
        optimizer=optimizer,
        lr_scheduler=schedule,
        config=ds_config,
    )
    tokens = stream.global_batch * cfg.data.seq_len
    times, losses = [], []
    cpu = []
    for step in range(cfg.train.steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        x_BS, y_BS, segments_BS = stream.batch(step, 0)
        assert segments_BS is None, "one sample per row: the Hugging Face side has no document masking here"
        logits_BSV = engine(input_ids=x_BS.to(engine.device)).logits
        loss = F.cross_entropy(logits_BSV.float().view(-1, logits_BSV.shape[-1]), y_BS.to(engine.device).view(-1))
        engine.backward(loss)
        engine.step()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        losses.append(loss.detach().float())
    losses_T = torch.stack(losses)
    dist.all_reduce(losses_T)  # once at the end, outside the timed steps (as moetrain's logging)
    return {
        "steps": [
            {"step": i + 1, "loss": float(v) / world, "tokens": tokens, "time_s": t, "cpu_s": c}
            for i, (v, t, c) in enumerate(zip(losses_T, times, cpu))
        ],  # fmt: skip
        "params_autoep": n_hf,
        "params_moetrain": n_mt,
        "threads": torch.get_num_threads(),
        "device": str(engine.device),
        "world_size": world,
        "ep_size": cfg.moe.expert_parallel_size,
        "zero_stage": zero_stage,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", help="the moetrain job config (YAML)")
    parser.add_argument("overrides", nargs="*", help="key.path=value, as for `moetrain train`")
    parser.add_argument("--result", required=True, help="JSON written by rank 0")
    parser.add_argument("--retain-host-memory", action="store_true", help="moetrain's train.retain_host_memory")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    from moetrain.training.host_memory import bound_kernel_caches, retain_freed_memory

    if args.retain_host_memory:
        retain_freed_memory()
    if cfg.train.cpu_kernel_cache is not None and not torch.cuda.is_available():
        bound_kernel_caches(cfg.train.cpu_kernel_cache)  # as moetrain's trainer does (oneDNN's bf16 caches)
    rank, world = init_distributed()
    from moetrain.training.engine import quiet_deepspeed

    quiet_deepspeed()
    result = train(cfg, rank, world)
    result["retain_host_memory"] = args.retain_host_memory
    if rank == 0:
        print(f"params: autoep {result['params_autoep']}, moetrain {result['params_moetrain']}", flush=True)
        Path(args.result).write_text(json.dumps(result) + "\n")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""The training loop: build the model, parallelize it, ``deepspeed.initialize``, a lean loop + callbacks."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from moetrain import data
from moetrain.config.job import JobConfig
from moetrain.config.loading import dump_config
from moetrain.errors import UserError
from moetrain.logging import NullLogger, RunLogger
from moetrain.model import MoETransformer
from moetrain.parallel.deepspeed_moe import register_expert_parallel
from moetrain.parallel.grad_norm import clip_grad_norm
from moetrain.parallel.layout import ParallelLayout, barrier
from moetrain.parallel.parallelize import parallelize
from moetrain.training import checkpoint, engine, faults
from moetrain.training.callbacks import (
    Callback,
    CheckpointCallback,
    EvalCallback,
    MetricsCallback,
    StepResult,
    all_reduce_mean,
)
from moetrain.training.determinism import apply_determinism
from moetrain.training.optim import isolate_distilled_params, lr_lambda, param_groups
from moetrain.training.routing import routing_callbacks


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    tokens: int = 0


class Trainer:
    def __init__(self, cfg: JobConfig, layout: ParallelLayout, extra_callbacks: list[Callback] | None = None) -> None:
        self.cfg = cfg
        self.layout = layout
        self.run_dir: Path = cfg.resolved_run_dir
        self.state = TrainState()
        self.logger = NullLogger()
        self.callbacks: list[Callback] = [
            MetricsCallback(cfg.logging.interval),
            EvalCallback(cfg.train.eval_interval),
            *routing_callbacks(cfg),  # StableMoE stage switch, routing-fluctuation probe, ...
            *(extra_callbacks or []),
            CheckpointCallback(cfg.checkpoint.interval, cfg.checkpoint.save_at_end),
        ]

    @property
    def last_step(self) -> int:
        stop = self.cfg.train.stop_at_step
        return min(self.cfg.train.steps, stop) if stop else self.cfg.train.steps

    # --- setup ---------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Validate everything that can fail on user input before anything is written to the run dir."""
        cfg, layout = self.cfg, self.layout
        apply_determinism(cfg.train.deterministic)
        resume_from = checkpoint.find_resume(self.run_dir, cfg.checkpoint.resume, log=self._say)
        data.check_data_reachable(cfg.data)
        cache = data.prepare_tokens(cfg.data, build=layout.rank == 0) if layout.rank == 0 else None
        barrier()
        cache = cache or data.prepare_tokens(cfg.data, build=False)
        self._build_data(cache)
        vocab = cfg.model.vocab_size or cache.vocab_size
        if vocab < cache.vocab_size:
            raise UserError(
                f"model.vocab_size ({vocab}) is smaller than the tokenizer's vocabulary ({cache.vocab_size})"
            )
        self.model_cfg = cfg.model.model_copy(update={"vocab_size": vocab})
        torch.manual_seed(cfg.seed)
        self.model = parallelize(MoETransformer(self.model_cfg, cfg.moe), layout)
        register_expert_parallel(self.model, layout)
        groups = param_groups(self.model, cfg.optim.weight_decay, layout.ep_size)
        groups = isolate_distilled_params(self.model, groups)  # StableMoE: frozen at the switch
        optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim, cfg.train.steps))
        ds_config = engine.build_ds_config(cfg, layout.world_size)
        self.engine = engine.initialize_engine(self.model, optimizer, schedule, ds_config)
        self.own_clipping = engine.moetrain_clips(ds_config)
        self._grad_norm = None
        self.data_fingerprint = cache.fingerprint
        if resume_from is not None:
            saved = checkpoint.load(self.engine, self.model, resume_from, layout)
            self.state = TrainState(saved["step"], saved["tokens"])
            self._say(f"resumed from {resume_from} at step {self.state.step}")
        if layout.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            resolved = cfg.model_copy(update={"model": self.model_cfg})
            (self.run_dir / "config.yaml").write_text(dump_config(resolved))
            self.logger = RunLogger(
                cfg.logging, self.run_dir, self.last_step, self.state.step, resolved.model_dump(mode="json")
            )

    def _build_data(self, cache: data.TokenCache) -> None:
        cfg, layout = self.cfg, self.layout
        self.train_blocks = data.PackedBlocks(cache.tokens("train"), cfg.data.seq_len)
        self.val_blocks = data.PackedBlocks(cache.tokens("val"), cfg.data.seq_len)
        self.stream = data.TrainStream(
            self.train_blocks,
            cfg.seed,
            cfg.train.micro_batch_size,
            cfg.train.grad_accum_steps,
            layout.rank,
            layout.world_size,
        )

    # --- loop ----------------------------------------------------------------------------------------

    def train(self) -> TrainState:
        cfg, engine = self.cfg, self.engine
        device = engine.device
        tokens_per_step = self.stream.global_batch * cfg.data.seq_len
        for cb in self.callbacks:
            cb.on_train_start(self)
        for step in range(self.state.step, self.last_step):
            for cb in self.callbacks:
                cb.on_step_start(self, step)
            faults.hang_if("hang", step + 1, self.layout.rank)
            lm_sum = aux_sum = torch.zeros((), device=device)
            stats = []
            for micro in range(cfg.train.grad_accum_steps):
                x, y = self.stream.batch(step, micro)
                out = engine(x.to(device), y.to(device))
                engine.backward(out.loss)
                if self.own_clipping and micro == cfg.train.grad_accum_steps - 1:
                    self._grad_norm = clip_grad_norm(self.model, cfg.optim.grad_clip, self.layout.ep_group)
                engine.step()
                lm_sum = lm_sum + out.lm_loss.detach()
                aux_sum = aux_sum + out.aux_loss.detach()
                stats.append(out.moe_stats)
            self.state.step = step + 1
            self.state.tokens += tokens_per_step
            ga = cfg.train.grad_accum_steps
            result = StepResult(step + 1, lm_sum / ga, aux_sum / ga, stats, tokens_per_step)
            for cb in self.callbacks:
                cb.on_step_end(self, result)
        for cb in self.callbacks:
            cb.on_train_end(self)
        self.logger.close()
        return self.state

    # --- helpers used by callbacks -------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> float:
        engine, cfg = self.engine, self.cfg
        engine.eval()
        total = torch.zeros((), device=engine.device)
        batches = data.val_batches(
            self.val_blocks,
            cfg.train.micro_batch_size,
            cfg.train.eval_batches,
            self.layout.rank,
            self.layout.world_size,
        )
        for x, y in batches:
            total += engine(x.to(engine.device), y.to(engine.device)).lm_loss.float()
        engine.train()
        return all_reduce_mean(total / cfg.train.eval_batches).item()

    def current_lr(self) -> float:
        return self.engine.get_lr()[0]

    def grad_norm(self) -> float:
        norm = self._grad_norm if self.own_clipping else self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def run_state(self) -> dict:
        return {
            "step": self.state.step,
            "tokens": self.state.tokens,
            "world_size": self.layout.world_size,
            "expert_parallel_size": self.layout.ep_size,
            "data_fingerprint": self.data_fingerprint,
            "saved_at": time.time(),
            "config": dump_config(self.cfg),
        }

    def _say(self, text: str) -> None:
        if self.layout.rank == 0:
            print(text, flush=True)

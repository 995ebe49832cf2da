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
from moetrain.parallel.layout import ParallelLayout
from moetrain.parallel.parallelize import parallelize
from moetrain.training import checkpoint, engine, faults, offload, state_io
from moetrain.training.balancing import balancing_callbacks
from moetrain.training.callbacks import (
    Callback,
    CheckpointCallback,
    EvalCallback,
    MetricsCallback,
    StepResult,
    all_reduce_mean,
)
from moetrain.training.determinism import apply_determinism
from moetrain.training.host_memory import bound_kernel_caches, retain_freed_memory
from moetrain.training.nonfinite import NonFiniteGuard
from moetrain.training.optim import isolate_distilled_params, lr_lambda, param_groups
from moetrain.training.resume_checks import check_resume
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
        self.finished = False  # a rerun of a run that already reached its last step
        self.guard = NonFiniteGuard(cfg.train.nonfinite, cfg.train.nonfinite_max_skips)
        self.callbacks: list[Callback] = [
            MetricsCallback(cfg.logging.interval),
            EvalCallback(cfg.train.eval_interval),
            *balancing_callbacks(cfg),  # aux-loss-free bias updates: first, after the optimizer step
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
        """Validate everything that can fail on user input before anything is written to the run dir.

        1. choose the checkpoint to resume (rank 0 verifies, all ranks agree); a finished run stops here;
        2. data; the saved job must match this one (resume_checks); 3. model, parallelized; 4. engine;
        5. load the checkpoint; 6. only then write to the run dir.
        """
        cfg, layout = self.cfg, self.layout
        apply_determinism(cfg.train.deterministic)
        if not torch.cuda.is_available():  # CPU training
            if cfg.train.retain_host_memory:
                retain_freed_memory()
            if cfg.train.cpu_kernel_cache is not None:
                bound_kernel_caches(cfg.train.cpu_kernel_cache)
        choice = checkpoint.choose_resume(self.run_dir, cfg.checkpoint.resume, layout)  # 1.
        for note in choice.notes:
            self._say(note)
        saved = checkpoint.read_state(choice.folder) if choice.folder is not None else None
        if saved is not None and saved["step"] >= self.last_step:
            self.finished = True
            self._say(
                f"nothing to do: {choice.folder} is at step {saved['step']} and this run ends at step "
                f"{self.last_step} (raise train.steps to continue); nothing was changed"
            )
            faults.kill_if("kill_after_finish_check", saved["step"], layout.rank)
            return
        data.check_data_reachable(cfg.data)  # 2. rank 0 opens (or prepares) the store; the others wait for it
        cache = data.prepare_data(cfg.data, log=self._say) if layout.rank == 0 else data.wait_for_data(cfg.data)
        self._build_data(cache)
        vocab = cfg.model.vocab_size or cache.vocab_size
        if vocab < cache.vocab_size:
            raise UserError(
                f"model.vocab_size ({vocab}) is smaller than the tokenizer's vocabulary ({cache.vocab_size})"
            )
        self.model_cfg = cfg.model.model_copy(update={"vocab_size": vocab})
        self.resolved = cfg.model_copy(update={"model": self.model_cfg})
        if saved is not None:
            self._check_resume(choice.folder, saved, cache.fingerprint)
        torch.manual_seed(cfg.seed)  # 3.
        model = MoETransformer(self.model_cfg, cfg.moe, cfg.train.activation_checkpointing)
        moe, recompute = cfg.moe, cfg.train.activation_checkpointing
        if moe is not None and moe.ep_overlap and moe.expert_parallel_size > 1 and recompute != "none":
            self._say(
                f"moe.ep_overlap is off under train.activation_checkpointing={recompute}: recomputed layers exchange in sequence"
            )
        if cfg.train.compile:
            model.compile_dense()
        self.model = parallelize(model, layout)
        register_expert_parallel(self.model, layout)
        groups = param_groups(self.model, cfg.optim.weight_decay, layout.ep_size)
        groups = isolate_distilled_params(self.model, groups)  # StableMoE: frozen at the switch
        optimizer = offload.build_optimizer(groups, cfg.optim, offload.offloads(cfg))  # CPU Adam when offloading
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim, cfg.train.steps))
        ds_config = engine.build_ds_config(cfg, layout.world_size)
        self.engine = engine.initialize_engine(self.model, optimizer, schedule, ds_config, layout.world_size)  # 4.
        state_io.check_supported(self.model, self.engine.optimizer)
        self.own_clipping = engine.moetrain_clips(ds_config)
        self._grad_norm = None
        self.data_fingerprint = cache.fingerprint
        if saved is not None:  # 5.
            for note in checkpoint.load(self.engine, self.model, choice.folder, layout, saved):
                self._say(note)
            self.state = TrainState(saved["step"], saved["tokens"])
            self._say(f"resumed from {choice.folder} at step {self.state.step}")
        if layout.rank == 0:  # 6.
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if saved is not None:
                for name in checkpoint.set_aside_newer(self.run_dir, self.state.step):
                    self._say(f"set aside unverified checkpoint {name} (newer than the one resumed)")
            elif cfg.checkpoint.resume == "none" and (moved := checkpoint.set_aside_history(self.run_dir)):
                self._say(f"fresh run (checkpoint.resume=none): the earlier run's files are in {moved}")
            (self.run_dir / "config.yaml").write_text(dump_config(self.resolved))
            self.logger = RunLogger(
                cfg.logging, self.run_dir, self.last_step, self.state.step, self.resolved.model_dump(mode="json")
            )

    def _check_resume(self, folder: Path, saved: dict, fingerprint: str) -> None:
        """Refuse a checkpoint of another job (exit 2, every difference listed); report allowed changes."""
        allowed = check_resume(folder, saved, self.resolved, self.layout.world_size)
        if saved.get("data_fingerprint") != fingerprint:
            raise UserError(
                f"checkpoint.resume: {folder} was trained on other data (fingerprint {saved.get('data_fingerprint')}, "
                f"now {fingerprint}): data.paths, its files, the tokenizer or the split changed; restore them or "
                "start a new run"
            )
        for line in allowed:
            self._say(f"resuming with a changed setting: {line}")

    def _build_data(self, prepared: data.PreparedData) -> None:
        cfg, layout = self.cfg, self.layout
        S = cfg.data.seq_len
        train = [data.PackedBlocks(store.tokens("train"), S) for store in prepared.stores]
        self.val_sources = [(src.name, src.weight) for src in prepared.sources]
        self.val_sets = [data.PackedBlocks(store.tokens("val"), S) for store in prepared.stores]
        self.val_blocks = self.val_sets[0]  # the first source's: the routing probes' tokens
        self.stream = data.TrainStream(
            train if len(train) > 1 else train[0],
            cfg.seed,
            cfg.train.micro_batch_size,
            cfg.train.grad_accum_steps,
            layout.rank,
            layout.world_size,
            weights=[src.weight for src in prepared.sources],
        )

    # --- loop ----------------------------------------------------------------------------------------

    def train(self) -> TrainState:
        if self.finished:
            return self.state
        cfg, engine = self.cfg, self.engine
        device = engine.device
        tokens_per_step = self.stream.global_batch * cfg.data.seq_len
        for cb in self.callbacks:
            cb.on_train_start(self)
        for step in range(self.state.step, self.last_step):
            for cb in self.callbacks:
                cb.on_step_start(self, step)
            faults.hang_if("hang", step + 1, self.layout.rank)
            lm_sum = aux_sum = loss_sum = torch.zeros((), device=device)
            stats, skip = [], False
            for micro in range(cfg.train.grad_accum_steps):
                x, y = self.stream.batch(step, micro)
                out = engine(x.to(device), y.to(device))
                loss = out.loss * float("nan") if faults.active("nan_loss", step + 1, self.layout.rank) else out.loss
                engine.backward(loss)
                lm_sum = lm_sum + out.lm_loss.detach()
                aux_sum = aux_sum + out.aux_loss.detach()
                loss_sum = loss_sum + loss.detach()
                stats.append(out.moe_stats)
                del out, loss  # the logits (T x V) must not stay alive through the step and the next forward
                if micro == cfg.train.grad_accum_steps - 1:  # before the update: the non-finite policy
                    if self.own_clipping:
                        self._grad_norm = clip_grad_norm(self.model, cfg.optim.grad_clip, self.layout.ep_group)
                    skip = self.guard.check(step + 1, loss_sum, self._grad_norm if self.own_clipping else None)
                    if skip and self.own_clipping:
                        self.guard.skip_update(engine, self.model)
                engine.step()
            skip = self.guard.after_step(engine, step + 1, self.own_clipping, skip)
            self.state.step = step + 1
            self.state.tokens += tokens_per_step
            ga = cfg.train.grad_accum_steps
            result = StepResult(step + 1, lm_sum / ga, aux_sum / ga, stats, tokens_per_step, skip)
            for cb in self.callbacks:
                cb.on_step_end(self, result)
        for cb in self.callbacks:
            cb.on_train_end(self)
        self.logger.close()
        return self.state

    # --- helpers used by callbacks -------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """``{"val_loss": ...}``; a mixture also ``val_loss/<source>`` for each source (``train.eval_batches``
        batches of each), and ``val_loss`` is their mean weighted by the mixture's weights."""
        engine, cfg = self.engine, self.cfg
        engine.eval()
        losses = []
        for blocks in self.val_sets:
            total = torch.zeros((), device=engine.device)
            batches = data.val_batches(
                blocks, cfg.train.micro_batch_size, cfg.train.eval_batches, self.layout.rank, self.layout.world_size
            )
            for x, y in batches:
                total += engine(x.to(engine.device), y.to(engine.device)).lm_loss.float()
            losses.append(total / cfg.train.eval_batches)
        engine.train()
        per_source = all_reduce_mean(torch.stack(losses)).tolist()
        if len(per_source) == 1:
            return {"val_loss": per_source[0]}
        out = {"val_loss": sum(w * loss for (_, w), loss in zip(self.val_sources, per_source))}
        out.update({f"val_loss/{name}": loss for (name, _), loss in zip(self.val_sources, per_source)})
        return out

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
            "config": self.resolved.model_dump(mode="json"),
        }

    def _say(self, text: str) -> None:
        if self.layout.rank == 0:
            print(text, flush=True)

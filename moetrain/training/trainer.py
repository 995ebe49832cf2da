"""The training loop: build the model, parallelize it, ``deepspeed.initialize``, a lean loop + callbacks."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from moetrain import data
from moetrain.checkpoint.initial import is_weights_only
from moetrain.config.job import JobConfig
from moetrain.config.loading import dump_config
from moetrain.errors import UserError
from moetrain.model import MoETransformer
from moetrain.moe.hooks import collect_hooks
from moetrain.parallel.collectives import mean_over_ranks
from moetrain.parallel.deepspeed_moe import register_expert_parallel
from moetrain.parallel.grad_norm import clip_grad_norm
from moetrain.parallel.layout import ParallelLayout
from moetrain.parallel.parallelize import parallelize
from moetrain.run_logging import NullLogger, RunLogger
from moetrain.training import checkpoint, engine, masked_loss, offload, state_io
from moetrain.training.batches import to_device
from moetrain.training.callbacks import (
    Callback,
    CheckpointCallback,
    EvalCallback,
    MetricsCallback,
    StepResult,
)
from moetrain.training.determinism import apply_determinism
from moetrain.training.held_bytes import HeldBytesReport
from moetrain.training.host_memory import bound_kernel_caches, retain_freed_memory
from moetrain.training.moe_hooks import MoEHooksCallback
from moetrain.training.nonfinite import NonFiniteGuard
from moetrain.training.optim import isolate_tagged_params, lr_lambda, param_groups
from moetrain.training.resume_checks import check_initial, check_resume
from moetrain.training.run_dir import check_run_dir_shared
from moetrain.training.unfused_bf16 import wrapper_name


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    tokens: int = 0


class Trainer:
    """The generic loop. What routing needs between steps comes from the model's declared hooks
    (:mod:`moetrain.moe.hooks`); ``extra_callbacks`` are the caller's (``moetrain.cli.main``'s)."""

    def __init__(self, cfg: JobConfig, layout: ParallelLayout, extra_callbacks: list[Callback] | None = None) -> None:
        self.cfg = cfg
        self.layout = layout
        self.run_dir: Path = cfg.resolved_run_dir
        self.state = TrainState()
        self.logger = NullLogger()
        self.finished = False  # a rerun of a run that already reached its last step
        self.guard = NonFiniteGuard(cfg.train.nonfinite, cfg.train.nonfinite_max_skips)
        self.extra_callbacks = list(extra_callbacks or [])
        self.callbacks: list[Callback] = []  # built in setup, once the model (and its hooks) exist

    @property
    def last_step(self) -> int:
        stop = self.cfg.train.stop_at_step
        return min(self.cfg.train.steps, stop) if stop else self.cfg.train.steps

    # --- setup ---------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Validate everything that can fail on user input before anything is written to the run dir.

        1. choose the checkpoint to resume (rank 0 verifies, all ranks agree); a finished run stops here;
        2. data; the saved job must match this one (resume_checks); 3. model, parallelized, and the
        callbacks (the model's hooks among them); 4. engine; 5. load the checkpoint; 6. only then write
        to the run dir.
        """
        cfg, layout = self.cfg, self.layout
        self._apply_process_settings()
        check_run_dir_shared(self.run_dir, layout.rank, layout.world_size)  # every rank sees rank 0's folder
        choice = checkpoint.choose_resume(self.run_dir, cfg.checkpoint.resume, layout)  # 1.
        for note in choice.notes:
            self._say(note)
        saved = checkpoint.read_state(choice.folder) if choice.folder is not None else None
        if saved is not None and saved["step"] >= self.last_step:
            self.finished = True
            self.state = TrainState(saved["step"], saved["tokens"])
            self._say(
                f"nothing to do: {choice.folder} is at step {saved['step']} and this run ends at step "
                f"{self.last_step} (raise train.steps to continue); nothing was changed"
            )
            self.callbacks = self.extra_callbacks
            return
        cache = self._setup_data()  # 2.
        if saved is not None:
            self._check_resume(choice.folder, saved, cache)
        self.model = self._build_model()  # 3.
        self.callbacks = [
            MetricsCallback(cfg.logging.interval),
            EvalCallback(cfg.train.eval_interval),
            MoEHooksCallback(collect_hooks(self.model)),  # routing state between steps, declared by the model
            *([HeldBytesReport()] if engine.zero_stage(cfg) == 3 else []),  # what ZeRO-3 saves, measured
            *self.extra_callbacks,
            CheckpointCallback(cfg.checkpoint.interval, cfg.checkpoint.save_at_end),
        ]
        self._build_engine()  # 4.
        self.data_fingerprint, self.data_store = cache.fingerprint, cache.location_fingerprint
        if saved is not None:  # 5.
            for note in checkpoint.load(self.engine, self.model, choice.folder, layout, saved):
                self._say(note)
            self.state = TrainState(saved["step"], saved["tokens"])
            self._say(f"resumed from {choice.folder} at step {self.state.step}")
        if layout.rank == 0:  # 6.
            self._open_run_dir(saved is not None)

    def _apply_process_settings(self) -> None:
        """Determinism, and on the CPU the allocator and kernel-cache settings (train.*)."""
        cfg = self.cfg
        apply_determinism(cfg.train.deterministic)
        if not torch.cuda.is_available():  # CPU training
            if cfg.train.retain_host_memory:
                retain_freed_memory()
            if cfg.train.cpu_kernel_cache is not None:
                bound_kernel_caches(cfg.train.cpu_kernel_cache)

    def _setup_data(self) -> data.PreparedData:
        """Rank 0 opens (or prepares) the token store, the others wait for it; the model's vocabulary."""
        cfg = self.cfg
        data.check_data_reachable(cfg.data)
        cache = data.prepare_data(cfg.data, log=self._say) if self.layout.rank == 0 else data.wait_for_data(cfg.data)
        self._build_data(cache)
        vocab = cfg.model.vocab_size or cache.vocab_size
        if vocab < cache.vocab_size:
            raise UserError(
                f"model.vocab_size ({vocab}) is smaller than the tokenizer's vocabulary ({cache.vocab_size})"
            )
        self.model_cfg = cfg.model.model_copy(update={"vocab_size": vocab})
        self.resolved = cfg.model_copy(update={"model": self.model_cfg})
        return cache

    def _build_model(self) -> MoETransformer:
        """The model for one process, then parallelized over the layout (torchtitan's pattern)."""
        cfg, layout = self.cfg, self.layout
        torch.manual_seed(cfg.seed)
        model = MoETransformer(self.model_cfg, cfg.moe, cfg.train.activation_checkpointing)
        moe, recompute = cfg.moe, cfg.train.activation_checkpointing
        if moe is not None and moe.ep_overlap and moe.expert_parallel_size > 1 and recompute != "none":
            self._say(
                f"moe.ep_overlap is off under train.activation_checkpointing={recompute}: recomputed layers exchange in sequence"
            )
        if cfg.train.compile:
            model.compile_dense()
        model = parallelize(model, layout)
        register_expert_parallel(model, layout, partition_weights=engine.zero_stage(cfg) == 3)
        return model

    def _build_engine(self) -> None:
        """AdamW over moetrain's parameter groups, the LR schedule, and the DeepSpeed engine."""
        cfg, layout = self.cfg, self.layout
        groups = param_groups(self.model, cfg.optim.weight_decay, layout.ep_size)
        groups = isolate_tagged_params(self.model, groups)  # groups a hook may freeze (StableMoE's switch)
        # torch's AdamW (fused per optim.fused), or DeepSpeed's CPU Adam when the state is offloaded
        optimizer = offload.build_optimizer(groups, cfg.optim, offload.offloads(cfg))
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim, cfg.train.steps))
        ds_config = engine.build_ds_config(cfg, layout.world_size)
        self.engine = engine.initialize_engine(
            self.model, optimizer, schedule, ds_config, layout.world_size, layout.ep_group
        )
        state_io.check_supported(self.model, self.engine.optimizer)
        self.own_clipping = engine.moetrain_clips(ds_config)
        stage = f"ZeRO stage {ds_config.get('zero_optimization', {}).get('stage', 0)}"
        if engine.unpartitioned(cfg, layout.world_size):
            stage = (
                f"ZeRO stage {engine.zero_stage(cfg)} run as stage 0: one process partitions nothing, the update "
                "is the same (train.zero_on_one_process=true keeps ZeRO)"
            )
        adam = "AdamW (DeepSpeed's CPU Adam: state offloaded)" if offload.offloads(cfg) else "AdamW"
        self._say(
            f"optimizer: {adam} inside DeepSpeed's {wrapper_name(self.engine.optimizer)} (train.precision "
            f"{cfg.train.precision}, {stage}; docs/parallelism.md, 'Precision')"
        )
        self._grad_norm = None

    def _open_run_dir(self, resumed: bool) -> None:
        """Rank 0: set aside what this run replaces, write the resolved config, open the logger."""
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resumed:
            for name in checkpoint.set_aside_newer(self.run_dir, self.state.step):
                self._say(f"set aside unverified checkpoint {name} (newer than the one resumed)")
        elif cfg.checkpoint.resume == "none" and (moved := checkpoint.set_aside_history(self.run_dir)):
            self._say(f"fresh run (checkpoint.resume=none): the earlier run's files are in {moved}")
        (self.run_dir / "config.yaml").write_text(dump_config(self.resolved))
        self.logger = RunLogger(
            cfg.logging, self.run_dir, self.last_step, self.state.step, self.resolved.model_dump(mode="json")
        )

    def _check_resume(self, folder: Path, saved: dict, data_now: data.PreparedData) -> None:
        """Refuse a checkpoint of another job (exit 2, every difference listed); report allowed changes.

        An initial (weights-only) checkpoint, e.g. an import's, is checked for the model alone. Otherwise
        the data must be the same tokens (a content hash: the corpus may move or be copied); an older
        checkpoint's location fingerprint is accepted too. ``checkpoint.allow_data_change`` resumes on
        other data anyway, and says so."""
        if is_weights_only(saved):
            for line in check_initial(folder, saved, self.resolved):
                self._say(f"starting with a changed training-only setting: {line}")
            return
        allowed = check_resume(folder, saved, self.resolved, self.layout.world_size)
        was = saved.get("data_fingerprint")
        if was not in (data_now.fingerprint, data_now.location_fingerprint):
            what = (
                f"checkpoint.resume: {folder} was trained on other data (fingerprint {was}, now {data_now.fingerprint})"
            )
            if not self.cfg.checkpoint.allow_data_change:
                raise UserError(
                    f"{what}: the tokens differ (data.paths' contents, the tokenizer or the split changed); restore "
                    "them, start a new run, or set checkpoint.allow_data_change=true to continue on the new data"
                )
            self._say(f"warning: {what}; continuing on the new data (checkpoint.allow_data_change)")
        for line in allowed:
            self._say(f"resuming with a changed setting: {line}")

    def _build_data(self, prepared: data.PreparedData) -> None:
        cfg, layout = self.cfg, self.layout
        pairs = list(zip(prepared.stores, prepared.sources))
        train = [data.split_rows(store, "train", src.cfg, src.field) for store, src in pairs]
        self.val_sources = [(src.name, src.weight) for src in prepared.sources]
        self.val_sets = [data.split_rows(store, "val", src.cfg, src.field) for store, src in pairs]
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
            for cb in self.callbacks:
                cb.on_nothing_to_do(self)
            return self.state
        for cb in self.callbacks:
            cb.on_train_start(self)
        for step in range(self.state.step, self.last_step):
            for cb in self.callbacks:
                cb.on_step_start(self, step)
            result = self._train_step(step)
            self.state.step = step + 1
            self.state.tokens += result.tokens
            for cb in self.callbacks:
                cb.on_step_end(self, result)
        for cb in self.callbacks:
            cb.on_train_end(self)
        self.logger.close()
        return self.state

    def _train_step(self, step: int) -> StepResult:
        """One optimizer step (0-based ``step``): the micro-batches' forward and backward, the
        non-finite policy before the update (collective), the update."""
        cfg, engine = self.cfg, self.engine
        device = engine.device
        lm_sum = aux_sum = loss_sum = torch.zeros((), device=device)
        stats, skip = [], False
        ga = cfg.train.grad_accum_steps
        masked = None  # a masked loss: the step's micro-batches, and the global normalisation (masked_loss.py)
        if self.stream.isolated:
            batches = [self.stream.batch(step, micro) for micro in range(ga)]
            masked = (batches, masked_loss.loss_share(batches, ga, self.layout.world_size, device))
        for micro in range(ga):
            if masked is None:
                x, y, _ = self.stream.batch(step, micro)
                out = engine(to_device(x, device), to_device(y, device))
            else:
                x, y, segments = masked[0][micro]
                out = engine(
                    to_device(x, device),
                    to_device(y, device),
                    segments_BS=to_device(segments, device),
                    loss_tokens=masked[1],
                )
            engine.backward(out.loss)
            lm_sum = lm_sum + out.lm_loss.detach()
            aux_sum = aux_sum + out.aux_loss.detach()
            loss_sum = loss_sum + out.loss.detach()
            stats.append(out.moe_stats)
            del out  # the logits (T x V) must not stay alive through the step and the next forward
            if micro == ga - 1:  # before the update: the non-finite policy
                if self.own_clipping:
                    self._grad_norm = clip_grad_norm(self.model, cfg.optim.grad_clip, self.layout.ep_group)
                skip = self.guard.check(step + 1, loss_sum, self._grad_norm if self.own_clipping else None)
                if skip and self.own_clipping:
                    self.guard.skip_update(engine, self.model)
            engine.step()
        skip = self.guard.after_step(engine, step + 1, self.own_clipping, skip)
        tokens = self.stream.global_batch * cfg.data.seq_len
        return StepResult(step + 1, lm_sum / ga, aux_sum / ga, stats, tokens, skip)

    # --- helpers used by callbacks -------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """``{"val_loss": ...}``; a mixture also ``val_loss/<source>`` for each source (``train.eval_batches``
        batches of each), and ``val_loss`` is their mean weighted by the mixture's weights. A masked loss
        (``masked_loss.py``) is each source's summed cross-entropy over all its batches and ranks divided by
        their target tokens."""
        engine, cfg = self.engine, self.cfg
        device = engine.device
        engine.eval()
        sums, counts = [], []  # per source: summed loss (plain: of batch means), target tokens
        for blocks in self.val_sets:
            total, tokens = torch.zeros((), device=device), torch.zeros((), dtype=torch.int64)
            batches = data.val_batches(
                blocks, cfg.train.micro_batch_size, cfg.train.eval_batches, self.layout.rank, self.layout.world_size
            )
            for batch in batches:
                x, y = to_device(batch.tokens_BS, device), to_device(batch.targets_BS, device)
                if not self.stream.isolated:
                    total += engine(x, y).lm_loss.float()
                    continue
                segments = to_device(batch.segments_BS, device) if batch.segments_BS is not None else None
                total += engine(x, y, segments_BS=segments, loss_tokens=1.0).lm_loss
                tokens += masked_loss.target_tokens([batch])
            sums.append(total)
            counts.append(tokens)
        engine.train()
        if self.stream.isolated:
            sums_t = masked_loss.global_sum(torch.stack(sums), device)
            per_source = (sums_t / masked_loss.global_sum(torch.stack(counts), device)).tolist()
        else:
            per_source = mean_over_ranks(torch.stack(sums) / cfg.train.eval_batches).tolist()
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
            "data_store": self.data_store,  # the token store's folder under data.cache_dir (the run's tokenizer)
            "saved_at": time.time(),
            "config": self.resolved.model_dump(mode="json"),
        }

    def _say(self, text: str) -> None:
        if self.layout.rank == 0:
            print(text, flush=True)

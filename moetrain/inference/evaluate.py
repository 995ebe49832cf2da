"""``moetrain eval``: loss, perplexity and bits per byte of a checkpoint (shapes: moetrain/moe/__init__.py).

On the validation split it takes exactly the micro-batches the training evaluation took at any world
size (rank r's batches of :func:`moetrain.data.val_batches`, for every rank r of the run's world size),
and averages their losses as the training job's mean over ranks does, so it reproduces the
``val_loss`` logged at the checkpoint's step (up to the training precision). On ``--data`` files it
takes every complete block of ``data.seq_len + 1`` tokens (documents joined by the end-of-document token).

bits per byte = (sum of the targets' negative log-likelihood in nats) / ln 2 / (UTF-8 bytes of the
targets): a byte model and a BPE model of the same text are compared on one scale.

Chat and prompt-completion data (and text under ``data.document_masking``) are evaluated as training
evaluates them: rows of packed samples kept apart, and the **masked** loss -- only the targets of the loss
mask (the assistant's tokens, the completion) count, summed over every batch and divided by their number
(``training/masked_loss.py``); ``masked`` in the result says so.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from moetrain import data
from moetrain.config.data import SAMPLE_FORMATS
from moetrain.data.chat_template import data_chat_template
from moetrain.errors import UserError
from moetrain.inference.loading import LoadedCheckpoint
from moetrain.inference.text import RunTokenizer


@dataclass(frozen=True)
class EvalResult:
    checkpoint: str
    step: int
    data: str  # "val" or the files given
    batches: int
    tokens: int
    loss: float  # mean token loss (nats); equal batches, so also the training evaluation's mean of batch means
    perplexity: float
    bits_per_byte: float | None  # None when the targets stand for no bytes
    bytes: int
    logged_val_loss: float | None  # what training logged at this step, when it evaluated then
    per_source: dict[str, float] | None = None  # a mixture: each source's loss; ``loss`` is their weighted mean
    masked: bool = False  # the loss counts the loss mask's targets only (chat: the assistant's tokens)

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def score(model, batches: Iterable[data.Batch], tok: RunTokenizer) -> tuple[list[float], float, int, int]:
    """Per-batch mean losses, summed NLL (nats), target tokens and target bytes (targets of -100 count
    in none of them)."""
    losses, nll, tokens, nbytes = [], 0.0, 0, 0
    for x_BS, y_BS, segments_BS in batches:
        logits_BSV = model(x_BS, segments_BS=segments_BS).logits
        y_T = y_BS.reshape(-1)
        nll_T = F.cross_entropy(logits_BSV.float().flatten(0, 1), y_T, reduction="none")
        counted_T = y_T != data.IGNORE
        nll_N = nll_T[counted_T]
        losses.append(nll_N.mean().item())
        nll += nll_N.double().sum().item()
        tokens += int(counted_T.sum())
        nbytes += tok.num_bytes(y_T[counted_T].tolist())
    return losses, nll, tokens, nbytes


def _result(loaded: LoadedCheckpoint, source: str, scored, logged: float | None, masked: bool) -> EvalResult:
    losses, nll, tokens, nbytes = scored
    loss = nll / tokens
    bpb = nll / math.log(2) / nbytes if nbytes else None
    return EvalResult(
        str(loaded.folder),
        loaded.step,
        source,
        len(losses),
        tokens,
        loss,
        math.exp(min(loss, 50.0)),
        bpb,
        nbytes,
        logged,
        masked=masked,
    )


def logged_val_loss(run_dir: Path, step: int) -> float | None:
    """The ``val_loss`` that ``metrics.jsonl`` holds for ``step`` (the last one, if logged twice)."""
    import json

    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    found = None
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("step") == step and "val_loss" in rec:
            found = rec["val_loss"]
    return found


def evaluate_val(loaded: LoadedCheckpoint, tok: RunTokenizer, log: Callable[[str], None]) -> EvalResult:
    """The training evaluation of the checkpoint's step, on one process. A mixture (``data.sources``):
    each source's val split as training evaluates it, and the loss is their mean weighted by the
    mixture's weights, as training logs ``val_loss`` (bits per byte: over all of them together)."""
    cfg, state = loaded.cfg, loaded.state
    data.check_data_reachable(cfg.data)
    prepared = data.prepare_data(cfg.data, log=log)
    # an initial checkpoint (an import's) has no data of its own to differ from
    if state.get("data_fingerprint") is not None and prepared.fingerprint != state["data_fingerprint"]:
        log(
            f"note: the data differ from the run's (fingerprint {prepared.fingerprint}, the run's "
            f"{state.get('data_fingerprint')}): this is not the run's validation split"
        )
    world, micro = int(state["world_size"]), cfg.train.micro_batch_size
    scored = []
    for store, src in zip(prepared.stores, prepared.sources):
        blocks = data.split_rows(store, "val", src.cfg, src.field)
        batches = (
            batch
            for rank in range(world)
            for batch in data.val_batches(blocks, micro, cfg.train.eval_batches, rank, world)
        )
        scored.append(score(loaded.model, batches, tok))
    logged = logged_val_loss(loaded.run_dir, loaded.step)
    masked = cfg.data.isolated
    if len(scored) == 1:
        return _result(loaded, "val", scored[0], logged, masked)
    total = tuple(sum((s[i] for s in scored), [] if i == 0 else 0) for i in range(4))
    result = _result(loaded, "val", total, logged, masked)
    per_source = {src.name: s[1] / s[2] for src, s in zip(prepared.sources, scored)}
    loss = sum(src.weight * per_source[src.name] for src in prepared.sources)
    return replace(result, loss=loss, perplexity=math.exp(min(loss, 50.0)), per_source=per_source)


def evaluate_files(
    loaded: LoadedCheckpoint, tok: RunTokenizer, paths: list[str], max_batches: int | None
) -> EvalResult:
    """Every complete block of the given files (text / jsonl / parquet, as ``data.paths``); chat and
    prompt-completion records (``data.format``) as rows of packed samples, with the masked loss."""
    cfg = loaded.cfg.data.model_copy(update={"paths": paths, "hub": None, "sources": None})
    if cfg.format in SAMPLE_FORMATS:
        return _evaluate_records(loaded, tok, cfg, max_batches)
    files = data.resolve_files(cfg)
    data.check_contents(cfg, [files])
    from moetrain.data.sources import DocumentStream

    parts = []
    for doc in DocumentStream(cfg, files):
        parts += [np.asarray(tok.encode("".join(doc)), dtype=np.int64), np.asarray([tok.eos_id], dtype=np.int64)]
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    S = cfg.seq_len
    blocks = data.PackedBlocks(tokens, S)
    if blocks.num_blocks < 1:
        raise UserError(
            f"--data: the files give {len(tokens)} tokens, fewer than data.seq_len + 1 = {S + 1}; give more "
            "text or evaluate with a smaller data.seq_len"
        )
    micro = loaded.cfg.train.micro_batch_size
    starts = range(0, blocks.num_blocks, micro)
    if max_batches is not None:
        starts = starts[:max_batches]
    batches = (blocks.get(list(range(s, min(s + micro, blocks.num_blocks)))) for s in starts)
    return _result(loaded, " ".join(paths), score(loaded.model, batches, tok), None, cfg.document_masking)


def _evaluate_records(loaded: LoadedCheckpoint, tok: RunTokenizer, cfg, max_batches: int | None) -> EvalResult:
    """Every chat / prompt-completion record of ``cfg.paths``, encoded as preparation encodes them and
    packed into rows as training packs them (``data.packing``, ``data.overlong``)."""
    from moetrain.data.packing import PackedSamples, fit_samples
    from moetrain.data.records import RecordStream, record_sources
    from moetrain.data.sample_encoding import SampleEncoder
    from moetrain.data.sources import check_contents, resolve_groups

    groups = resolve_groups(cfg, "--data")
    check_contents(cfg, groups, "--data")
    sources = record_sources(cfg, groups)
    template = data_chat_template(loaded.cfg.data.tokenizer, cfg.chat_template) if cfg.format == "chat" else None
    spec = SampleEncoder(tok.name, cfg.format, template, cfg.train_on, tuple(sources))
    tokens, masks, wheres = [], [], []
    for where, record in RecordStream(cfg, sources):
        ids, mask = spec.encode_one(tok.tok, record, where)
        tokens.append(ids)
        masks.append(mask)
        wheres.append(where)
    if not tokens:
        raise UserError(f"--data: the files hold no {cfg.format} record")
    starts = np.cumsum([0] + [len(t) for t in tokens[:-1]])
    tokens_T, mask_T = np.concatenate(tokens), np.concatenate(masks)
    capacity = cfg.seq_len + 1
    fit = fit_samples(
        starts, len(tokens_T), lambda: mask_T, capacity, cfg.overlong, "--data", lambda i: spec.describe(wheres[i])
    )
    rows = PackedSamples(tokens_T, mask_T, fit, tok.eos_id, cfg)
    micro = loaded.cfg.train.micro_batch_size
    firsts = range(0, rows.num_blocks, micro)
    if max_batches is not None:
        firsts = firsts[:max_batches]
    batches = (rows.get(list(range(s, min(s + micro, rows.num_blocks)))) for s in firsts)
    return _result(loaded, " ".join(cfg.paths), score(loaded.model, batches, tok), None, True)

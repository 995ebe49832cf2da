"""Data: sources -> pieces -> tokenizer -> sharded token store -> packed blocks -> data-parallel shards.

Tokens are written once per fingerprint (sources, tokenizer, split settings) to a token store
(``store.py``) by ``moetrain prepare`` or by rank 0 of a training job, streamed in bounded chunks
(``prepare.py``); other ranks wait for its index file, then every rank memory-maps it. A sample is a
block of S+1 tokens. The sample order is a pure function of (seed, epoch, global sample index):
optimizer step s covers global samples [s*G, (s+1)*G) with G = B * grad_accum * dp_size, and
data-parallel rank r takes slice r of each global micro-batch. Resuming needs only the step, and a
different data-parallel size sees the same global stream. A mixture (``data.sources``) has one store per
source and a ``MixturePlan`` that gives each global sample its source (exact shares per window). Tokenizers (``tokenizers.py``, ``bpe.py``): bytes,
a ``tokenizer.json``, or a byte-level BPE trained on the data. The layout and the split rule: docs/data.md.

Chat and prompt-completion sources (``records.py``, ``chat_template.py``, ``sample_encoding.py``,
``prepare_samples.py``) store samples with a loss mask and a sample table; ``packing.py`` packs them into
rows whose samples stay apart (docs/data.md, "Chat and prompt-completion data").

The sampling names (torch) load on first use, so ``moetrain prepare`` and its tokenizer workers never
import torch (~1.6 s and ~200 MB per process).
"""

from typing import TYPE_CHECKING

from moetrain.config.data import DataConfig
from moetrain.data.packing import split_rows
from moetrain.data.prepare import (
    CACHE_VERSION,
    PreparedData,
    fingerprint,
    prepare_data,
    prepare_tokens,
    store_folder,
    wait_for_data,
    wait_for_tokens,
)
from moetrain.data.sources import (
    EXTENSIONS,
    Source,
    check_all_contents,
    check_contents,
    check_data_reachable,
    check_utf8,
    data_sources,
    default_corpus_files,
    resolve_files,
)
from moetrain.data.split import cut_pieces, is_val_piece
from moetrain.data.store import ShardedTokens, TokenCache, open_store
from moetrain.data.tokenizers import ByteTokenizer, HFTokenizer, build_tokenizer

if TYPE_CHECKING:
    from moetrain.data.sampling import IGNORE, Batch, MixturePlan, PackedBlocks, TrainStream, val_batches

SAMPLING = ("IGNORE", "Batch", "MixturePlan", "PackedBlocks", "TrainStream", "val_batches")


def __getattr__(name: str):
    if name in SAMPLING:
        from moetrain.data import sampling

        return getattr(sampling, name)
    raise AttributeError(f"module 'moetrain.data' has no attribute {name!r}")


__all__ = [
    "IGNORE",
    "CACHE_VERSION",
    "Batch",
    "EXTENSIONS",
    "ByteTokenizer",
    "DataConfig",
    "HFTokenizer",
    "MixturePlan",
    "PackedBlocks",
    "PreparedData",
    "ShardedTokens",
    "Source",
    "TokenCache",
    "TrainStream",
    "build_tokenizer",
    "check_all_contents",
    "check_contents",
    "check_data_reachable",
    "check_utf8",
    "cut_pieces",
    "data_sources",
    "default_corpus_files",
    "fingerprint",
    "is_val_piece",
    "open_store",
    "prepare_data",
    "prepare_tokens",
    "resolve_files",
    "split_rows",
    "store_folder",
    "val_batches",
    "wait_for_data",
    "wait_for_tokens",
]

"""An imported model's tokenizer becomes the run's (``moetrain import``).

The tokenizer files of the source folder are copied into ``RUN_DIR/tokenizer/`` and ``data.tokenizer``
points there, so ``prepare``, ``train``, ``eval`` and ``generate`` tokenize as the model was trained to
read, and ``export`` writes the same files back. The copy is loaded the way those commands load it
(:func:`moetrain.data.build_tokenizer`: a ``tokenizer.json`` through the ``tokenizers`` library, which
runs no code; a folder without one through transformers' ``AutoTokenizer``, which refuses custom code
unless trusted) before the import writes anything.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from moetrain.data import build_tokenizer
from moetrain.errors import UserError

FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def tokenizer_files(src: Path) -> list[str]:
    """The tokenizer files ``src`` holds; none is a UserError (the fix: ``data.tokenizer=...``)."""
    found = [name for name in FILES if (src / name).is_file()]
    if not found:
        raise UserError(
            f"SRC: {str(src)!r} holds no tokenizer ({', '.join(FILES[:3])}, ...); add the model's tokenizer files, "
            "or pass data.tokenizer=... (a tokenizer.json, a folder, or byte) to use another tokenizer"
        )
    return found


def check_tokenizer(src: Path, model_vocab: int) -> str:
    """Load the tokenizer of ``src`` as moetrain will load its copy, and check its vocabulary fits the
    model's. Returns a line for the user."""
    try:
        tok = build_tokenizer(str(src))
    except UserError as exc:
        raise UserError(f"SRC: the tokenizer in {str(src)!r} does not load: {exc}") from None
    if tok.vocab_size > model_vocab:
        raise UserError(
            f"SRC: the tokenizer has {tok.vocab_size} tokens, more than the model's vocab_size ({model_vocab}) in "
            "config.json: they do not belong together"
        )
    return f"{tok.vocab_size} tokens, end-of-document id {tok.eos_id}"


def copy_tokenizer(src: Path, dest: Path, names: list[str]) -> None:
    dest.mkdir(parents=True)
    for name in names:
        shutil.copyfile(src / name, dest / name)

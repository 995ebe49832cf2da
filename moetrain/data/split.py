"""The held-out split: documents are cut into pieces, and whole pieces go to train or val.

A document longer than ``data.split_chars`` characters is cut into pieces of at most that many, at
the last blank line of the piece's second half where there is one (else the last line break, else
anywhere); the pieces concatenate back to the document exactly. Pieces are numbered over the whole
corpus, in order, and piece ``i`` goes to val when ``ceil((i + 1) * f)`` exceeds ``ceil(i * f)``
(f = ``data.val_fraction``): piece 0, then every 1/f-th piece. So after ``n`` pieces val holds
``ceil(n * f)`` of them — one large file gives a non-empty val split as well as many small ones.

Worked example, f = 0.25, a 40,000-character file with split_chars 10,000: 4 pieces (cut near
10k, 20k, 30k at blank lines); val takes piece 0, train pieces 1-3.
"""

from __future__ import annotations

import math
from typing import Iterable, Iterator


def is_val_piece(index: int, val_fraction: float) -> bool:
    """Piece ``index`` (0-based, over the whole corpus) is held out."""
    return _held_out(index + 1, val_fraction) > _held_out(index, val_fraction)


def _held_out(n: int, val_fraction: float) -> int:
    return math.ceil(round(n * val_fraction, 9))  # round: 50 * 0.02 is 1.0, not 1.0000000000000002


def cut_pieces(chunks: Iterable[str], max_chars: int) -> Iterator[tuple[str, bool]]:
    """The pieces of one document given as text chunks: ``(text, is_last)``; no empty pieces."""
    buf, pos = "", 0
    for chunk in chunks:
        buf = buf[pos:] + chunk
        pos = 0
        while len(buf) - pos > max_chars:
            cut = _cut_point(buf, pos, max_chars)
            yield buf[pos:cut], False
            pos = cut
    if len(buf) > pos:
        yield buf[pos:], True


def _cut_point(buf: str, pos: int, max_chars: int) -> int:
    lo, hi = pos + max_chars // 2, pos + max_chars
    at = buf.rfind("\n\n", lo, hi)
    if at >= 0:
        return at + 2
    at = buf.rfind("\n", lo, hi)
    return at + 1 if at >= 0 else hi

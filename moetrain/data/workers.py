"""Tokenizer worker processes for preparation: chunks in, tokens out, in corpus order.

Why not ``multiprocessing.Pool`` or ``ProcessPoolExecutor``:

- they fork by default, and the preparing process may hold threads (torch's, the Rust pool that trained
  the BPE a moment ago); a child forked while one of them holds a lock waits for it forever. These
  workers are spawned.
- their workers share one result pipe. A worker killed while writing to it (the OOM killer) leaves a
  torn message that the reader waits on forever, and ``Pool`` waits forever for the lost chunk even when
  the pipe survives. Here each worker has its own pipe, and its death is an error naming it.

Chunk ``i`` goes to worker ``i mod n``, one chunk in flight per worker: the parent sends a worker its
next chunk only after reading its result, so neither side ever blocks writing to the other while that
one writes too.
"""

from __future__ import annotations

import multiprocessing
import signal
from collections import deque
from multiprocessing.connection import Connection, wait
from typing import Iterable, Iterator

import numpy as np

from moetrain.data.tokenizers import build_tokenizer, token_dtype
from moetrain.errors import UserError

Chunk = tuple[list[str], list[bool]]  # the texts of some pieces, and whether each ends its document
Encoded = tuple[np.ndarray, np.ndarray]  # the chunk's tokens (EOS after each document end), tokens per piece
# ``tokenizer`` below: ``data.tokenizer`` as a string (documents, ``encode_chunk``), or an object whose
# ``build()`` gives ``encode(*chunk)`` (records: ``sample_encoding.SampleEncoder``, chunks of (records, wheres)).


def encode_chunk(tok, texts: list[str], ends: list[bool]) -> Encoded:
    """The tokens of a chunk's pieces, concatenated (EOS after each document's last piece), and the
    number of tokens of each piece."""
    dtype = token_dtype(tok.vocab_size)
    eos = np.asarray([tok.eos_id], dtype=dtype)
    parts, lengths = [], []
    for text, end in zip(texts, ends):
        ids = tok.encode(text).astype(dtype)
        parts.extend([ids, eos] if end else [ids])
        lengths.append(len(ids) + int(end))
    return np.concatenate(parts), np.asarray(lengths, dtype=np.int64)


def encoded(chunks: Iterable[Chunk], tokenizer: str, workers: int) -> Iterator[tuple[list[bool], Encoded]]:
    """``(ends, encode_chunk(...))`` per chunk, in order; in ``workers`` processes when ``workers > 1``.
    Stopping early (closing the generator) stops the workers."""
    if workers <= 1:
        encode = _encoder(tokenizer)
        for chunk in chunks:
            yield chunk[1], encode(*chunk)
        return
    pool = _Workers(workers, tokenizer)
    try:
        chunks = iter(chunks)
        in_flight: deque[tuple[int, list[bool]]] = deque()  # (worker, the chunk's ends), oldest first
        for w in range(workers):
            chunk = next(chunks, None)
            if chunk is None:
                break
            pool.send(w, chunk)
            in_flight.append((w, chunk[1]))
        while in_flight:
            w, ends = in_flight.popleft()
            result = pool.receive(w)
            chunk = next(chunks, None)
            if chunk is not None:
                pool.send(w, chunk)
                in_flight.append((w, chunk[1]))
            yield ends, result
    finally:
        pool.stop()


def _encoder(tokenizer):
    """``encode(*chunk)`` for this process: text pieces through ``encode_chunk``, or a record encoder."""
    if not isinstance(tokenizer, str):
        return tokenizer.build()
    tok = build_tokenizer(tokenizer)
    return lambda texts, ends: encode_chunk(tok, texts, ends)


class WorkerDiedError(RuntimeError):
    """A tokenizer worker ended before returning its chunk; the message names its signal or exit code."""


class _Workers:
    def __init__(self, n: int, tokenizer: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.procs, self.conns = [], []
        for _ in range(n):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=_work, args=(theirs, tokenizer), daemon=True, name="moetrain-tokenizer")
            proc.start()
            theirs.close()  # only the worker holds its end: its death is EOF here
            self.procs.append(proc)
            self.conns.append(ours)

    def send(self, w: int, chunk: Chunk) -> None:
        try:
            self.conns[w].send(chunk)
        except OSError:  # BrokenPipeError, ConnectionResetError
            raise self._died(w) from None

    def receive(self, w: int) -> Encoded:
        conn = self.conns[w]
        if conn not in wait([conn, self.procs[w].sentinel]):
            raise self._died(w)
        try:
            ok, payload = conn.recv()
        except (EOFError, OSError):  # OSError: it died while writing (a torn message)
            raise self._died(w) from None
        if not ok:
            if isinstance(payload, UserError):  # bad input found by the worker: the message names it
                raise payload
            raise RuntimeError(f"a tokenizer worker failed: {payload}")
        return payload

    def _died(self, w: int) -> WorkerDiedError:
        proc = self.procs[w]
        proc.join(timeout=5)
        code = proc.exitcode
        if code is not None and code < 0:
            how = f"was killed by {signal.Signals(-code).name}" + (" (the OOM killer?)" if code == -9 else "")
        else:
            how = f"exited with code {code} (its error is printed above)"
        return WorkerDiedError(
            f"tokenizer worker {w} of {len(self.procs)} (pid {proc.pid}) {how} while preparing the data; "
            f"nothing was published. Rerun; if memory is short, with fewer workers (data.num_workers, "
            f"now {len(self.procs)})"
        )

    def stop(self) -> None:
        """Ends every worker, also mid-chunk (the parent stopped early or failed)."""
        for conn in self.conns:
            conn.close()  # an idle worker reads EOF and exits
        for proc in self.procs:
            proc.join(timeout=1)
            if proc.is_alive():  # busy with a chunk nobody will read
                proc.kill()
                proc.join()


def _work(conn: Connection, tokenizer: str) -> None:
    """A worker's loop: chunks in, ``(True, encoded)`` or ``(False, the error)`` out, until EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it then stops us
    encode = _encoder(tokenizer)
    while True:
        try:
            chunk = conn.recv()
        except EOFError:
            return
        try:
            reply = (True, encode(*chunk))
        except UserError as e:  # bad input: the parent raises it as it is
            reply = (False, UserError(str(e)))
        except Exception as e:  # the message travels; the parent raises it
            reply = (False, f"{type(e).__name__}: {e}")
        try:
            conn.send(reply)
        except OSError:  # the parent stopped
            return

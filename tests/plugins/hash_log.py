"""``python tests/plugins/hash_log.py train ...``: ``moetrain train`` that logs which rank hashed which
checkpoint file (``RUN_DIR/hashed_rank<r>.txt``), for tests/test_checkpoint_hashing.py."""

from __future__ import annotations

import os

from moetrain.checkpoint import manifest

real = manifest.sha256_of


def logged(path):
    rank = os.environ.get("RANK", "0")
    run_dir = next(p for p in path.parents if p.name == "checkpoints").parent
    with open(run_dir / f"hashed_rank{rank}.txt", "a") as f:
        f.write(f"{path.parent.name}/{path.name}\n")
    return real(path)


manifest.sha256_of = logged

if __name__ == "__main__":
    from moetrain.cli import entry

    entry()

"""How fast a checkpoint is hashed (sha256, what the manifest records), and so how large a checkpoint can
grow before hashing alone would exhaust the collective timeout (``train.collective_timeout_s``, 600 s).

Each rank hashes the files it wrote while the others hash theirs (``moetrain/training/checkpoint.py``), so
what must fit in the timeout is the largest *per-rank* share: rank 0's ``shared.safetensors`` (every
non-expert parameter with its two Adam moments, fp32: 12 bytes per parameter) plus its experts' file.

    python bench/checkpoint_hashing.py [--mb 1024] [--reps 3] [--out bench/results/checkpoint_hashing.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moetrain.checkpoint.manifest import sha256_of  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=1024, help="size of the file hashed")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--timeout-s", type=int, default=600, help="train.collective_timeout_s")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "checkpoint_hashing.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "blob"
        with open(path, "wb") as f:
            for _ in range(args.mb):
                f.write(os.urandom(1 << 20))
        sha256_of(path)  # warm the page cache: a fresh save's files are in it too
        seconds = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            sha256_of(path)
            seconds.append(time.perf_counter() - t0)
    mb_s = args.mb / statistics.median(seconds)
    at_risk_gb = mb_s * args.timeout_s / 1024
    result = {
        "file_mb": args.mb,
        "median_s": statistics.median(seconds),
        "hash_mb_per_s": round(mb_s, 1),
        "timeout_s": args.timeout_s,
        "per_rank_gb_at_timeout": round(at_risk_gb, 1),
        "non_expert_params_at_timeout_billions": round(at_risk_gb * 2**30 / 12 / 1e9, 1),
        "load_average": os.getloadavg()[0],
        "cpu": os.cpu_count(),
    }
    print(json.dumps(result, indent=1))
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

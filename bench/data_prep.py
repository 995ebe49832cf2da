"""Data preparation: throughput and peak memory of ``moetrain prepare`` at two corpus sizes, text and chat.

    python bench/data_prep.py                      # 15 MB and 200 MB, many files and one file, 0 and 2 workers;
                                                   # chat: 15 MB of conversations, 0 and 2 workers
    python bench/data_prep.py --sizes 15 --workers 0 --formats text

Synthesises local corpora in a temporary folder by copying the built-in corpus (the Python standard
library's sources) until each reaches its size, as many files (``files``) or concatenated into one
text file (``single``); runs ``moetrain prepare`` on each as a subprocess with the byte tokenizer; and
samples the RSS of the preparing process tree (the process and its tokenizer workers) every 20 ms.
Reports tokens/s and MB/s of the tokenization (from the store's index.json), the wall time of the
whole command, and the peak RSS: the largest single process and the largest sum over the tree (the
spawned workers each hold their own interpreter). Targets (the data-preparation
issue): peak RSS at 200 MB within 1.3x of the peak at 15 MB; byte-tokenizer throughput >= 20 MB/s on
2 cores. Results also go to bench/results/data_prep.json.

Chat rows (``--formats chat``, ``--chat-sizes``): a JSON Lines file of conversations cut from the same
sources (a system message in half of them, 1-3 user / assistant turns of 100-1500 characters each; seeded),
prepared with ``data.format: chat`` and configs/chat_tiny.yaml's template (rendered incrementally: no
generation markers) and the byte tokenizer; reported as MB/s of JSON Lines and samples/s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from moetrain.data import default_corpus_files  # noqa: E402


def make_corpus(folder: Path, megabytes: float, layout: str) -> int:
    """Copies of the standard library's sources until ``megabytes``; returns the bytes written."""
    target, written, copy = int(megabytes * 1e6), 0, 0
    folder.mkdir(parents=True)
    sources = default_corpus_files()
    single = open(folder / "corpus.txt", "wb") if layout == "single" else None
    while written < target:
        for src in sources:
            if written >= target:
                break
            if single is not None:
                data = src.read_bytes()
                single.write(data + b"\n\n")
                written += len(data) + 2
            else:
                dest = folder / f"copy{copy:03d}" / f"{src.parent.name}_{src.name}"
                dest.parent.mkdir(exist_ok=True)
                shutil.copyfile(src, dest)
                written += dest.stat().st_size
        copy += 1
    if single is not None:
        single.close()
    return written


def make_chat_corpus(folder: Path, megabytes: float) -> int:
    """Conversations cut from the standard library's sources until ``megabytes`` of JSON Lines."""
    rng = random.Random(0)
    text = "\n".join(p.read_text(errors="replace") for p in default_corpus_files()[:300])
    folder.mkdir(parents=True)
    written, target = 0, int(megabytes * 1e6)
    with open(folder / "chat.jsonl", "w") as f:
        while written < target:
            messages = [{"role": "system", "content": "You are a helpful assistant."}] if rng.random() < 0.5 else []
            for _ in range(rng.randint(1, 3)):
                for role in ("user", "assistant"):
                    at = rng.randrange(len(text) - 1500)
                    messages.append({"role": role, "content": text[at : at + rng.randint(100, 1500)]})
            line = json.dumps({"messages": messages}) + "\n"
            f.write(line)
            written += len(line.encode())
    return written


def run_prepare(corpus: Path, cache: Path, workers: int, fmt: str = "text") -> dict:
    """``moetrain prepare`` as a subprocess; its wall time and the peak RSS of its process tree."""
    config = "chat_tiny.yaml" if fmt == "chat" else "tiny.yaml"
    cmd = [sys.executable, "-m", "moetrain.cli", "prepare", str(REPO / "configs" / config)]
    cmd += [f"data.paths=[{corpus}]", f"data.cache_dir={cache}", "data.max_tokens=null"]
    cmd += [f"data.num_workers={workers}", "data.tokenizer=byte"]
    if fmt == "chat":  # rows long enough for every conversation: this measures preparation, not fitting
        cmd += ["data.seq_len=16384", "model.max_seq_len=16384"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    root = psutil.Process(proc.pid)
    peak_tree = peak_one = 0
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            rss = []
            for p in tree:
                try:
                    rss.append(p.memory_info().rss)
                except psutil.NoSuchProcess:
                    pass
            peak_tree, peak_one = max(peak_tree, sum(rss)), max(peak_one, max(rss, default=0))
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.02)
    wall = time.perf_counter() - start
    out = proc.stdout.read()
    if proc.returncode != 0:
        raise SystemExit(f"moetrain prepare failed ({proc.returncode}):\n{out}")
    index = json.loads(next(cache.glob("*/index.json")).read_text())
    tokens = sum(s["tokens"] for s in index["splits"].values())
    samples = {"samples": index["documents"], "samples_per_s": round(index["documents"] / index["seconds"])}
    return {
        **(samples if fmt == "chat" else {}),
        "wall_s": round(wall, 2),
        "prepare_s": index["seconds"],
        "source_mb": round(index["source_bytes"] / 1e6, 1),
        "tokens": tokens,
        "mb_per_s": round(index["source_bytes"] / 1e6 / index["seconds"], 1),
        "tokens_per_s": round(tokens / index["seconds"]),
        "peak_rss_one_mb": round(peak_one / 2**20),
        "peak_rss_tree_mb": round(peak_tree / 2**20),
        "val_tokens": index["splits"]["val"]["tokens"],
        "output": out.strip().splitlines()[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[15, 200], help="corpus sizes in MB")
    parser.add_argument("--layouts", nargs="+", default=["files", "single"], choices=["files", "single"])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="data.num_workers values")
    parser.add_argument("--formats", nargs="+", default=["text", "chat"], choices=["text", "chat"])
    parser.add_argument("--chat-sizes", type=float, nargs="+", default=[15], help="chat corpus sizes in MB")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "data_prep.json"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="moetrain-data-prep-") as tmp:
        for layout in args.layouts if "text" in args.formats else []:
            for size in args.sizes:
                corpus = Path(tmp) / f"{layout}_{size:g}MB"
                make_corpus(corpus, size, layout)
                for workers in args.workers:
                    cache = Path(tmp) / f"cache_{layout}_{size:g}_{workers}"
                    row = {"format": "text", "layout": layout, "size_mb": size, "workers": workers}
                    row.update(run_prepare(corpus, cache, workers))
                    shutil.rmtree(cache)
                    rows.append(row)
                    print(
                        f"{layout:6s} {size:5g} MB  workers={workers}  {row['mb_per_s']:6.1f} MB/s  "
                        f"{row['tokens_per_s'] / 1e6:6.1f} M tokens/s  wall {row['wall_s']:5.1f} s  peak RSS "
                        f"{row['peak_rss_one_mb']} MB (one process), {row['peak_rss_tree_mb']} MB (tree)",
                        flush=True,
                    )
                shutil.rmtree(corpus)
        for size in args.chat_sizes if "chat" in args.formats else []:
            corpus = Path(tmp) / f"chat_{size:g}MB"
            make_chat_corpus(corpus, size)
            for workers in args.workers:
                cache = Path(tmp) / f"cache_chat_{size:g}_{workers}"
                row = {"format": "chat", "layout": "jsonl", "size_mb": size, "workers": workers}
                row.update(run_prepare(corpus, cache, workers, "chat"))
                shutil.rmtree(cache)
                rows.append(row)
                print(
                    f"chat   {size:5g} MB  workers={workers}  {row['mb_per_s']:6.1f} MB/s  "
                    f"{row['samples_per_s']:7d} samples/s  {row['tokens_per_s'] / 1e6:6.2f} M tokens/s  wall "
                    f"{row['wall_s']:5.1f} s  peak RSS {row['peak_rss_one_mb']} MB (one process), "
                    f"{row['peak_rss_tree_mb']} MB (tree)",
                    flush=True,
                )
            shutil.rmtree(corpus)
    for layout in args.layouts:
        for workers in args.workers:
            sel = {r["size_mb"]: r for r in rows if r["layout"] == layout and r["workers"] == workers}
            sel = {k: r for k, r in sel.items() if r["format"] == "text"}
            if len(sel) >= 2:
                small, large = sel[min(sel)], sel[max(sel)]
                ratio = large["peak_rss_tree_mb"] / small["peak_rss_tree_mb"]
                print(f"{layout} workers={workers}: peak RSS {max(sel):g} MB / {min(sel):g} MB = {ratio:.2f}x")
    meta = {
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cores": len(os.sched_getaffinity(0)),
        "load_avg": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
        ).stdout.strip(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

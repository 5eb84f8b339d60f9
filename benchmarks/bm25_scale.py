"""BM25 tool at scale: build, save, load and query a synthetic corpus of N passages.

    python benchmarks/bm25_scale.py --num-passages 1000000

Passages are `--words` words drawn from a Zipf-distributed vocabulary of fictional words
(like Wikipedia's 100-word passages in Search-R1's wiki-18 corpus). Queries are 4 words of
a random passage, so recall@k of that passage is a sanity check. Prints a table: times,
peak RSS, and queries/s: batched, one query per call, and bm25s's own `retrieve` (baseline;
it selects the top k over all N scores, which our tool avoids).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from mempo.envs.bm25_search import BM25Search, tokenize_for_bm25
from mempo.host import describe_device


def rss_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def fictional_vocabulary(size: int, rng: np.random.Generator) -> np.ndarray:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = set()
    while len(words) < size:
        lengths = rng.integers(4, 10, size=size)
        for n in lengths:
            words.add("".join(rng.choice(letters, n)))
    return np.array(sorted(words)[:size])


def write_corpus(path: Path, num_passages: int, words: int, vocab_size: int, seed: int,
                 chunk: int = 50_000) -> tuple[np.ndarray, np.ndarray]:
    """Write the corpus; returns (heads: [num_passages, 4] word ids of the first 4 words of
    every passage, used as queries; vocab: [vocab_size] words)."""
    rng = np.random.default_rng(seed)
    vocab = fictional_vocabulary(vocab_size, rng)
    heads = np.empty((num_passages, 4), dtype=np.int64)
    with open(path, "w") as f:
        for start in range(0, num_passages, chunk):
            n = min(chunk, num_passages - start)
            ids = np.minimum(rng.zipf(1.2, size=(n, words)) - 1, vocab_size - 1)
            # a few rare words per passage make it findable, as names do in real text
            ids[:, :4] = rng.integers(1000, vocab_size, size=(n, 4))
            heads[start:start + n] = ids[:, :4]
            text = vocab[ids]
            lines = [json.dumps({"id": str(start + i), "title": " ".join(row[:2]),
                                 "text": " ".join(row)}) for i, row in enumerate(text)]
            f.write("\n".join(lines) + "\n")
    return heads, vocab


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-passages", type=int, default=1_000_000)
    parser.add_argument("--words", type=int, default=100)
    parser.add_argument("--vocab-size", type=int, default=200_000)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="where corpus and index go (default: tmp)")
    args = parser.parse_args()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bm25_scale_"))
    workdir.mkdir(parents=True, exist_ok=True)
    corpus = workdir / "corpus.jsonl"
    rows = []

    started = time.perf_counter()
    heads, vocab = write_corpus(corpus, args.num_passages, args.words, args.vocab_size, args.seed)
    rows.append(("write corpus", time.perf_counter() - started,
                 f"{os.path.getsize(corpus) / 2**30:.2f} GiB on disk"))
    base_rss = rss_gib()

    started = time.perf_counter()
    tool = BM25Search.from_jsonl(corpus)
    rows.append(("build index", time.perf_counter() - started,
                 f"peak RSS {peak_rss_gib():.2f} GiB (corpus generator held {base_rss:.2f})"))
    started = time.perf_counter()
    tool.save(workdir / "index")
    rows.append(("save index", time.perf_counter() - started, ""))
    del tool

    started = time.perf_counter()
    tool = BM25Search.load(workdir / "index")
    rows.append(("load index (mmap)", time.perf_counter() - started, f"RSS now {rss_gib():.2f} GiB"))

    rng = np.random.default_rng(args.seed + 1)
    targets = rng.integers(0, args.num_passages, size=args.queries)
    queries = [" ".join(vocab[heads[t]]) for t in targets]

    started = time.perf_counter()
    batched = tool.search(queries, args.top_k)
    batched_s = time.perf_counter() - started
    recall = np.mean([str(t) in {d.id for d in docs} for t, docs in zip(targets, batched)])
    rows.append((f"search, batched ({args.queries} queries)", batched_s,
                 f"{args.queries / batched_s:,.0f} queries/s, recall@{args.top_k} {recall:.3f}"))
    few = queries[:200]
    started = time.perf_counter()
    for q in few:
        tool.search([q], args.top_k)
    single_s = time.perf_counter() - started
    rows.append(("search, one query per call (200)", single_s,
                 f"{len(few) / single_s:,.0f} queries/s"))
    started = time.perf_counter()  # baseline: the library's own retrieve (dense top-k)
    tokens = [[t for t in q if t in tool.bm25.vocab_dict] for q in tokenize_for_bm25(few)]
    tool.bm25.retrieve(tokens, k=args.top_k, show_progress=False)
    library_s = time.perf_counter() - started
    rows.append(("baseline: bm25s.BM25.retrieve (200)", library_s,
                 f"{len(few) / library_s:,.0f} queries/s"))

    print(f"\nbm25 scale | {describe_device()} | "
          f"{args.num_passages:,} passages x {args.words} words, vocab {args.vocab_size:,}, "
          f"top_k {args.top_k}")
    print(f"{'step':<40}{'seconds':>10}  notes")
    for name, seconds, note in rows:
        print(f"{name:<40}{seconds:>10.2f}  {note}")
    print(f"{'peak RSS of the whole run':<40}{'':>10}  {peak_rss_gib():.2f} GiB")
    print(f"workdir: {workdir}")


if __name__ == "__main__":
    main()

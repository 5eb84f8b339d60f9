"""Retrieval server under load: N concurrent clients on loopback, a fixed number of requests.

    python benchmarks/retrieval_server.py --clients 50,200 --requests 2000

Starts `python -m mempo.envs.retrieval_server` as a subprocess over the tiny world's corpus and
runs N client threads, each a `HttpSearch` (retries=0, one connection per request, as training
does), pulling requests from a shared count until `--requests` are done. An answer counts as an
error when the request fails (reset, timeout, 4xx/5xx) or its passage ids differ from the
in-process tool's. Baseline (same run, same clients): the lean stdlib server a user would write,
`http.server.ThreadingHTTPServer` answering the same wire format without validation
(`--no-baseline` skips it). Prints a table: errors, requests/s, p50/p99 latency, queries/s.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

from mempo.envs import BM25Search, HttpSearch, build_tiny_world
from mempo.envs.retrieval_server import DEFAULT_MAX_CONCURRENCY
from mempo.envs.search_tool import title_text_to_contents
from mempo.host import describe_device


def serve_stdlib(corpus: str) -> None:
    """Baseline server: ThreadingHTTPServer with defaults (listen backlog 5), no validation."""
    tool = BM25Search.from_jsonl(corpus)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802 (stdlib naming)
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            result = [[{"document": {"id": d.id, "contents": title_text_to_contents(d.title, d.text)},
                        "score": d.score} for d in docs]
                      for docs in tool.search(request["queries"], request.get("topk") or 3)]
            body = json.dumps({"result": result}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(f"serving {len(tool)} passages on http://127.0.0.1:{server.server_port}/retrieve",
          flush=True)
    server.serve_forever()


def start_server(command: list[str]) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = process.stdout.readline()
    match = re.search(r"(http://127\.0\.0\.1:\d+/retrieve)", line)
    if not match:
        process.kill()
        raise SystemExit(f"server did not start: {line!r}{process.stdout.read()[-2000:]}")
    threading.Thread(target=process.stdout.read, daemon=True).start()  # drain its warnings
    return process, match.group(1)


def run_load(url: str, clients: int, requests: int, batches: list[list[str]],
             expected: list[list[list[str]]], topk: int) -> dict:
    """`clients` threads share `requests` requests; batch i % len(batches) for request i."""
    next_request, lock = iter(range(requests)), threading.Lock()
    latencies, errors = [], []
    start = threading.Barrier(clients + 1)

    def client() -> None:
        search = HttpSearch(url, timeout_s=60, retries=0)
        start.wait()
        while True:
            with lock:
                i = next(next_request, None)
            if i is None:
                return
            batch = i % len(batches)
            began = time.perf_counter()
            try:
                docs = search.search(batches[batch], topk)
                ok = [[d.id for d in ranked] for ranked in docs] == expected[batch]
            except Exception as error:  # any failure is an error of this request
                ok, docs = False, str(error)
            seconds = time.perf_counter() - began
            with lock:
                latencies.append(seconds)
                if not ok:
                    errors.append(docs)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    return {"errors": len(errors), "wall": wall, "latencies": np.array(latencies),
            "example": str(errors[0])[:160] if errors else ""}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", default="50,200", help="comma-separated client counts")
    parser.add_argument("--requests", type=int, default=2000, help="requests per row")
    parser.add_argument("--queries-per-request", type=int, default=1)
    parser.add_argument("--topk", type=int, default=3)
    parser.add_argument("--max-concurrency", type=int, default=DEFAULT_MAX_CONCURRENCY,
                        help="the server's search threads")
    parser.add_argument("--no-baseline", action="store_true", help="skip the stdlib server")
    parser.add_argument("--serve-stdlib", metavar="CORPUS", help=argparse.SUPPRESS)  # internal
    args = parser.parse_args()
    if args.serve_stdlib:
        return serve_stdlib(args.serve_stdlib)

    workdir = tempfile.TemporaryDirectory(prefix="retrieval_bench_")
    corpus = Path(workdir.name) / "corpus.jsonl"
    world = build_tiny_world()
    world.write_corpus(corpus)
    queries = [hop.query for q in world.questions for hop in q.hops] + \
              [q.task.questions[0] for q in world.questions]
    n = args.queries_per_request
    batches = [queries[i:i + n] for i in range(0, len(queries) - n + 1, n)]
    tool = BM25Search.from_jsonl(corpus)  # the answers every request must get
    expected = [[[d.id for d in docs] for docs in tool.search(batch, args.topk)] for batch in batches]

    servers = [(f"uvicorn, {args.max_concurrency} search threads",
                [sys.executable, "-m", "mempo.envs.retrieval_server", "--corpus", str(corpus),
                 "--host", "127.0.0.1", "--port", "0",
                 "--max-concurrency", str(args.max_concurrency)])]
    if not args.no_baseline:
        servers.append(("baseline: stdlib ThreadingHTTPServer",
                        [sys.executable, __file__, "--serve-stdlib", str(corpus)]))
    rows = []
    for name, command in servers:
        process, url = start_server(command)
        try:
            run_load(url, 4, 40, batches, expected, args.topk)  # warm-up: imports, caches
            for clients in [int(c) for c in args.clients.split(",")]:
                rows.append((name, clients, run_load(url, clients, args.requests, batches,
                                                     expected, args.topk)))
        finally:
            process.terminate()
            process.wait(timeout=30)
    workdir.cleanup()

    versions = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in ("uvicorn", "starlette"))
    print(f"\nretrieval server | {datetime.date.today()} | {describe_device()}, "
          f"Python {platform.python_version()}, {versions}")
    print(f"{len(tool)} passages, {n} quer{'y' if n == 1 else 'ies'}/request, topk {args.topk}; "
          f"client threads in one process, HttpSearch (one connection per request), loopback")
    print(f"{'server':<40}{'clients':>8}{'requests':>9}{'errors':>7}{'req/s':>8}"
          f"{'p50 ms':>8}{'p99 ms':>8}{'queries/s':>10}")
    for name, clients, r in rows:
        lat = r["latencies"] * 1e3
        done = len(lat)
        print(f"{name:<40}{clients:>8}{done:>9}{r['errors']:>7}{done / r['wall']:>8.0f}"
              f"{np.percentile(lat, 50):>8.1f}{np.percentile(lat, 99):>8.1f}"
              f"{(done - r['errors']) * n / r['wall']:>10.0f}")
    for name, clients, r in rows:
        if r["errors"]:
            print(f"  {name}, {clients} clients, e.g.: {r['example']}")


if __name__ == "__main__":
    main()

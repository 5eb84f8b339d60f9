"""A small retrieval server speaking the Search-R1 retriever API, serving the bm25 tool.

    python -m mempo.envs.retrieval_server --corpus corpus.jsonl --port 8000 [--index-dir DIR]

POST /retrieve {"queries": [...], "topk": k, "return_scores": bool}
 -> {"result": [[{"document": {"id", "contents"}, "score"}, ...], ...]}   (return_scores)
 -> {"result": [[{"id", "contents"}, ...], ...]}                          (otherwise)
GET /stats -> {"requests", "queries", "passages"}: /retrieve calls and queries answered so far.
Bad requests get 400, a failing tool 500, both with {"error": message}. Built on the stdlib
`http.server` (threaded); meant for local training runs and tests, not the open internet.
"""
from __future__ import annotations

import argparse
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from mempo.envs.bm25_search import BM25Search, META_FILE
from mempo.envs.search_tool import SearchTool, title_text_to_contents

DEFAULT_TOPK = 3
MAX_BODY_BYTES = 16 << 20


def _parse_request(raw: bytes) -> tuple[list[str], int, bool]:
    request = json.loads(raw)
    if not isinstance(request, dict):
        raise ValueError("body must be a JSON object")
    queries = request.get("queries")
    if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
        raise ValueError("'queries' must be a list of strings")
    topk = request.get("topk") or DEFAULT_TOPK
    if not isinstance(topk, int) or topk < 1:
        raise ValueError(f"'topk' must be an int >= 1, got {topk!r}")
    return queries, topk, bool(request.get("return_scores", False))


def make_handler(tool: SearchTool) -> type[BaseHTTPRequestHandler]:
    counts = {"requests": 0, "queries": 0}  # answered /retrieve calls, for GET /stats
    lock = threading.Lock()

    class RetrieveHandler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 (stdlib naming)
            if self.path.rstrip("/") != "/stats":
                return self._reply(404, {"error": f"unknown path {self.path}; GET /stats or POST /retrieve"})
            with lock:
                self._reply(200, dict(counts, passages=len(tool) if hasattr(tool, "__len__") else None))

        def do_POST(self) -> None:  # noqa: N802 (stdlib naming)
            if self.path.rstrip("/") != "/retrieve":
                return self._reply(404, {"error": f"unknown path {self.path}; use /retrieve"})
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY_BYTES:
                return self._reply(413, {"error": f"body over {MAX_BODY_BYTES} bytes"})
            try:
                queries, topk, with_scores = _parse_request(self.rfile.read(length))
            except ValueError as error:  # JSONDecodeError is a ValueError
                return self._reply(400, {"error": str(error)})
            try:
                ranked = tool.search(queries, topk)
            except Exception as error:  # the server must answer, not drop the connection
                return self._reply(500, {"error": f"{type(error).__name__}: {error}"})
            result = []
            for docs in ranked:
                hits = [{"id": d.id, "contents": title_text_to_contents(d.title, d.text)}
                        for d in docs]
                if with_scores:
                    hits = [{"document": h, "score": d.score} for h, d in zip(hits, docs)]
                result.append(hits)
            with lock:
                counts["requests"] += 1
                counts["queries"] += len(queries)
            self._reply(200, {"result": result})

        def _reply(self, status: int, payload: Any) -> None:
            body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
            pass

    return RetrieveHandler


def make_retrieval_server(tool: SearchTool, host: str = "127.0.0.1",
                          port: int = 0) -> ThreadingHTTPServer:
    """A server (not yet serving) for `tool`; port 0 picks a free port (`server.server_port`)."""
    server = ThreadingHTTPServer((host, port), make_handler(tool))
    server.daemon_threads = True
    return server


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", help="JSONL corpus ({id,title,text} lines)")
    parser.add_argument("--index-dir",
                        help="saved index: loaded if present, else built and saved here")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    if args.index_dir and (Path(args.index_dir) / META_FILE).is_file():
        tool = BM25Search.load(args.index_dir)
    elif args.corpus:
        tool = BM25Search.from_jsonl(args.corpus)
        if args.index_dir:
            tool.save(args.index_dir)
    else:
        parser.error("--corpus is required unless --index-dir holds a saved index")
    server = make_retrieval_server(tool, args.host, args.port)
    print(f"serving {len(tool)} passages on http://{args.host}:{server.server_port}/retrieve",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()

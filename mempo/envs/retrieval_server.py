"""A retrieval server speaking the Search-R1 retriever API, serving the bm25 tool.

    python -m mempo.envs.retrieval_server --corpus corpus.jsonl --port 8000 [--index-dir DIR]
                                          [--host 127.0.0.1] [--max-concurrency 4]

POST /retrieve {"queries": [...], "topk": k, "return_scores": bool}
 -> {"result": [[{"document": {"id", "contents"}, "score"}, ...], ...]}   (return_scores)
 -> {"result": [[{"id", "contents"}, ...], ...]}                          (otherwise)
GET /stats -> {"requests", "queries", "passages"}: /retrieve calls and queries answered so far.

`queries` (required): up to MAX_QUERIES strings. `topk`: an integer in [1, MAX_TOPK]; only a
missing `topk` means DEFAULT_TOPK. `return_scores`: true or false, default false. Other fields
are refused, so a typo ("top_k") cannot silently fall back to the default.
Errors are {"error": message}: 400 a bad request (the message names the field), 404 an unknown
path, 405 a wrong method, 413 a body over MAX_BODY_BYTES or more than MAX_QUERIES queries, 500
a failing tool. A request line or header the HTTP parser rejects (e.g. `Content-Length: abc`)
gets uvicorn's plain-text 400 and the connection is closed: its body cannot be framed.

Built on Starlette + uvicorn: one event loop accepts and parses; searches (CPU-bound) run in a
pool of `max_concurrency` threads and further requests wait for a free thread, none is dropped.
Meant for local training runs and tests, not the open internet (no TLS, no authentication).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import socket
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mempo.envs.bm25_search import META_FILE, BM25Search
from mempo.envs.search_tool import SearchTool, title_text_to_contents

DEFAULT_TOPK = 3
MAX_TOPK = 100
MAX_QUERIES = 4096  # per request; HttpSearch sends one query per searching trajectory of a step
MAX_BODY_BYTES = 16 << 20
DEFAULT_MAX_CONCURRENCY = 4
BACKLOG = 2048  # pending connections the kernel queues before accept (stdlib's 5 caused resets)
SHUTDOWN_GRACE_S = 5.0  # in-flight requests get this long to finish on shutdown
FIELDS = ("queries", "topk", "return_scores")


class BadRequest(ValueError):
    """A request the server refuses; `status` is the 4xx code of the answer."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _show(value: Any) -> str:
    """A JSON value as the client wrote it (false, null, 3.0), cut to stay readable."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 80 else text[:77] + "..."


def parse_request(body: bytes) -> tuple[list[str], int, bool]:
    """A /retrieve body -> (queries, topk, return_scores); BadRequest names the bad field."""
    try:
        request = json.loads(body)
    except RecursionError:  # e.g. 100000 nested '[': the C decoder gives up, say so
        raise BadRequest("body nests JSON too deeply; expected "
                         '{"queries": [...], "topk": k, "return_scores": bool}') from None
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BadRequest(f"body is not valid JSON: {error}") from None
    if not isinstance(request, dict):
        raise BadRequest(f"body must be a JSON object with 'queries', got {_show(request)}")
    unknown = [key for key in request if key not in FIELDS]
    if unknown:
        raise BadRequest(f"unknown field(s) {unknown}; expected {list(FIELDS)}")
    if "queries" not in request:
        raise BadRequest("'queries' is required: a list of strings")
    queries = request["queries"]
    if not isinstance(queries, list):
        raise BadRequest(f"'queries' must be a list of strings, got {_show(queries)}")
    if len(queries) > MAX_QUERIES:
        raise BadRequest(f"'queries' holds {len(queries)} queries, over the limit of "
                         f"{MAX_QUERIES} per request; split the batch", status=413)
    for i, query in enumerate(queries):
        if not isinstance(query, str):
            raise BadRequest(f"'queries[{i}]' must be a string, got {_show(query)}")
    topk = request.get("topk", DEFAULT_TOPK)
    # bool is an int subclass in Python; JSON true/false are not counts
    if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= MAX_TOPK:
        raise BadRequest(f"'topk' must be an integer in [1, {MAX_TOPK}] (omit it for "
                         f"{DEFAULT_TOPK}), got {_show(topk)}")
    with_scores = request.get("return_scores", False)
    if not isinstance(with_scores, bool):
        raise BadRequest(f"'return_scores' must be true or false, got {_show(with_scores)}")
    return queries, topk, with_scores


async def _read_body(request: Request) -> bytes:
    """The body, refused with 413 as soon as it is known to be over MAX_BODY_BYTES."""
    declared = request.headers.get("content-length")
    if declared is not None:  # the HTTP parser has rejected non-numeric values already
        try:
            declared_bytes = int(declared)
        except ValueError:
            raise BadRequest(f"Content-Length must be a byte count, got {declared!r}") from None
        if declared_bytes > MAX_BODY_BYTES:  # refuse before reading a byte of it
            raise BadRequest(f"body of {declared_bytes} bytes is over the limit of "
                             f"{MAX_BODY_BYTES} bytes", status=413)
    chunks, size = [], 0
    try:
        async for chunk in request.stream():  # chunked bodies have no Content-Length
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise BadRequest(f"body is over the limit of {MAX_BODY_BYTES} bytes", status=413)
            chunks.append(chunk)
    except ClientDisconnect:
        raise BadRequest("client disconnected before the body was complete") from None
    return b"".join(chunks)


def _answer(tool: SearchTool, queries: list[str], topk: int, with_scores: bool) -> bytes:
    """Search and encode the reply body (runs in a pool thread: both are CPU work)."""
    result = []
    for docs in tool.search(queries, topk):
        hits = [{"id": d.id, "contents": title_text_to_contents(d.title, d.text)} for d in docs]
        if with_scores:
            hits = [{"document": h, "score": d.score} for h, d in zip(hits, docs)]
        result.append(hits)
    return json.dumps({"result": result}, ensure_ascii=False).encode("utf-8")


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def _http_error(request: Request, error: Exception) -> JSONResponse:
    """Routing errors (unknown path, wrong method) as JSON, naming the two endpoints."""
    assert isinstance(error, HTTPException)
    where = "use /retrieve (POST) or /stats (GET)"
    if error.status_code == 404:
        message = f"unknown path {request.url.path}; {where}"
    elif error.status_code == 405:
        message = f"method {request.method} not allowed on {request.url.path}; {where}"
    else:
        message = str(error.detail)
    return _error(error.status_code, message, error.headers)


async def _server_error(request: Request, error: Exception) -> JSONResponse:
    return _error(500, f"{type(error).__name__}: {error}")


def make_app(tool: SearchTool, max_concurrency: int = DEFAULT_MAX_CONCURRENCY) -> Starlette:
    """The ASGI app serving `tool`; at most `max_concurrency` searches run at once."""
    if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) \
            or max_concurrency < 1:
        raise ValueError(f"max_concurrency must be an int >= 1, got {max_concurrency!r}")
    # Threads, not the event loop: a search holds the CPU for milliseconds to seconds. The pool
    # bounds concurrent searches; extra requests queue in it (FIFO) instead of being dropped.
    pool = ThreadPoolExecutor(max_concurrency, thread_name_prefix="retrieval-search")
    counts = {"requests": 0, "queries": 0}  # answered /retrieve calls; only the loop writes it

    async def retrieve(request: Request) -> Response:
        try:
            queries, topk, with_scores = parse_request(await _read_body(request))
        except BadRequest as error:
            return _error(error.status, str(error))
        try:
            body = await asyncio.get_running_loop().run_in_executor(
                pool, _answer, tool, queries, topk, with_scores)
        except Exception as error:  # the server must answer, not drop the connection
            return _error(500, f"{type(error).__name__}: {error}")
        counts["requests"] += 1
        counts["queries"] += len(queries)
        return Response(body, media_type="application/json")

    async def stats(request: Request) -> JSONResponse:
        return JSONResponse(dict(counts, passages=len(tool) if hasattr(tool, "__len__") else None))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        yield
        pool.shutdown(wait=False, cancel_futures=True)

    # both spellings, as before: a 307 redirect for "/retrieve/" would make urllib give up
    routes = [Route(path, retrieve, methods=["POST"]) for path in ("/retrieve", "/retrieve/")]
    routes += [Route(path, stats, methods=["GET"]) for path in ("/stats", "/stats/")]
    return Starlette(routes=routes, lifespan=lifespan,
                     exception_handlers={HTTPException: _http_error, Exception: _server_error})


class _Uvicorn(uvicorn.Server):
    """uvicorn.Server that calls `on_ready` once its sockets are served."""

    def __init__(self, config: uvicorn.Config, on_ready: Callable[[], None] | None):
        super().__init__(config)
        self.on_ready = on_ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and self.on_ready is not None:
            self.on_ready()


class RetrievalServer:
    """uvicorn serving `make_app(tool)`, with the stdlib server's methods.

    The socket is bound and listening on construction (port 0 picks a free port:
    `server_port`); connections made before `serve_forever` wait in the backlog.
    `serve_forever()` blocks (run it in a thread, or in the main thread where it also stops
    gracefully on SIGINT/SIGTERM); `shutdown()`, from another thread, stops it and waits up to
    SHUTDOWN_GRACE_S for requests in flight; `server_close()` releases the socket.
    `on_ready` is called from the server's loop once it accepts connections.
    """

    def __init__(self, tool: SearchTool, host: str = "127.0.0.1", port: int = 0,
                 max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
                 on_ready: Callable[[], None] | None = None):
        app = make_app(tool, max_concurrency)
        self.socket = socket.create_server((host, port), backlog=BACKLOG)
        self.server_address = self.socket.getsockname()[:2]
        self.server_port: int = self.server_address[1]
        self.url = f"http://{host}:{self.server_port}/retrieve"
        # log_config=None: leave the host process's logging alone; warnings reach stderr
        config = uvicorn.Config(app, log_config=None, log_level="warning", access_log=False,
                                backlog=BACKLOG, timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
        self._uvicorn = _Uvicorn(config, on_ready)
        self._serving, self._stopped = threading.Event(), threading.Event()

    def serve_forever(self) -> None:
        self._serving.set()
        try:
            self._uvicorn.run(sockets=[self.socket])
        finally:
            self._stopped.set()

    def shutdown(self) -> None:
        self._uvicorn.should_exit = True  # uvicorn's main loop looks every 0.1 s
        if self._serving.is_set():
            self._stopped.wait()

    def server_close(self) -> None:
        self.socket.close()


def make_retrieval_server(tool: SearchTool, host: str = "127.0.0.1", port: int = 0,
                          max_concurrency: int = DEFAULT_MAX_CONCURRENCY) -> RetrievalServer:
    """A server (listening, not yet serving) for `tool`; port 0 picks a free port
    (`server.server_port`)."""
    return RetrievalServer(tool, host, port, max_concurrency)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", help="JSONL corpus ({id,title,text} lines)")
    parser.add_argument("--index-dir",
                        help="saved index: loaded if present, else built and saved here")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--max-concurrency", type=int, default=DEFAULT_MAX_CONCURRENCY,
                        help="searches run at once (threads); further requests wait")
    args = parser.parse_args(argv)
    if args.max_concurrency < 1:
        parser.error(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    if args.index_dir and (Path(args.index_dir) / META_FILE).is_file():
        tool = BM25Search.load(args.index_dir)
    elif args.corpus:
        tool = BM25Search.from_jsonl(args.corpus)
        if args.index_dir:
            tool.save(args.index_dir)
    else:
        parser.error("--corpus is required unless --index-dir holds a saved index")

    def ready() -> None:  # callers wait for this line: print it only once connections are served
        print(f"serving {len(tool)} passages on {server.url}", flush=True)

    server = RetrievalServer(tool, args.host, args.port, args.max_concurrency, on_ready=ready)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal: exit 0 on both
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()

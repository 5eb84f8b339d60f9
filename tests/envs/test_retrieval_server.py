"""The retrieval server under abuse: malformed framing, huge or deep bodies, bad fields,
kept-alive connections after errors, 200 concurrent clients, bounded searches, signals."""
import contextlib
import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from serving import Serving

from mempo.envs import HttpSearch, SearchServerError
from mempo.envs.retrieval_server import MAX_BODY_BYTES, MAX_QUERIES


@pytest.fixture(scope="module")
def server(world):
    with Serving(world.search_tool) as serving:
        yield serving


def _connect(port, timeout_s):
    """A kept-alive connection (http.client reuses its socket until the server closes it)."""
    return contextlib.closing(http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s))


def _post(connection, body, path="/retrieve"):
    """(status, payload) of one request on `connection` (kept alive by http.client)."""
    connection.request("POST", path, body=body)
    response = connection.getresponse()
    data = response.read()
    return response.status, json.loads(data) if data else None


def _raw_exchange(port, request, timeout_s=3.0):
    """Send raw bytes; the server's answer: up to its Content-Length, the close, or timeout_s."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(request)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
                head, end, body = answer.partition(b"\r\n\r\n")
                length = re.search(rb"content-length: *(\d+)", head, re.IGNORECASE)
                if end and length and len(body) >= int(length.group(1)):
                    break
        except (TimeoutError, ConnectionError):
            pass
    return answer


def _good_query(world):
    fact = world.questions[0].hops[0]
    return fact, json.dumps({"queries": [fact.query], "topk": 1}).encode()


@pytest.mark.parametrize("length", [b"abc", b"-1", b"1, 2", b"0x10"])
def test_malformed_content_length_is_a_400(server, length):
    answer = _raw_exchange(server.port, b"POST /retrieve HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                        b"Content-Length: " + length + b"\r\n\r\n{}")
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]


@pytest.mark.parametrize("body", [b"[" * 100_000, b'{"queries": ' + b"[" * 100_000,
                                  b'{"queries": ["x"], "topk": ' + b'{"a": ' * 50_000 + b"1" + b"}" * 50_001],
                         ids=["array", "queries", "topk"])
def test_deeply_nested_json_is_a_400(server, body):
    with _connect(server.port, timeout_s=10) as connection:
        status, payload = _post(connection, body)
    assert status == 400 and "too deeply" in payload["error"], payload


def test_body_size_limit_by_content_length_and_while_streaming(server, world):
    fact, good = _good_query(world)
    padding = MAX_BODY_BYTES - len(good)  # whitespace is valid JSON: a body of exactly the limit
    with _connect(server.port, timeout_s=30) as connection:
        status, payload = _post(connection, good + b" " * padding)
        assert status == 200 and payload["result"][0][0]["id"] == fact.doc_id
        status, payload = _post(connection, good + b" " * (padding + 1))
        assert status == 413 and str(MAX_BODY_BYTES) in payload["error"], payload
        sock = connection.sock
        # no Content-Length: http.client sends a generator chunked; the server counts as it reads
        status, payload = _post(connection, (b" " * (1 << 20) for _ in range(17)))
        assert status == 413 and str(MAX_BODY_BYTES) in payload["error"], payload
        assert connection.sock is sock  # the refused body was drained: the connection lives on
        assert _post(connection, good)[0] == 200
    # refused by its Content-Length alone: the answer comes before any byte of the body is sent
    answer = _raw_exchange(server.port, b"POST /retrieve HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                        b"Content-Length: %d\r\n\r\n" % (MAX_BODY_BYTES + 1))
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]


def test_topk_must_be_an_int_in_range_and_only_a_missing_one_means_three(server, world):
    query = world.questions[0].hops[0].query
    with _connect(server.port, timeout_s=10) as connection:
        for topk in [0, False, None, True, -1, 2.0, "3", [3], 101]:
            status, payload = _post(connection, json.dumps({"queries": [query], "topk": topk}))
            assert status == 400 and "'topk'" in payload["error"], (topk, status, payload)
            assert json.dumps(topk) in payload["error"]  # the value as the client wrote it
        status, payload = _post(connection, json.dumps({"queries": [query]}))
    assert status == 200
    assert [h["id"] for h in payload["result"][0]] == \
           [d.id for d in world.search_tool.search([query], 3)[0]]


@pytest.mark.parametrize("request_body, status, names", [
    ({"queries": ["x"], "top_k": 5}, 400, "top_k"),  # a typo must not fall back to 3
    ({"queries": ["x", 3]}, 400, "'queries[1]'"),
    ({"queries": ["x"], "return_scores": None}, 400, "'return_scores'"),
    ({"queries": ["x"], "return_scores": "yes"}, 400, "'return_scores'"),
    ({"topk": 3}, 400, "'queries' is required"),
    ({"queries": ["x"] * (MAX_QUERIES + 1)}, 413, str(MAX_QUERIES)),
], ids=["typo top_k", "queries[1] not a string", "return_scores null", "return_scores string",
        "queries missing", "too many queries"])
def test_every_field_is_validated(server, request_body, status, names):
    with _connect(server.port, timeout_s=10) as connection:
        answer = _post(connection, json.dumps(request_body))
    assert answer[0] == status and names in answer[1]["error"], answer


def test_error_then_good_request_on_one_kept_alive_connection(server, world):
    fact, good = _good_query(world)
    with _connect(server.port, timeout_s=10) as connection:
        status, payload = _post(connection, good)
        assert status == 200
        sock = connection.sock
        for bad, path, expected in [(good, "/nope", 404), (b'{"queries": [', "/retrieve", 400),
                                    (b'{"queries": ["x"], "topk": 0}', "/retrieve", 400),
                                    (b"x" * (MAX_BODY_BYTES + 1), "/retrieve", 413)]:
            status, payload = _post(connection, bad, path=path)
            assert status == expected and "error" in payload, (path, status, payload)
            status, payload = _post(connection, good)  # the bad body must not leak into this one
            assert status == 200 and payload["result"][0][0]["id"] == fact.doc_id
            assert connection.sock is sock, "the server closed the kept-alive connection"
        connection.request("GET", "/retrieve")
        response = connection.getresponse()
        assert response.status == 405 and "POST" in json.loads(response.read())["error"]
        connection.request("GET", "/stats")
        stats = json.loads(connection.getresponse().read())
        assert connection.sock is sock
    assert stats["passages"] == len(world.corpus) and stats["requests"] >= 5


def test_200_concurrent_clients_no_resets_all_correct(server, world):
    queries = [hop.query for q in world.questions[:60] for hop in q.hops][:60]
    expected = {q: [d.id for d in docs] for q, docs in zip(queries, world.search_tool.search(queries, 3))}
    clients, per_client = 200, 3
    start = threading.Barrier(clients, timeout=30)  # all connect at once: the backlog is hit
    errors, wrong = [], []

    def client(i):
        search = HttpSearch(server.url, timeout_s=30, retries=0)  # no retries: a reset is an error
        start.wait()
        for j in range(per_client):
            query = queries[(i * per_client + j) % len(queries)]
            try:
                docs = search.search([query], 3)
            except SearchServerError as error:
                errors.append(str(error))
                continue
            if [d.id for d in docs[0]] != expected[query]:
                wrong.append(query)

    began = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "clients still waiting after 60 s"
    assert not errors, f"{len(errors)} failed requests, e.g. {errors[:3]}"
    assert not wrong, f"{len(wrong)} wrong answers, e.g. {wrong[:3]}"
    assert time.monotonic() - began < 20


class _CountingTool:
    """Sleeps in search and records how many searches ran at the same time."""

    def __init__(self, delay_s):
        self.delay_s, self.running, self.most, self.calls = delay_s, 0, 0, 0
        self.lock = threading.Lock()

    def search(self, queries, top_k):
        with self.lock:
            self.running += 1
            self.calls += 1
            self.most = max(self.most, self.running)
        time.sleep(self.delay_s)
        with self.lock:
            self.running -= 1
        return [[] for _ in queries]


def test_searches_are_bounded_and_extra_requests_wait():
    tool = _CountingTool(delay_s=0.2)
    with Serving(tool, max_concurrency=2) as serving:
        answers = []

        def client():
            with _connect(serving.port, timeout_s=30) as connection:
                answers.append(_post(connection, b'{"queries": ["x"]}'))

        threads = [threading.Thread(target=client) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
    assert answers == [(200, {"result": [[]]})] * 8  # none dropped
    assert tool.calls == 8 and tool.most == 2


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_command_line_server_stops_cleanly(world_corpus_file, world, stop):
    process = subprocess.Popen(
        [sys.executable, "-m", "mempo.envs.retrieval_server", "--corpus", str(world_corpus_file),
         "--host", "127.0.0.1", "--port", "0", "--max-concurrency", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watchdog = threading.Timer(30, process.kill)  # bounds readline if the server hangs
    watchdog.start()
    try:
        line = process.stdout.readline()
        match = re.search(rf"serving {len(world.corpus)} passages on (http://127\.0\.0\.1:\d+/retrieve)",
                          line)
        assert match, f"unexpected server output: {line!r}"
        fact = world.questions[0].hops[0]
        assert HttpSearch(match.group(1), timeout_s=10, retries=0).search([fact.query], 1)[0][0].id \
            == fact.doc_id
        process.send_signal(stop)
        assert process.wait(timeout=15) == 0, process.stdout.read()
    finally:
        watchdog.cancel()
        process.kill()
        process.wait()

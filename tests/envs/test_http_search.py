"""HttpSearch against a live retrieval server on 127.0.0.1 (bm25 tool), plus failures."""
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
from serving import Serving

from mempo.envs import BM25Search, HttpSearch, SearchServerError


@pytest.fixture(scope="module")
def bm25_server(world_corpus_file):
    with Serving(BM25Search.from_jsonl(world_corpus_file)) as serving:
        yield serving


def test_client_matches_local_tool(world, bm25_server):
    client = HttpSearch(bm25_server.url, timeout_s=5, retries=0)
    queries = [q.task.questions[0] for q in world.questions[:30]] + ["", "Zoë 東京"]
    remote, local = client.search(queries, 3), world.search_tool.search(queries, 3)
    assert [[(d.id, d.title, d.text) for d in docs] for docs in remote] == \
           [[(d.id, d.title, d.text) for d in docs] for docs in local]
    assert all(abs(r.score - loc.score) < 1e-5 for rs, ls in zip(remote, local) for r, loc in zip(rs, ls))


def test_search_r1_wire_format(bm25_server, world):
    def post(payload):
        request = urllib.request.Request(bm25_server.url, data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())

    fact = world.questions[0].hops[0]
    scored = post({"queries": [fact.query], "topk": 2, "return_scores": True})["result"]
    assert len(scored) == 1 and len(scored[0]) == 2
    assert scored[0][0]["document"] == {"id": fact.doc_id,
                                        "contents": f'"{fact.subject}"\n{fact.sentence}'}
    assert isinstance(scored[0][0]["score"], float)
    bare = post({"queries": [fact.query], "topk": 1})["result"]
    assert bare[0][0]["id"] == fact.doc_id and "score" not in bare[0][0]


def test_bad_request_is_a_clear_client_error(bm25_server):
    client = HttpSearch(bm25_server.url.replace("/retrieve", "/nope"), timeout_s=5, retries=2,
                        backoff_s=0.01)
    with pytest.raises(SearchServerError, match="1 attempt.*HTTP 404.*use /retrieve"):
        client.search(["x"], 1)
    request = urllib.request.Request(bm25_server.url, data=b'{"queries": "x"}')
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=5)
    assert error.value.code == 400 and b"queries" in error.value.read()


class _FailingTool:
    def __init__(self):
        self.calls = 0

    def search(self, queries, top_k):
        self.calls += 1
        raise RuntimeError("index corrupted")


def test_server_error_is_retried_then_reported():
    tool = _FailingTool()
    with Serving(tool) as serving:
        client = HttpSearch(serving.url, timeout_s=5, retries=2, backoff_s=0.01)
        with pytest.raises(SearchServerError, match="3 attempt.*HTTP 500.*index corrupted"):
            client.search(["x"], 1)
    assert tool.calls == 3


class _SlowTool:
    def __init__(self, delay_s, tool=None):
        self.delay_s, self.calls, self.tool = delay_s, 0, tool

    def search(self, queries, top_k):
        self.calls += 1
        if self.calls == 1:
            time.sleep(self.delay_s)
        return self.tool.search(queries, top_k) if self.tool else [[] for _ in queries]


def test_timeout_then_retry_succeeds(world):
    tool = _SlowTool(1.0, world.search_tool)
    with Serving(tool) as serving:
        client = HttpSearch(serving.url, timeout_s=0.3, retries=1, backoff_s=0.01)
        assert client.search([world.questions[0].hops[0].query], 1)[0][0].id == \
            world.questions[0].hops[0].doc_id
    assert tool.calls == 2


def test_timeout_without_retries():
    with Serving(_SlowTool(1.0)) as serving:
        client = HttpSearch(serving.url, timeout_s=0.2, retries=0)
        started = time.monotonic()
        with pytest.raises(SearchServerError, match="timed out"):
            client.search(["x"], 1)
        assert time.monotonic() - started < 0.9


def test_unreachable_server():
    with socket.socket() as probe:  # a port nobody listens on once this socket closes
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = HttpSearch(f"http://127.0.0.1:{port}/retrieve", timeout_s=1, retries=2, backoff_s=0.01)
    with pytest.raises(SearchServerError, match=f"127.0.0.1:{port}.*3 attempt.*unreachable"):
        client.search(["x"], 1)


def test_bad_client_arguments():
    with pytest.raises(ValueError, match="url"):
        HttpSearch("127.0.0.1:8000")
    with pytest.raises(ValueError, match="timeout_s"):
        HttpSearch("http://x/retrieve", timeout_s=0)


def test_command_line_server(world, world_corpus_file, tmp_path):
    """`python -m mempo.envs.retrieval_server` builds, saves, serves; a restart loads the index."""
    import re
    import subprocess
    import sys

    index_dir = tmp_path / "index"
    for _ in range(2):  # first run builds and saves the index, second run loads it
        process = subprocess.Popen(
            [sys.executable, "-m", "mempo.envs.retrieval_server", "--corpus", str(world_corpus_file),
             "--index-dir", str(index_dir), "--host", "127.0.0.1", "--port", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        watchdog = threading.Timer(30, process.kill)  # bounds readline if the server hangs
        watchdog.start()
        try:
            line = process.stdout.readline()  # the server prints its URL once it listens
            match = re.search(r"(http://127\.0\.0\.1:\d+/retrieve)", line)
            assert match, f"unexpected server output: {line!r}"
            fact = world.questions[0].hops[0]
            docs = HttpSearch(match.group(1), timeout_s=10, retries=0).search([fact.query], 1)
            assert docs[0][0].id == fact.doc_id and docs[0][0].text == fact.sentence
        finally:
            watchdog.cancel()
            process.terminate()
            process.wait(timeout=10)
        assert (index_dir / "mempo_index.json").is_file()


class _ShortTool:
    def search(self, queries, top_k):
        return []  # one list short per query: a broken server


def test_malformed_answer_is_reported():
    with Serving(_ShortTool()) as serving:
        with pytest.raises(SearchServerError, match="0 result lists for 2 queries"):
            HttpSearch(serving.url, timeout_s=5, retries=0).search(["a", "b"], 1)

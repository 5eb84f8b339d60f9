"""A retrieval server in a thread of the test process, on a free loopback port."""
import threading

from mempo.envs.retrieval_server import make_retrieval_server


class Serving:
    """`with Serving(tool) as s:` -> s.url, s.port while the server runs."""

    def __init__(self, tool, **kwargs):
        self.server = make_retrieval_server(tool, "127.0.0.1", 0, **kwargs)
        self.port = self.server.server_port
        self.url = f"http://127.0.0.1:{self.port}/retrieve"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

"""`http` search tool: a client for Search-R1-style retrieval servers.

Wire format (POST {url}, JSON; the URL usually ends in /retrieve):
    request:  {"queries": [str, ...], "topk": int, "return_scores": true}
    response: {"result": [[{"document": {"id": str, "contents": str}, "score": float}, ...], ...]}
`contents` is `"Title"\\ntext` (Search-R1's wiki corpus convention); documents that carry
`title`/`text` fields, and responses without scores (a bare document per hit), are accepted.
"""
from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from mempo.envs.search_tool import Doc, check_search_args, contents_to_title_text


class SearchServerError(RuntimeError):
    """The retrieval server could not be reached or answered with an error."""


def doc_from_hit(hit: Any) -> Doc:
    """One element of a result list -> Doc; ValueError on an unknown shape."""
    if isinstance(hit, dict) and "document" in hit:
        document, score = hit["document"], hit.get("score")
    else:
        document, score = hit, None
    if not isinstance(document, dict):
        raise ValueError(f"unexpected hit {hit!r:.200}")
    if "contents" in document:
        title, text = contents_to_title_text(str(document["contents"]))
    elif "text" in document:
        title, text = str(document.get("title") or ""), str(document["text"])
    else:
        raise ValueError(f"document has neither 'contents' nor 'text': {document!r:.200}")
    return Doc(id=str(document.get("id", "")), title=title, text=text,
               score=None if score is None else float(score))


class HttpSearch:
    """Client of a retrieval server; retries transient failures with exponential backoff.

    url: full endpoint, e.g. "http://127.0.0.1:8000/retrieve".
    timeout_s: per attempt. retries: extra attempts after the first on connection errors,
    timeouts and 5xx answers (4xx answers fail at once). backoff_s: wait before retry i is
    backoff_s * 2**i.
    """

    def __init__(self, url: str, timeout_s: float = 10.0, retries: int = 3,
                 backoff_s: float = 0.5):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {url!r}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if retries < 0 or backoff_s < 0:
            raise ValueError(f"retries and backoff_s must be >= 0, got {retries}, {backoff_s}")
        self.url, self.timeout_s, self.retries, self.backoff_s = url, timeout_s, retries, backoff_s

    def search(self, queries: Sequence[str], top_k: int) -> list[list[Doc]]:
        queries = check_search_args(queries, top_k)
        if not queries:
            return []
        body = json.dumps({"queries": queries, "topk": top_k, "return_scores": True}).encode()
        payload = self._post(body)
        result = payload.get("result") if isinstance(payload, dict) else None
        if not isinstance(result, list) or len(result) != len(queries):
            count = len(result) if isinstance(result, list) else "no"
            raise SearchServerError(f"{self.url} answered {count} result lists for "
                                    f"{len(queries)} queries")
        try:
            return [[doc_from_hit(hit) for hit in hits][:top_k] for hits in result]
        except (ValueError, TypeError) as error:
            raise SearchServerError(f"{self.url} answered an unexpected format: {error}") from None

    def _post(self, body: bytes) -> Any:
        last_error = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=body, method="POST",
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as error:
                detail = error.read()[:300].decode("utf-8", "replace")
                last_error = f"HTTP {error.code}: {detail}"
                if error.code < 500:
                    break
            except TimeoutError:
                last_error = f"timed out after {self.timeout_s}s"
            except urllib.error.URLError as error:
                if isinstance(error.reason, (socket.timeout, TimeoutError)):
                    last_error = f"timed out after {self.timeout_s}s"
                else:
                    last_error = f"unreachable ({error.reason})"
            except (ConnectionError, json.JSONDecodeError) as error:
                last_error = f"{type(error).__name__}: {error}"
        raise SearchServerError(f"retrieval server {self.url} failed after "
                                f"{attempt + 1} attempt(s): {last_error}")

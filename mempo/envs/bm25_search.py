"""`bm25` search tool: an in-process BM25 index (bm25s) over a JSONL passage corpus.

Corpus format: one JSON object per line, `{"id": str, "title": str, "text": str}`; Search-R1
corpora (`{"id", "contents": "\"Title\"\ntext"}`, e.g. wiki-18.jsonl) are read as well.
The index scores `title + " " + text`, lowercased, English stopwords removed, no stemming.
Passages are not held as Python objects: the corpus file is memory-mapped and a line is
decoded only when it is returned, so a million-passage corpus costs little more than the
sparse index itself.
"""
from __future__ import annotations

import json
import mmap
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import bm25s
import numpy as np

from mempo.envs.search_tool import Doc, check_search_args, contents_to_title_text

INDEX_FORMAT = "mempo-bm25-v1"
DOCS_FILE = "docs.jsonl"
OFFSETS_FILE = "doc_offsets.npy"
META_FILE = "mempo_index.json"
STOPWORDS = "en"


def doc_from_json(line: str | bytes, where: str) -> Doc:
    """Decode one corpus line; ValueError names the line when a field is missing."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not valid JSON ({error.msg})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object")
    if "id" not in record:
        raise ValueError(f"{where}: missing 'id'")
    if isinstance(record.get("text"), str):
        return Doc(id=str(record["id"]), title=str(record.get("title") or ""),
                   text=record["text"])
    if isinstance(record.get("contents"), str):
        title, text = contents_to_title_text(record["contents"])
        return Doc(id=str(record["id"]), title=title, text=text)
    raise ValueError(f"{where}: needs a str 'text' (or Search-R1 'contents') field")


class _MappedJsonl:
    """Random access to the lines of a JSONL file via byte offsets [N+1] and mmap."""

    def __init__(self, path: Path, offsets: np.ndarray):
        self.path, self.offsets = path, offsets
        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if \
                os.path.getsize(path) else b""

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> Doc:
        line = self._map[self.offsets[i]:self.offsets[i + 1]]
        return doc_from_json(line, f"{self.path} passage {i}")


def _scan_corpus(path: Path) -> tuple[np.ndarray, list[str]]:
    """Byte offsets [N+1] of the non-blank lines and their index texts, validating each."""
    offsets, texts = [], []
    position = 0
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                doc = doc_from_json(line, f"{path} line {number}")
                offsets.append(position)
                texts.append(f"{doc.title} {doc.text}")
            position += len(line)
    if not texts:
        raise ValueError(f"corpus {path} holds no passages")
    return np.asarray(offsets + [position], dtype=np.int64), texts


def tokenize_for_bm25(texts: list[str]) -> list[list[str]]:
    """The index's analyser: lowercase words of 2+ chars, English stopwords removed."""
    return bm25s.tokenize(texts, stopwords=STOPWORDS, return_ids=False, show_progress=False)


class BM25Search:
    """BM25 tool over a JSONL corpus. Build with `from_jsonl`/`from_docs`, or `load` a saved index.

    The corpus lines must not change after building (offsets point into the file); `save`
    copies them next to the index so a saved index is self-contained.
    """

    def __init__(self, retriever: bm25s.BM25, docs: _MappedJsonl | list[Doc]):
        self._retriever = retriever
        self._docs = docs
        self._vocab = retriever.vocab_dict

    def __len__(self) -> int:
        return len(self._docs)

    @property
    def bm25(self) -> bm25s.BM25:
        """The underlying bm25s index (read-only use)."""
        return self._retriever

    @classmethod
    def from_jsonl(cls, corpus_path: str | os.PathLike, k1: float = 1.5,
                   b: float = 0.75) -> BM25Search:
        path = Path(corpus_path)
        if not path.is_file():
            raise ValueError(f"corpus_path {path} is not a file")
        offsets, texts = _scan_corpus(path)
        retriever = cls._index(texts, k1, b)
        return cls(retriever, _MappedJsonl(path, offsets))

    @classmethod
    def from_docs(cls, docs: Iterable[Doc], k1: float = 1.5, b: float = 0.75) -> BM25Search:
        docs = list(docs)
        if not docs:
            raise ValueError("docs must hold at least one Doc")
        retriever = cls._index([f"{d.title} {d.text}" for d in docs], k1, b)
        return cls(retriever, docs)

    @staticmethod
    def _index(texts: list[str], k1: float, b: float) -> bm25s.BM25:
        tokenized = bm25s.tokenize(texts, stopwords=STOPWORDS, show_progress=False)
        del texts
        retriever = bm25s.BM25(k1=k1, b=b)
        retriever.index(tokenized, show_progress=False)
        return retriever

    def save(self, index_dir: str | os.PathLike) -> None:
        """Write the index, the passages and their offsets into `index_dir`."""
        out = Path(index_dir)
        out.mkdir(parents=True, exist_ok=True)
        self._retriever.save(str(out), show_progress=False)
        if isinstance(self._docs, _MappedJsonl):
            if self._docs.path.resolve() != (out / DOCS_FILE).resolve():
                shutil.copyfile(self._docs.path, out / DOCS_FILE)
            offsets = self._docs.offsets
        else:
            lines = [json.dumps({"id": d.id, "title": d.title, "text": d.text},
                                ensure_ascii=False) + "\n" for d in self._docs]
            encoded = [line.encode("utf-8") for line in lines]
            (out / DOCS_FILE).write_bytes(b"".join(encoded))
            offsets = np.concatenate([[0], np.cumsum([len(e) for e in encoded])])
        np.save(out / OFFSETS_FILE, np.asarray(offsets, dtype=np.int64))
        (out / META_FILE).write_text(json.dumps({"format": INDEX_FORMAT,
                                                 "num_docs": len(self._docs)}))

    @classmethod
    def load(cls, index_dir: str | os.PathLike, mmap_index: bool = True) -> BM25Search:
        path = Path(index_dir)
        meta_path = path / META_FILE
        if not meta_path.is_file():
            raise ValueError(f"index_dir {path} holds no saved mempo BM25 index ({META_FILE})")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != INDEX_FORMAT:
            raise ValueError(f"index_dir {path}: format {meta.get('format')!r}, "
                             f"expected {INDEX_FORMAT!r}")
        retriever = bm25s.BM25.load(str(path), mmap=mmap_index, show_progress=False)
        offsets = np.load(path / OFFSETS_FILE)
        if len(offsets) - 1 != meta["num_docs"]:
            raise ValueError(f"index_dir {path}: {OFFSETS_FILE} does not match the index")
        return cls(retriever, _MappedJsonl(path / DOCS_FILE, offsets))

    def search(self, queries: Sequence[str], top_k: int) -> list[list[Doc]]:
        """Ranked docs per query (best first, only docs sharing a term with the query)."""
        queries = check_search_args(queries, top_k)
        tokenized = tokenize_for_bm25(queries) if queries else []
        results = []
        for tokens in tokenized:
            known = [t for t in tokens if t in self._vocab]
            results.append(self._top_docs(known, top_k) if known else [])
        return results

    def _top_docs(self, tokens: list[str], top_k: int) -> list[Doc]:
        scores = self._retriever.get_scores(tokens)  # dense [num_docs], ~1 ms at 1M docs
        # Select among matching docs only: argpartition over a million mostly-zero scores
        # is ~30x slower than the scoring itself (ties degrade the selection).
        candidates = np.flatnonzero(scores > 0)
        if len(candidates) > top_k:
            candidates = candidates[np.argpartition(-scores[candidates], top_k - 1)[:top_k]]
        order = np.lexsort((candidates, -scores[candidates]))  # by score, ties by position
        return [self._doc(int(i), float(scores[i])) for i in candidates[order]]

    def _doc(self, index: int, score: float) -> Doc:
        doc = self._docs[index]
        return Doc(id=doc.id, title=doc.title, text=doc.text, score=score)

"""Retrieval data: pairs / triplets files (jsonl or csv) and BEIR folders (corpus.jsonl, queries.jsonl, qrels/).

Errors name the file and line, never the text. Queries without a relevant document are counted and left out of
evaluation (as sentence-transformers' evaluator does); empty queries or documents are counted and skipped.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cmft.data.readers import existing, iter_records, text_lines
from cmft.errors import CmftError
from cmft.recipe import DataConfig, FolderSplit

QRELS_NAMES = {"train": ("train",), "dev": ("dev", "validation", "val"), "test": ("test",)}


class PairFields(Protocol):
    """The columns of a pairs / triplets file (the `retrieval` recipe section, cmft.tasks.retrieval)."""

    query_field: str
    document_field: str
    negative_field: str


@dataclass
class RetrievalSplit:
    name: str
    source: str
    queries: dict[str, str] = field(default_factory=dict)
    corpus: dict[str, str] = field(default_factory=dict)
    relevant: dict[str, set[str]] = field(default_factory=dict)
    """Query id → ids of its relevant documents (qrels score > 0)."""
    negatives: dict[str, list[str]] = field(default_factory=dict)
    """Query id → ids of given negative documents (triplets files)."""
    skipped: Counter = field(default_factory=Counter)

    @property
    def evaluated_queries(self) -> list[str]:
        return [qid for qid in self.queries if self.relevant.get(qid)]

    def training_rows(self) -> list[dict[str, str]]:
        """(anchor, positive[, negative]) rows: one per relevant pair; a negative when every query has one."""
        with_negative = all(self.negatives.get(qid) for qid in self.evaluated_queries)
        rows = []
        for qid in self.evaluated_queries:
            for index, cid in enumerate(sorted(self.relevant[qid])):
                row = {"anchor": self.queries[qid], "positive": self.corpus[cid]}
                if with_negative:
                    negatives = self.negatives[qid]
                    row["negative"] = self.corpus[negatives[index % len(negatives)]]
                rows.append(row)
        return rows

    def counts(self) -> dict[str, int]:
        return {
            f"n_queries_{self.name}": len(self.evaluated_queries),
            f"n_documents_{self.name}": len(self.corpus),
            **{f"n_{reason}_{self.name}": count for reason, count in sorted(self.skipped.items())},
        }


def read_retrieval_split(data: DataConfig, name: str, settings: PairFields) -> RetrievalSplit | None:
    """Read `data.<name>`: a BEIR folder (its qrels/<name>.tsv), a BEIR qrels file, or a pairs/triplets file."""
    source = getattr(data, name)
    if source is None:
        return None
    if isinstance(source, FolderSplit):
        raise CmftError(f"data.{name}: retrieval reads a pairs/triplets file or a BEIR folder, not texts + labels")
    path = existing(source, f"data.{name}")
    if path.is_dir():
        qrels = _qrels_file(path, name)
        split = _from_beir(path, qrels, name)
    elif path.parent.name == "qrels" and (path.parent.parent / "corpus.jsonl").is_file():
        split = _from_beir(path.parent.parent, path, name)
    else:
        split = _from_pairs(path, data, settings, name)
    if not split.evaluated_queries:
        raise CmftError(f"data.{name}: {split.source}: no query with a relevant document")
    return split


def _qrels_file(folder: Path, name: str) -> Path:
    for stem in QRELS_NAMES[name]:
        candidate = folder / "qrels" / f"{stem}.tsv"
        if candidate.is_file():
            return candidate
    if not (folder / "corpus.jsonl").is_file():
        raise CmftError(f"data.{name}: {folder}: not a BEIR folder (needs corpus.jsonl, queries.jsonl, qrels/)")
    raise CmftError(f"data.{name}: {folder}: no qrels/{QRELS_NAMES[name][0]}.tsv (point data.{name} at a qrels file)")


def _jsonl_by_id(path: Path, split: RetrievalSplit, with_title: bool) -> dict[str, str]:
    if not path.is_file():
        raise CmftError(f"{path}: file not found (a BEIR folder needs corpus.jsonl and queries.jsonl)")
    texts: dict[str, str] = {}
    empty = 0
    for number, record in iter_records(path, "jsonl"):
        identifier = record.get("_id")
        if identifier is None or not isinstance(record.get("text", ""), str):
            raise CmftError(f"{path}: line {number}: needs an `_id` and a string `text`")
        identifier = str(identifier)
        if identifier in texts:
            raise CmftError(f"{path}: line {number}: duplicate _id {identifier!r}")
        title = (record.get("title") or "") if with_title else ""
        text = f"{title} {record.get('text') or ''}".strip()
        texts[identifier] = text
        empty += not text
    split.skipped[f"empty_{path.stem}"] += empty
    return texts


def _from_beir(folder: Path, qrels: Path, name: str) -> RetrievalSplit:
    split = RetrievalSplit(name=name, source=str(qrels))
    corpus = _jsonl_by_id(folder / "corpus.jsonl", split, with_title=True)
    queries = _jsonl_by_id(folder / "queries.jsonl", split, with_title=False)
    try:
        lines = qrels.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise CmftError(f"{qrels}: not a UTF-8 text file") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) == 4:  # TREC style: query 0 doc score
            parts = [parts[0], parts[2], parts[3]]
        if len(parts) != 3:
            raise CmftError(f"{qrels}: line {number}: expected query-id<TAB>corpus-id<TAB>score")
        qid, cid, score = (p.strip() for p in parts)
        if number == 1 and not _is_number(score):
            continue  # header
        if not _is_number(score):
            raise CmftError(f"{qrels}: line {number}: score {score!r} is not a number")
        if qid not in queries:
            raise CmftError(f"{qrels}: line {number}: query {qid!r} is not in queries.jsonl")
        if cid not in corpus:
            raise CmftError(f"{qrels}: line {number}: document {cid!r} is not in corpus.jsonl")
        split.queries.setdefault(qid, queries[qid])
        if float(score) > 0 and corpus[cid]:
            split.relevant.setdefault(qid, set()).add(cid)
    split.corpus = {cid: text for cid, text in corpus.items() if text}
    split.skipped["queries_without_relevant"] = sum(1 for qid in split.queries if not split.relevant.get(qid))
    split.skipped["empty_queries"] = sum(1 for qid in split.queries if not split.queries[qid])
    split.queries = {qid: text for qid, text in split.queries.items() if text}
    return split


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def _text_list(value: Any, where: str, field_name: str) -> list[str]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, str) for v in values):
        raise CmftError(f"{where}: field {field_name!r} must be a string or a list of strings")
    return [v for v in values if v.strip()]


def _from_pairs(path: Path, data: DataConfig, settings: PairFields, name: str) -> RetrievalSplit:
    """Each row: a query and its relevant document (and optional negatives). Identical texts share one id."""
    split = RetrievalSplit(name=name, source=str(path))
    query_ids: dict[str, str] = {}
    doc_ids: dict[str, str] = {}

    def doc_id(text: str) -> str:
        if text not in doc_ids:
            doc_ids[text] = f"d{len(doc_ids)}"
            split.corpus[doc_ids[text]] = text
        return doc_ids[text]

    for number, record in iter_records(path, data.format):
        where = f"{path}: line {number}"
        for key in (settings.query_field, settings.document_field):
            if key not in record:
                raise CmftError(
                    f"{where}: no field {key!r} (set retrieval.query_field / retrieval.document_field; "
                    f"fields here: {', '.join(sorted(record))[:120]})"
                )
        query, document = record[settings.query_field], record[settings.document_field]
        if not isinstance(query, str) or not isinstance(document, str):
            raise CmftError(f"{where}: the query and document fields must be strings")
        negatives = _text_list(record.get(settings.negative_field), where, settings.negative_field)
        if not query.strip():
            split.skipped["empty_queries"] += 1
            continue
        if not document.strip():
            split.skipped["empty_documents"] += 1
            continue
        if query not in query_ids:
            query_ids[query] = f"q{len(query_ids)}"
            split.queries[query_ids[query]] = query
        qid = query_ids[query]
        split.relevant.setdefault(qid, set()).add(doc_id(document))
        if negatives:
            split.negatives.setdefault(qid, []).extend(doc_id(text) for text in negatives)
    return split


def corpus_file_texts(path: Path) -> list[tuple[str, str]]:
    """(id, text) documents of a search corpus: BEIR-style corpus.jsonl, other jsonl (`id`, `text`), or .txt lines."""
    if path.suffix == ".txt":
        return [(str(n), line) for n, line in enumerate(text_lines(path), 1) if line.strip()]
    documents = []
    for number, record in iter_records(path, "jsonl"):
        identifier = record.get("_id", record.get("id", number))
        text = f"{record.get('title') or ''} {record.get('text') or ''}".strip()
        if text:
            documents.append((str(identifier), text))
    return documents

"""`embedforge search index|query`: D2LLM retrieval with a trained student (see toolkit/search)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from toolkit.errors import InputError


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("search", help="D2LLM search: index passages once, query with the IEM")
    sub = p.add_subparsers(dest="search_command", required=True)
    i = sub.add_parser("index", help="encode passages (embeddings + IEM projections) into an index folder")
    i.add_argument("--model", required=True, metavar="DIR", help="D2LLM student folder (a d2llm stage's final/)")
    i.add_argument("--passages", required=True, metavar="FILE", help="text file (one per line) or JSONL with text[, id]")
    i.add_argument("--output", required=True, metavar="DIR", help="index folder to write")
    i.add_argument("--batch-size", type=int, default=32, help="passages per forward pass")
    i.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    i.set_defaults(func=_index)
    q = sub.add_parser("query", help="top-k passages for queries (first-stage + IEM rerank, or IEM scan)")
    q.add_argument("--index", required=True, metavar="DIR", help="folder written by `search index`")
    q.add_argument("--query", action="append", default=[], help="a query (repeatable)")
    q.add_argument("--queries", default=None, metavar="FILE", help="text file or JSONL of queries")
    q.add_argument("--k", type=int, default=10, help="passages returned per query")
    q.add_argument("--mode", choices=["rerank", "scan"], default="rerank",
                   help="rerank: cosine first stage, IEM rerank; scan: the IEM over every passage")
    q.add_argument("--first-stage", type=int, default=100, help="candidates reranked per query (mode rerank)")
    q.add_argument("--instruction", default=None, help="query instruction (attended, not pooled)")
    q.add_argument("--symmetric", action="store_true", help="the IEM's symmetric branch (NLI / STS-like tasks)")
    q.set_defaults(func=_query)
    return p


def _records(path: str) -> list[dict]:
    from data_pipelines.records import BadRecord
    from data_pipelines.writer import open_input

    out = []
    for n, record in open_input(path, "text", "text")[2]():
        if isinstance(record, BadRecord) or not isinstance(record.get("text"), str) or not record["text"].strip():
            raise InputError(f"{path}:{n}: expected a record with a non-empty string field 'text'")
        out.append(record)
    if not out:
        raise InputError(f"{path}: no texts")
    return out


def _index(args: argparse.Namespace) -> int:
    from toolkit.search.index import build_index

    records = _records(args.passages)
    ids = [str(r.get("id", n)) for n, r in enumerate(records)]
    build_index(args.model, [r["text"] for r in records], args.output, ids=ids, batch_size=args.batch_size,
                overwrite=args.overwrite)
    print(f"indexed {len(records)} passages into {args.output}")
    return 0


def _query(args: argparse.Namespace) -> int:
    from toolkit.search.index import SearchIndex

    queries = list(args.query) + ([r["text"] for r in _records(args.queries)] if args.queries else [])
    if not queries:
        raise InputError("search query: give --query TEXT or --queries FILE")
    index = SearchIndex(Path(args.index))
    for query, hits in zip(queries, index.search(queries, args.k, mode=args.mode, first_stage=args.first_stage,
                                                 instruction=args.instruction, symmetric=args.symmetric)):
        print(json.dumps({"query": query, "hits": [{"id": h.id, "score": round(h.score, 5), "text": h.text}
                                                   for h in hits]}, ensure_ascii=False))
    return 0

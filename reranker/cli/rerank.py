"""`reranker rerank`: rank documents for one query and print them (a table, or the Jina API's JSON)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from reranker.cli.common import add_chunk_args, add_model_args, chunking_option, load_reranker
from reranker.errors import RerankerError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rerank", help="rank documents for one query")
    add_model_args(p)
    p.add_argument("-q", "--query", help="the query the documents are ranked for")
    p.add_argument("--image-query", metavar="PATH", help="an image as the query (instead of -q)")
    p.add_argument("-d", "--document", dest="documents", action="append", help="a document (repeatable)")
    p.add_argument("--image", dest="images", metavar="PATH", action="append",
                   help="an image document (repeatable; ranked with the -d and -f documents)")
    p.add_argument("-f", "--file", help="documents, one per line ('-': from stdin), or a .jsonl of {\"text\": ...}")
    p.add_argument("--pdf", dest="pdfs", metavar="FILE", action="append",
                   help="a PDF whose pages are image documents, one per page, shown as FILE#PAGE (pages from 1; repeatable)")
    p.add_argument("--max-pages", type=int, default=None,
                   help="pages one --pdf file may have at most (default 1000); a longer file is an error")
    p.add_argument("--mmproj", metavar="PATH",
                   help="the vision projector for images (default: the mmproj-*.gguf beside the GGUF; for a Hub model, the repo's mmproj*.gguf, downloaded on the first image)")
    p.add_argument("--top-n", type=int, default=None, help="show only the best N (N >= 1)")
    p.add_argument("--json", action="store_true", help="print the Jina rerank API's JSON response")
    add_chunk_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from reranker.api import check_options

    check_options(top_k=args.top_n)
    if args.max_pages is not None and not args.pdfs:
        raise RerankerError("--max-pages applies to --pdf files; add --pdf FILE or drop it")
    chunking = chunking_option(args)
    if (args.query is None) == (args.image_query is None):
        raise RerankerError("give the query as -q TEXT or as --image-query PATH (one of the two)")
    query = args.query if args.query is not None else {"image": args.image_query}
    docs = [{"text": d} for d in [*(args.documents or []), *(read_documents(args.file) if args.file else [])]]
    docs += [{"image": path} for path in args.images or []]
    docs += pdf_documents(args.pdfs or [], args.max_pages)
    if not docs:
        raise RerankerError("no documents: give -d DOC, --image PATH or --pdf FILE (repeatable), or -f FILE")
    reranker = load_reranker(args)
    ranked = reranker.rank(query, docs, top_k=args.top_n, return_documents=True, chunking=chunking)
    if args.json:
        out = {"model": args.model, "usage": {"total_tokens": reranker.last_usage.tokens},
               "results": [{"index": r["corpus_id"], "relevance_score": r["score"],
                            "document": {k: r[k] for k in ("text", "image", "pdf", "page") if k in r},
                            **{k: r[k] for k in ("chunks", "best_chunk") if k in r}}
                           for r in ranked]}
        json.dump(out, sys.stdout, ensure_ascii=False, indent=2)
        sys.stdout.write("\n")
        return
    print(f"{'rank':>4}  {'index':>5}  {'score':>8}  " + (f"{'chunk':>7}  " if chunking else "") + "document")
    for n, r in enumerate(ranked, 1):
        text = " ".join(r["text"].split()) if "text" in r else f"[image] {r['image']}" if "image" in r else \
            f"[pdf] {r['pdf']}#{r['page']}"
        best = f"{r['best_chunk'] + 1:>3}/{r['chunks']:<3}  " if chunking else ""
        print(f"{n:>4}  {r['corpus_id']:>5}  {r['score']:8.4f}  {best}{text[:100] + ('…' if len(text) > 100 else '')}")


def pdf_documents(paths: list[str], max_pages: int | None) -> list[dict]:
    """`{"pdf": path, "page": n}` for every page of each file (their page counts read now, nothing rendered)."""
    if not paths:
        return []
    from reranker.images.pdf import MAX_PAGES, pdf_pages

    return [item for path in paths for item in pdf_pages(path, max_pages=MAX_PAGES if max_pages is None else max_pages)]


def read_documents(path: str | Path) -> list[str]:
    """Documents from a text file (one per line, blank ones too, so index i is line i + 1) or a `.jsonl` file of
    `{"text": ...}` objects (blank lines skipped)."""
    p = Path(path)
    if str(path) == "-":  # one document per line, as from a file without a .jsonl suffix
        if sys.stdin is None:
            raise RerankerError("-f -: standard input is closed; give the documents in a file, -f FILE")
        p, raw = Path("stdin"), sys.stdin.buffer.read()
    else:
        try:
            raw = p.read_bytes()
        except OSError as e:
            raise RerankerError(f"cannot read documents file {p}: {e.strerror}") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RerankerError(f"{p} is not valid UTF-8 (byte {e.start}); re-encode it as UTF-8") from e
    # Lines end at \n (or \r\n) only, as the job's reader splits them: str.splitlines() would also
    # split at a form feed (PDF-extracted text), U+2028 or U+0085, shifting every later index.
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    if p.suffix.lower() not in (".jsonl", ".ndjson"):
        # A blank line is an empty document (scored, as the model scores one): dropping it would shift every index.
        return lines[:-1] if lines[-1] == "" else lines
    docs = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise RerankerError(f"{p}:{n}: not valid JSON ({e.msg})") from e
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise RerankerError(f'{p}:{n}: expected an object with a string "text" field, got {line[:80]!r}')
        docs.append(obj["text"])
    return docs

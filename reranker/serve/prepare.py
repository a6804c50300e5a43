"""One request's query and documents -> prompt ids, with the Reranker's own PromptBuilder.

Runs in a request's worker thread (the tokenizer holds no lock other requests wait on, so it
overlaps their tokenising and the decode calls), before anything is queued: a bad text is refused
here, alone. The handler stops it at the request's deadline or disconnect (`tokenizer.cancelled_by`).
The request becomes a `Prepared` through `engine.scoring.prepare` (with chunking, a long document
becomes one prompt per chunk), and `Prepared.pair_scores` folds the chunks' scores back into one per
document, as `Reranker.score_documents` does.
"""

from __future__ import annotations

from dataclasses import fields, replace

from reranker.engine.prompts import PromptBuilder
from reranker.engine.scoring import Prepared, prepare
from reranker.errors import RerankerError
from reranker.options import MIN_LENGTH, Chunking
from reranker.serve.schemas import ScoreOptions
from reranker.serve.settings import ServeSettings


def check_sizes(query: str, documents: list[str], settings: ServeSettings) -> None:
    """Characters per query and per document within the server's caps: checked before any tokenising,
    so a 15 MB document costs the server no more than reading it."""
    if len(query) > settings.max_query_chars:
        raise RerankerError(f"query: {len(query)} characters; this server takes at most {settings.max_query_chars} "
                            "(--max-query-chars): send a shorter query")
    long = [(i, len(d)) for i, d in enumerate(documents) if len(d) > settings.max_document_chars]
    if long:
        i, n = long[0]
        more = f" (and {len(long) - 1} more)" if len(long) > 1 else ""
        raise RerankerError(f"documents[{i}]: {n} characters{more}; this server takes at most {settings.max_document_chars} "
                            "per document (--max-document-chars): split or shorten it")


def check_prompts(prepared: Prepared, settings: ServeSettings) -> None:
    """The request's prompts (each chunk one) within the server's cap, counted before anything is queued."""
    cap, flag = settings.prompt_cap
    n = len(prepared.prompts)
    if n > cap:
        what = f"{len(prepared.docs)} documents make {n} prompts" + (" (each chunk is one)" if prepared.chunking else "")
        fix = "lower chunking.max_chunks, raise chunking.size, or send fewer documents" if prepared.chunking else "send fewer documents"
        raise RerankerError(f"documents: {what}; this server takes at most {cap} per request ({flag}): {fix}")


def request_chunking(options: ScoreOptions, default: Chunking | None, max_chunks: int | None = None) -> Chunking | None:
    """The request's `chunking` over the server's (`reranker serve --chunk ...`); a bad one is a RerankerError.

    `max_chunks`: the server's cap (`--max-request-chunks`); a request asking for more chunks per document gets this many.
    """
    chunking = _request_chunking(options, default)
    if chunking is not None and max_chunks is not None and chunking.max_chunks > max_chunks:
        chunking = replace(chunking, max_chunks=max_chunks)
    return chunking


def _request_chunking(options: ScoreOptions, default: Chunking | None) -> Chunking | None:
    field = options.chunking
    if field is None:
        return default
    if field is False:
        return None
    base = default or Chunking()
    if field is True:
        return base
    given = {f.name: getattr(field, f.name) for f in fields(Chunking) if getattr(field, f.name, None) is not None}
    try:
        return Chunking(**{**{f.name: getattr(base, f.name) for f in fields(Chunking)}, **given})
    except RerankerError as e:  # Chunking's checks: name the request's field
        raise RerankerError(f"chunking: {e}") from e


def build_prompts(reranker, query: str, documents: list[str], options: ScoreOptions,
                  default_chunking: Chunking | None = None, max_chunks: int | None = None) -> Prepared:
    """Prompts of `(query, document)` for each document, in order, truncated (or chunked) as `compute_score` does.

    (A lone surrogate cannot reach here: the JSON parser refuses `"\\ud800"` with a 400.)
    """
    chunking = request_chunking(options, default_chunking, max_chunks)
    builder = reranker.prompt_builder()
    if options.max_tokens_per_doc is not None:
        # The prompt without its document (template, cut query, scoring token), plus the document's allowance.
        base = len(builder.build(query, "").ids)
        limit = max(MIN_LENGTH, min(builder.max_length, base + options.max_tokens_per_doc))
        builder = PromptBuilder(builder.tokenizer, limit, builder.max_query_length)
    return prepare(builder, [(query, d) for d in documents], chunking)

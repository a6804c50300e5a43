"""One request's query and documents -> prompt ids, with the Reranker's own PromptBuilder.

Runs in a request's worker thread (the tokenizer has its own lock, so it overlaps the decode
calls of other requests), before anything is queued: a bad text is refused here, alone.
The request becomes a `Prepared` through `engine.scoring.prepare` (with chunking, a long document
becomes one prompt per chunk), and `Prepared.pair_scores` folds the chunks' scores back into one per
document, as `Reranker.score_documents` does.
"""

from __future__ import annotations

from dataclasses import fields

from reranker.engine.prompts import PromptBuilder
from reranker.engine.scoring import Prepared, prepare
from reranker.errors import RerankerError
from reranker.options import MIN_LENGTH, Chunking
from reranker.serve.schemas import ScoreOptions


def request_chunking(options: ScoreOptions, default: Chunking | None) -> Chunking | None:
    """The request's `chunking` over the server's (`reranker serve --chunk ...`); a bad one is a RerankerError."""
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
                  default_chunking: Chunking | None = None) -> Prepared:
    """Prompts of `(query, document)` for each document, in order, truncated (or chunked) as `compute_score` does.

    (A lone surrogate cannot reach here: the JSON parser refuses `"\\ud800"` with a 400.)
    """
    chunking = request_chunking(options, default_chunking)
    builder = reranker.prompt_builder()
    if options.max_tokens_per_doc is not None:
        # The prompt without its document (template, cut query, scoring token), plus the document's allowance.
        base = len(builder.build(query, "").ids)
        limit = max(MIN_LENGTH, min(builder.max_length, base + options.max_tokens_per_doc))
        builder = PromptBuilder(builder.tokenizer, limit, builder.max_query_length)
    return prepare(builder, [(query, d) for d in documents], chunking)

"""One request's query and documents -> prompt ids, with the Reranker's own PromptBuilder.

Runs in a request's worker thread (the tokenizer has its own lock, so it overlaps the decode
calls of other requests), before anything is queued: a bad text is refused here, alone.
"""

from __future__ import annotations

from reranker.engine.prompts import MIN_LENGTH, Prompt, PromptBuilder
from reranker.serve.schemas import ScoreOptions


def build_prompts(reranker, query: str, documents: list[str], options: ScoreOptions) -> list[Prompt]:
    """Prompts of `(query, document)` for each document, in order, truncated as `compute_score` does.

    (A lone surrogate cannot reach here: the JSON parser refuses `"\\ud800"` with a 400.)
    """
    builder = reranker.prompt_builder()
    if options.max_tokens_per_doc is not None:
        # The prompt without its document (template, cut query, scoring token), plus the document's allowance.
        base = len(builder.build(query, "").ids)
        limit = max(MIN_LENGTH, min(builder.max_length, base + options.max_tokens_per_doc))
        builder = PromptBuilder(builder.tokenizer, limit, builder.max_query_length)
    return [builder.build(query, d) for d in documents]

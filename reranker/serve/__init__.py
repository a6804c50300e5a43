"""`reranker serve`: the Jina and Cohere rerank APIs over HTTP, batched across requests.

Read in this order:
- `schemas.py`: the two APIs' requests and responses (pydantic), and each request's `ScoreOptions`;
- `prepare.py`: a request's query and documents -> prompt ids (the engine's PromptBuilder);
- `fetch.py`: image URLs, fetched only from the hosts the operator allowed (`--image-url-hosts`);
- `scheduler.py`: prompts of concurrent requests -> shared batches through `score_prompts`;
- `metrics.py`: Prometheus counters, gauges and histograms;
- `settings.py`: limits, auth key, model name;
- `app.py`: the FastAPI app: endpoints, auth, limits, timeouts, disconnects.
The command (uvicorn, graceful shutdown) is `reranker/cli/serve.py`. Needs the `[serve]` extra.
"""

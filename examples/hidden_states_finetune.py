"""End to end: score with hidden states saved, fine-tune the head on them, rescore without the backbone.

    pip install -e '.[synth]'                                  # once, from the repo root
    python examples/hidden_states_finetune.py                  # a tiny synthetic model, made here
    python examples/hidden_states_finetune.py -m model.gguf --input pairs.jsonl --labels labels.jsonl

1. `reranker score --save-hidden hidden.npy` scores the pairs and keeps each pair's last hidden
   state (a memory-mapped .npy, rows keyed by `hidden.ids.jsonl`): one backbone pass.
2. The head (`head.ScoringHead`, from the GGUF's mlp_weights.npz) is fine-tuned on the saved
   states with BCE on labels joined by (query_id, doc_id), and exported as `mlp_weights.npz`.
3. The saved states are rescored with the new head (`head.score_embeddings`, no backbone).
4. A fresh `reranker score --head finetuned/mlp_weights.npz` gives the same scores: the check
   that training on saved states is training the model the job runs.

`--input` is the job's JSONL input (`{"query_id", "query", "documents": [{"id", "text"}]}`),
`--labels` JSONL lines `{"query_id", "doc_id", "label"}` (0/1). Without them, a synthetic task:
a document is relevant when it mentions the query's topic word.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from head import ScoringHead, score_embeddings
from head.hidden_states import load_hidden

TOPICS = "python rust banana violin glacier tennis kernel saffron comet opera".split()
FILLER = "the a of and report notes about with for some many new old data page text".split()


def synthetic_task(work: Path, n_queries: int, docs_per_query: int, seed: int = 0) -> tuple[Path, Path]:
    """One-word queries (a topic); half of each query's short documents are about it (label 1), half about
    another topic. Short and repetitive, so that even a random-weight backbone's state carries the match."""
    rng = random.Random(seed)
    inp, labels = work / "pairs.jsonl", work / "labels.jsonl"
    with open(inp, "w", encoding="utf-8") as f, open(labels, "w", encoding="utf-8") as g:
        for q in range(n_queries):
            topic = rng.choice(TOPICS)
            docs = []
            for d in range(docs_per_query):
                relevant = d % 2 == 0
                word = topic if relevant else rng.choice([t for t in TOPICS if t != topic])
                words = rng.choices(FILLER, k=rng.randint(2, 6)) + [word] * 3
                rng.shuffle(words)
                docs.append({"id": f"d{d}", "text": " ".join(words)})
                g.write(json.dumps({"query_id": f"q{q}", "doc_id": f"d{d}", "label": int(relevant)}) + "\n")
            f.write(json.dumps({"query_id": f"q{q}", "query": topic, "documents": docs}) + "\n")
    return inp, labels


def tiny_model(work: Path) -> Path:
    """A random-weight tiny jina-reranker-m0 as a GGUF, mlp_weights.npz beside it."""
    from reranker.gguf.convert import convert
    from reranker.synth.random_checkpoint import synth_checkpoint

    ckpt = synth_checkpoint(work / "tiny-checkpoint", preset="tiny", seed=0)
    gguf, _ = convert(ckpt, work / "model", outtype="f32")
    return gguf


def score_job(model: Path, inp: Path, out: Path, *extra: str) -> None:
    cmd = [sys.executable, "-m", "reranker", "score", "-m", str(model), "-i", str(inp), "-o", str(out),
           "--per", "pair", "--restart", "--quiet", *extra]
    print("$", " ".join(cmd[2:]))
    subprocess.run(cmd, check=True)


def job_scores(path: Path) -> dict[tuple[str, str], float]:
    with open(path, encoding="utf-8") as f:
        return {(r["query_id"], r["doc_id"]): r["score"] for r in map(json.loads, f)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", type=Path, help="a GGUF with mlp_weights.npz beside it (default: a tiny synthetic one)")
    p.add_argument("--input", type=Path, help="the job's JSONL input (default: a synthetic task)")
    p.add_argument("--labels", type=Path, help='JSONL {"query_id", "doc_id", "label"} (with --input)')
    p.add_argument("--work", type=Path, default=Path("hidden_states_demo"), help="where everything is written")
    p.add_argument("--hidden-dtype", choices=["float32", "float16"], default="float32")
    p.add_argument("--queries", type=int, default=150, help="synthetic queries")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--lr", type=float, default=3e-3)
    args = p.parse_args()
    if (args.input is None) != (args.labels is None):
        p.error("give --input and --labels together")
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    model = args.model or tiny_model(work)
    head_file = model.parent / "mlp_weights.npz"
    inp, labels_file = (args.input, args.labels) if args.input else synthetic_task(work, args.queries, 8)

    # 1. one backbone pass: scores, plus the hidden states they were computed from
    hidden = work / "hidden.npy"
    score_job(model, inp, work / "base.jsonl", "--save-hidden", str(hidden), "--hidden-dtype", args.hidden_dtype)
    states = load_hidden(hidden)  # memory-mapped; ids from hidden.ids.jsonl
    with open(labels_file, encoding="utf-8") as f:
        label_of = {(r["query_id"], r["doc_id"]): float(r["label"]) for r in map(json.loads, f)}
    keep = [i for i, key in enumerate(zip(states.query_ids, states.doc_ids)) if key in label_of]
    x = torch.from_numpy(np.asarray(states.embeddings[keep], dtype=np.float32))
    y = torch.tensor([label_of[(states.query_ids[i], states.doc_ids[i])] for i in keep])
    queries = sorted({states.query_ids[i] for i in keep})
    val_queries = set(queries[: max(1, len(queries) // 5)])  # whole queries held out
    is_val = torch.tensor([states.query_ids[i] in val_queries for i in keep])
    print(f"{len(keep)} labelled pairs of {len(states)} saved states ({x.shape[1]} wide, {states.embeddings.dtype}); "
          f"{int(is_val.sum())} held out")

    # 2. fine-tune the head on the saved states (BCE on logits; logit_bias stays fixed)
    head = ScoringHead.from_npz(head_file)
    opt = torch.optim.AdamW(head.parameters(), lr=args.lr)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    train_idx = torch.nonzero(~is_val).squeeze(1)

    def val_report(tag: str) -> None:
        with torch.no_grad():
            logits = head.logits(x[is_val])
            acc = ((logits > 0).float() == y[is_val]).float().mean().item()
            print(f"{tag:>8}: val loss {loss_fn(logits, y[is_val]).item():.4f}  val acc {acc:.3f}")

    val_report("before")
    for _ in range(args.epochs):
        for idx in train_idx[torch.randperm(len(train_idx))].split(64):
            opt.zero_grad()
            loss_fn(head.logits(x[idx]), y[idx]).backward()
            opt.step()
    val_report("after")
    tuned = work / "finetuned" / "mlp_weights.npz"
    tuned.parent.mkdir(exist_ok=True)
    head.save_npz(tuned)  # float32, the release layout: the job loads it with --head

    # 3. rescore every saved state with the exported head: no backbone
    rescored = score_embeddings(ScoringHead.from_npz(tuned), hidden)

    # 4. a fresh job with the fine-tuned head gives the same scores
    score_job(model, inp, work / "finetuned.jsonl", "--head", str(tuned))
    fresh = job_scores(work / "finetuned.jsonl")
    diff = np.abs(rescored - np.array([fresh[k] for k in zip(states.query_ids, states.doc_ids)], dtype=np.float32))
    # float32 states: the head's float32 arithmetic in other batch shapes; float16: the states' rounding
    tolerance = 1e-6 if states.embeddings.dtype == np.float32 else 2e-3
    print(f"rescored from saved states vs a fresh job with the fine-tuned head: max |diff| {diff.max():.2e} "
          f"over {len(diff)} pairs (tolerance {tolerance:g})")
    if diff.max() > tolerance:
        sys.exit("the rescored states do not match the fresh job")
    print(f"wrote {tuned}")


if __name__ == "__main__":
    main()

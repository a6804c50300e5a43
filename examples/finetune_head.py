"""Fine-tune the jina-reranker-m0 scoring head on labelled embeddings, then export it.

    pip install -e .                                                   # once, from the repo root
    python examples/finetune_head.py                                   # synthetic demo
    python examples/finetune_head.py --init mlp_weights.npz --data train.npz --out out/

`--data` is an .npz holding `embeddings` (N, H) and `labels` (N,) in {0, 1}
(or give `--embeddings X.npy --labels y.npy`). Writes `out/score_head.safetensors`
(original `score.*` names, loadable into the HF model) and `out/mlp_weights.npz`.
"""

import argparse
from pathlib import Path

import numpy as np
import torch
from torch import nn

from head import ScoringHead


def load_data(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    if args.data or args.embeddings:
        if args.data:
            with np.load(args.data, allow_pickle=False) as d:
                x, y = d["embeddings"], d["labels"]
        else:
            x, y = np.load(args.embeddings, allow_pickle=False), np.load(args.labels, allow_pickle=False)
        return torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32)
    # Synthetic: labels come from a hidden random "teacher" head the student must recover.
    x = torch.randn(args.n, args.hidden)
    with torch.no_grad():
        logits = ScoringHead(args.hidden).logits(x)
    return x, (logits > logits.median()).float()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", help="start from this head (.npz, .safetensors or checkpoint); default: random")
    p.add_argument("--data", help=".npz with 'embeddings' and 'labels'")
    p.add_argument("--embeddings", help=".npy of embeddings (with --labels)")
    p.add_argument("--labels", help=".npy of 0/1 labels")
    p.add_argument("--n", type=int, default=8192, help="synthetic examples")
    p.add_argument("--hidden", type=int, default=64, help="synthetic hidden size")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--out", type=Path, default=Path("finetuned_head"))
    args = p.parse_args()
    torch.manual_seed(0)

    x, y = load_data(args)
    head = ScoringHead.load(args.init) if args.init else ScoringHead(x.shape[-1])
    perm = torch.randperm(len(x))
    n_val = max(1, len(x) // 10)  # hold out 10% to see that the fine-tune generalises
    val, train = perm[:n_val], perm[n_val:]
    opt = torch.optim.AdamW(head.parameters(), lr=args.lr)
    loss_fn = nn.BCEWithLogitsLoss()  # on logits(): numerically stable, same optimum as BCE on forward()

    for epoch in range(args.epochs):
        head.train()
        for idx in train[torch.randperm(len(train))].split(args.batch_size):
            opt.zero_grad()
            loss_fn(head.logits(x[idx]), y[idx]).backward()
            opt.step()
        head.eval()
        with torch.no_grad():
            logits = head.logits(x[val])
            acc = ((logits > 0).float() == y[val]).float().mean()
            print(f"epoch {epoch + 1:3d}  val loss {loss_fn(logits, y[val]).item():.4f}  val acc {acc.item():.3f}")

    args.out.mkdir(parents=True, exist_ok=True)
    head.save_checkpoint(args.out / "score_head.safetensors")  # score.0.* / score.2.* names
    head.save_npz(args.out / "mlp_weights.npz")  # release layout for the numpy/GGUF pipeline
    print(f"wrote {args.out / 'score_head.safetensors'} and {args.out / 'mlp_weights.npz'}")


if __name__ == "__main__":
    main()

"""Run by ``torchrun --nproc_per_node 2`` from tests/test_distributed.py; not a test module itself.

Every rank embeds its contiguous 16-row share of the same 32 pairs, takes the MNRL loss with or without
cross-process candidates, and backpropagates through DistributedDataParallel. Rank 0 saves the mean loss,
the averaged gradients and the score-matrix shape for the test to compare with one process of 32 rows.
"""

from __future__ import annotations

import sys

import torch
from accelerate import Accelerator

from pairtune.batching import tokenize_columns
from pairtune.losses import mnrl_loss, mnrl_scores
from pairtune.modeling import load_model


def main(out: str, gather: bool, hard_negatives: bool) -> None:
    import pandas as pd

    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    frame = pd.read_json("data/raw/pairs.jsonl", lines=True).head(32)
    columns = [frame["sentence_0"].tolist(), frame["sentence_1"].tolist()]
    if hard_negatives:
        columns.append(frame["sentence_1"].tolist()[1:] + frame["sentence_1"].tolist()[:1])
    model = load_model("sentence-transformers/all-MiniLM-L6-v2", max_seq_length=256, dropout=0.0)
    tokens = tokenize_columns(model.tokenizer, columns, max_length=256)
    share = 32 // world
    batch = tokens.batch(list(range(rank * share, (rank + 1) * share)))
    model = accelerator.prepare(model)
    embeddings = [model(features)["sentence_embedding"] for features in batch]
    scores, _ = mnrl_scores(embeddings[0], embeddings[1:], scale=20.0, similarity="cosine", gather=gather)
    loss = mnrl_loss(embeddings[0], embeddings[1:], scale=20.0, similarity="cosine", gather=gather)
    accelerator.backward(loss)
    mean_loss = accelerator.reduce(loss.detach(), reduction="mean")
    if accelerator.is_main_process:
        grads = {n: p.grad.detach().clone() for n, p in accelerator.unwrap_model(model).named_parameters()
                 if p.grad is not None}
        torch.save({"loss": mean_loss.item(), "grads": grads, "scores_shape": tuple(scores.shape)}, out)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] == "gather", len(sys.argv) > 3 and sys.argv[3] == "negatives")

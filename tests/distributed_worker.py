"""Run by ``torchrun --nproc_per_node 2`` from tests/test_distributed.py; not a test module itself.

Every rank embeds its contiguous 16-row share of the same 32 pairs, takes the MNRL loss with or without
cross-process candidates, and backpropagates through DistributedDataParallel. Rank 0 saves the mean loss,
the averaged gradients and the score-matrix shape for the test to compare with one process of 32 rows.
"""

from __future__ import annotations

import sys

import pandas as pd
import torch
from accelerate import Accelerator

from pairtune.data.batching import tokenize_columns
from pairtune.model.losses import mnrl_loss, mnrl_scores
from pairtune.model.modeling import load_model


def main(out: str, gather: bool, hard_negatives: bool) -> None:

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




def count_allreduces(out: str) -> None:
    """All-reduce calls of one optimizer step's backward, counted by a DDP communication hook, per loss kind."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from pairtune.config import LossConfig
    from pairtune.train.training import compute_loss_and_backward, encoder_for_training

    accelerator = Accelerator(cpu=True)
    frame = pd.read_json("data/raw/pairs.jsonl", lines=True).head(32)
    model = load_model("sentence-transformers/all-MiniLM-L6-v2", max_seq_length=256, dropout=0.0)
    tokens = tokenize_columns(model.tokenizer, [frame["sentence_0"].tolist(), frame["sentence_1"].tolist()],
                              max_length=256)
    rank = accelerator.process_index
    batch = tokens.batch(list(range(rank * 16, (rank + 1) * 16)))
    model = accelerator.prepare(encoder_for_training(model, unpad=True)[0])
    calls = {"n": 0}

    def counting_hook(state, bucket):
        calls["n"] += 1
        return allreduce_hook(state, bucket)

    model.register_comm_hook(state=None, hook=counting_hook)
    # DDP rebuilds its gradient buckets after the first synchronised backward: count from then on
    compute_loss_and_backward(model, accelerator, batch, LossConfig(), sync=True)
    model.zero_grad(set_to_none=True)
    counts = {}
    for name, mini in (("plain", None), ("cached_mini4", 4)):
        for sync in (True, False):
            calls["n"] = 0
            loss = LossConfig(mini_batch_size=mini, gather_across_devices=True)
            compute_loss_and_backward(model, accelerator, batch, loss, sync=sync)
            counts[f"{name}_{'sync' if sync else 'no_sync'}"] = calls["n"]
            model.zero_grad(set_to_none=True)
    if accelerator.is_main_process:
        torch.save(counts, out)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    if sys.argv[2] == "allreduce":
        count_allreduces(sys.argv[1])
    else:
        main(sys.argv[1], sys.argv[2] == "gather", len(sys.argv) > 3 and sys.argv[3] == "negatives")

"""Distributed MNRL on CPU with 2 gloo processes equals one process with the whole batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from pairtune.batching import tokenize_columns
from pairtune.losses import mnrl_loss, mnrl_scores
from pairtune.modeling import load_model

from .conftest import ROOT

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def torchrun(*args: str, cwd=ROOT) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*TORCHRUN, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, done.stderr[-4000:]


def single_process_reference(hard_negatives: bool) -> dict:
    frame = pd.read_json(ROOT / "data/raw/pairs.jsonl", lines=True).head(32)
    columns = [frame["sentence_0"].tolist(), frame["sentence_1"].tolist()]
    if hard_negatives:
        columns.append(frame["sentence_1"].tolist()[1:] + frame["sentence_1"].tolist()[:1])
    model = load_model("sentence-transformers/all-MiniLM-L6-v2", max_seq_length=256, dropout=0.0)
    batch = tokenize_columns(model.tokenizer, columns, max_length=256).batch(list(range(32)))
    embeddings = [model(features)["sentence_embedding"] for features in batch]
    loss = mnrl_loss(embeddings[0], embeddings[1:], scale=20.0, similarity="cosine", gather=False)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return {"loss": loss.item(), "grads": grads}


def max_relative_gradient_gap(left: dict, right: dict) -> float:
    """Largest |difference| over all gradients, relative to the largest gradient entry."""
    assert left.keys() == right.keys()
    scale = max(g.abs().max().item() for g in right.values())
    return max((left[n] - right[n]).abs().max().item() for n in right) / scale


@pytest.mark.slow
@pytest.mark.parametrize("hard_negatives", [False, True], ids=["pairs", "hard-negatives"])
def test_two_processes_with_gathering_equal_one_big_batch(tmp_path, hard_negatives):
    out = tmp_path / "rank0.pt"
    torchrun("tests/distributed_worker.py", str(out), "gather", "negatives" if hard_negatives else "pairs")
    distributed = torch.load(out)
    reference = single_process_reference(hard_negatives)
    assert distributed["loss"] == pytest.approx(reference["loss"], rel=1e-5)
    gap = max_relative_gradient_gap(distributed["grads"], reference["grads"])
    print(f"max relative gradient gap ({'hard negatives' if hard_negatives else 'pairs'}): {gap:.2e}")
    assert gap < 1e-5
    columns = 3 if hard_negatives else 2
    assert distributed["scores_shape"] == (16, 32 * (columns - 1))


@pytest.mark.slow
def test_without_gathering_each_anchor_sees_only_local_candidates(tmp_path):
    out = tmp_path / "rank0.pt"
    torchrun("tests/distributed_worker.py", str(out), "local")
    assert torch.load(out)["scores_shape"] == (16, 16)


def test_single_process_scores_are_local_when_gathering():
    """Outside torchrun, gathering is the identity: the score matrix is the local one."""
    anchors, positives = torch.randn(4, 8), torch.randn(4, 8)
    scores, labels = mnrl_scores(anchors, [positives], scale=20.0, similarity="cosine", gather=True)
    assert scores.shape == (4, 4) and labels.tolist() == [0, 1, 2, 3]


@pytest.mark.slow
def test_two_process_training_matches_one_process_weights(tmp_path, prepared_bundled):
    common = [
        f"paths.prepared={prepared_bundled}", "model.dropout=0.0", "train.max_steps=3", "train.epochs=1",
        "train.eval_on_start=false", "train.save_checkpoints=false", "tracking.enabled=false",
        f"paths.reports={tmp_path}/reports", f"hydra.run.dir={tmp_path}/hydra",
    ]
    torchrun("pipelines/train.py", *common, "train.batch_size=16", "loss.gather_across_devices=true",
             f"paths.model={tmp_path}/ddp")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "pipelines/train.py", *common, "train.batch_size=32", f"paths.model={tmp_path}/one"],
                   cwd=ROOT, env=env, check=True, capture_output=True)
    ddp, one = load_file(tmp_path / "ddp/model.safetensors"), load_file(tmp_path / "one/model.safetensors")
    gap = max((ddp[k] - one[k]).abs().max().item() for k in one)
    print(f"max weight difference after 3 steps: {gap:.2e}")
    assert gap < 1e-4
    card = (tmp_path / "ddp/README.md").read_text()
    assert "`world_size`: 2" in card and "`global_batch_size`: 32" in card

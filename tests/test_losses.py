from __future__ import annotations

import math

import pytest
import torch

from pairtune.data.batching import tokenize_columns
from pairtune.model.losses import cached_mnrl_step, gather_with_grad, mnrl_loss, mnrl_scores


def test_mnrl_matches_a_hand_computation():
    # Given two anchors and two positives with known cosines
    anchors = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    positives = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    # When
    loss = mnrl_loss(anchors, [positives], scale=2.0, similarity="cosine", gather=False)
    # Then: row 0 scores (2.0, 1.2) with label 0; row 1 scores (0.0, 1.6) with label 1
    row0 = -2.0 + math.log(math.exp(2.0) + math.exp(1.2))
    row1 = -1.6 + math.log(math.exp(0.0) + math.exp(1.6))
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_symmetric_mnrl_averages_the_reverse_task_and_ignores_negatives_there():
    # Given the hand example above: scores (2.0, 1.2 / 0.0, 1.6); columns transposed for the reverse task
    anchors = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    positives = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    negatives = torch.tensor([[0.0, -1.0], [-1.0, 0.0]])
    # When
    loss = mnrl_loss(anchors, [positives, negatives], scale=2.0, similarity="cosine", gather=False, symmetric=True)
    forward = mnrl_loss(anchors, [positives, negatives], scale=2.0, similarity="cosine", gather=False)
    # Then: positive 0 scores anchors (2.0, 0.0), label 0; positive 1 scores (1.2, 1.6), label 1
    back0 = -2.0 + math.log(math.exp(2.0) + math.exp(0.0))
    back1 = -1.6 + math.log(math.exp(1.2) + math.exp(1.6))
    assert loss.item() == pytest.approx((forward.item() + (back0 + back1) / 2) / 2, rel=1e-6)


def test_hard_negatives_join_the_candidates():
    anchors, positives, negatives = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    scores, labels = mnrl_scores(anchors, [positives, negatives], scale=20.0, similarity="cosine", gather=False)
    assert scores.shape == (3, 6)
    assert labels.tolist() == [0, 1, 2]


def test_cosine_ignores_norm_but_dot_does_not():
    anchors, positives = torch.randn(4, 8), torch.randn(4, 8)
    cos = mnrl_loss(anchors, [positives], scale=20.0, similarity="cosine", gather=False)
    assert mnrl_loss(anchors * 3, [positives], scale=20.0, similarity="cosine", gather=False).item() == pytest.approx(cos.item(), rel=1e-5)
    dot = mnrl_loss(anchors, [positives], scale=1.0, similarity="dot", gather=False)
    assert mnrl_loss(anchors * 3, [positives], scale=1.0, similarity="dot", gather=False).item() != pytest.approx(dot.item())


def test_gather_without_distribution_is_identity():
    local = torch.randn(5, 3)
    gathered, offset = gather_with_grad(local)
    assert gathered is local and offset == 0


@pytest.mark.slow
def test_cached_mnrl_equals_plain_mnrl_in_loss_and_gradients(base_model):
    # Given one batch of 8 pairs and the real model (eval mode: dropout off, so both paths see one function)
    notes = [f"Ada see sh @ {h} hou" for h in range(8)]
    sentences = [f"Ada saw the ship at hour {h}, long after the others slept." for h in range(8)]
    tokens = tokenize_columns(base_model.tokenizer, [notes, sentences], max_length=64)
    batch = tokens.batch(list(range(8)))
    base_model.eval()

    def embed(features):
        return base_model(features)["sentence_embedding"]

    # When: plain MNRL over the whole batch
    plain = mnrl_loss(embed(batch[0]), [embed(batch[1])], scale=20.0, similarity="cosine", gather=False)
    plain.backward()
    plain_grads = {n: p.grad.clone() for n, p in base_model.named_parameters() if p.grad is not None}
    base_model.zero_grad(set_to_none=True)
    # and cached MNRL in mini-batches of 3
    cached = cached_mnrl_step(
        embed, batch, mini_batch_size=3, scale=20.0, similarity="cosine", gather=False,
        backward=lambda surrogate: surrogate.backward(),
    )
    # Then
    assert cached.item() == pytest.approx(plain.item(), rel=1e-5)
    largest = max(g.abs().max().item() for g in plain_grads.values())
    worst = max((p.grad - plain_grads[n]).abs().max().item() for n, p in base_model.named_parameters() if n in plain_grads)
    assert worst <= 1e-5 * largest


@pytest.mark.slow
def test_cached_mnrl_replays_dropout(base_model):
    """In train mode the recompute must draw the same dropout masks as the cached pass."""
    notes = [f"Bo run → riv @ nit {i}" for i in range(6)]
    sentences = [f"Bo ran down to the river in the night, number {i}." for i in range(6)]
    batch = tokenize_columns(base_model.tokenizer, [notes, sentences], max_length=64).batch(list(range(6)))
    base_model.train()
    seen = []

    def embed(features):
        out = base_model(features)["sentence_embedding"]
        seen.append(out.detach().clone())
        return out

    cached_mnrl_step(embed, batch, mini_batch_size=4, scale=20.0, similarity="cosine", gather=False,
                     backward=lambda surrogate: surrogate.backward())
    half = len(seen) // 2
    for first, again in zip(seen[:half], seen[half:], strict=True):
        assert torch.allclose(first, again, atol=1e-6)

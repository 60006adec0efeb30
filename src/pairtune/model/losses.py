"""MultipleNegativesRankingLoss over plain tensors, its cross-process gather, and GradCache.

The maths lives in :func:`mnrl_loss` (embeddings in, scalar out) so it can be checked by hand; the
model-facing pieces (:func:`embed`, :func:`cached_mnrl_step`) only decide how embeddings are produced.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from pairtune.data.batching import Features


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _GatherWithGrad(torch.autograd.Function):
    """All-gather rows of different counts; backward hands each rank the summed gradient of its own rows."""

    @staticmethod
    def forward(ctx, local: Tensor, counts: list[int]) -> Tensor:  # local: (n_r, D)
        padded = local.new_zeros((max(counts), *local.shape[1:]))
        padded[: local.shape[0]] = local
        slots = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(slots, padded.contiguous())
        rank = dist.get_rank()
        ctx.start, ctx.stop = sum(counts[:rank]), sum(counts[: rank + 1])
        return torch.cat([slot[:n] for slot, n in zip(slots, counts, strict=True)])  # (sum n_r, D)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        # Every rank's loss touches every rank's rows: sum the contributions, keep our slice.
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.start : ctx.stop], None


def row_counts(local: Tensor) -> list[int]:
    """Rows held by each rank, in rank order (ranks may differ by one in a short last batch)."""
    count = torch.tensor([local.shape[0]], device=local.device)
    counts = [torch.zeros_like(count) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, count)
    return [int(c.item()) for c in counts]


def gather_with_grad(local: Tensor) -> tuple[Tensor, int]:
    """Return ``(rows of every rank concatenated in rank order, offset of this rank's rows)``."""
    if not _distributed():
        return local, 0
    counts = row_counts(local)
    return _GatherWithGrad.apply(local, counts), sum(counts[: dist.get_rank()])


def similarity_matrix(anchors: Tensor, candidates: Tensor, kind: str) -> Tensor:
    if kind == "cosine":
        anchors, candidates = F.normalize(anchors, dim=-1), F.normalize(candidates, dim=-1)
    return anchors @ candidates.T  # (B, C)


def mnrl_scores(
    anchors: Tensor, columns: Sequence[Tensor], *, scale: float, similarity: str, gather: bool
) -> tuple[Tensor, Tensor]:
    """Scaled scores of local anchors against every candidate, and the index of each anchor's positive.

    ``columns[0]`` holds the positives, further entries hard negatives; all are ``(B, D)``. With ``gather``,
    candidates come from every process (in rank order) and labels are offset by the rows of earlier ranks.
    """
    offset = 0
    if gather:
        gathered = [gather_with_grad(column) for column in columns]
        columns, offset = [g for g, _ in gathered], gathered[0][1]
    candidates = torch.cat(list(columns))  # (B_world * (1 + negatives), D)
    scores = similarity_matrix(anchors, candidates, similarity) * scale  # (B, B_world * (1 + negatives))
    labels = torch.arange(anchors.shape[0], device=anchors.device) + offset  # (B,)
    return scores, labels


def mnrl_loss(
    anchors: Tensor,
    columns: Sequence[Tensor],
    *,
    scale: float,
    similarity: str,
    gather: bool,
    symmetric: bool = False,
) -> Tensor:
    """Cross-entropy of each anchor over all candidates, its own positive being the right answer.

    ``symmetric`` (sentence-transformers' MultipleNegativesSymmetricRankingLoss) averages it with the
    reverse task: each positive picks its own anchor among the batch's anchors (negatives take no part).
    """
    scores, labels = mnrl_scores(anchors, columns, scale=scale, similarity=similarity, gather=gather)
    loss = F.cross_entropy(scores, labels)
    if symmetric:
        back, back_labels = mnrl_scores(columns[0], [anchors], scale=scale, similarity=similarity, gather=gather)
        loss = (loss + F.cross_entropy(back, back_labels)) / 2
    return loss


Matryoshka = tuple[Sequence[int], Sequence[float]]  # (dims, weights): LossConfig.matryoshka()


def ranking_loss(
    anchors: Tensor,
    columns: Sequence[Tensor],
    *,
    scale: float,
    similarity: str,
    gather: bool,
    symmetric: bool = False,
    matryoshka: Matryoshka | None = None,
) -> Tensor:
    """MNRL, or with ``matryoshka`` its weighted sum over leading slices of the embeddings (MatryoshkaLoss).

    Each slice ``[:, :dim]`` is scored on its own (cosine renormalises it), so the first ``dim`` components
    alone must rank each anchor's positive first: a model trained so keeps most of its quality truncated.
    """
    if matryoshka is None:
        return mnrl_loss(anchors, columns, scale=scale, similarity=similarity, gather=gather, symmetric=symmetric)
    dims, weights = matryoshka
    terms = [
        weight * mnrl_loss(anchors[:, :dim], [column[:, :dim] for column in columns], scale=scale,
                           similarity=similarity, gather=gather, symmetric=symmetric)
        for dim, weight in zip(dims, weights, strict=True)
    ]
    return torch.stack(terms).sum()


@torch.no_grad()
def batch_signals(anchors: Tensor, columns: Sequence[Tensor], *, similarity: str) -> Tensor:
    """``(in-batch accuracy, mean margin)`` of one process's batch: why a run may gain nothing.

    Accuracy: how often an anchor's own positive outscores every other candidate of the batch. Margin: the
    positive's similarity minus the hardest other candidate's, unscaled, averaged over anchors. Near 1 and
    large from the first steps, the batch is too easy to teach anything.
    """
    scores = similarity_matrix(anchors.float(), torch.cat([c.float() for c in columns]), similarity)  # (B, C)
    rows = torch.arange(anchors.shape[0], device=anchors.device)
    positive = scores[rows, rows]  # (B,)
    others = scores.clone()
    others[rows, rows] = float("-inf")
    hardest = others.max(dim=1).values  # (B,)
    return torch.stack([(positive > hardest).float().mean(), (positive - hardest).mean()])  # (2,)


Embedder = Callable[[Features], Tensor]


class _RngReplay:
    """Capture the RNG state before a forward so the same dropout masks can be drawn again."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def __enter__(self) -> None:
        self._fork = torch.random.fork_rng(devices=range(len(self.cuda)) if self.cuda else [])
        self._fork.__enter__()
        torch.set_rng_state(self.cpu)
        if self.cuda:
            torch.cuda.set_rng_state_all(self.cuda)

    def __exit__(self, *exc) -> None:
        self._fork.__exit__(*exc)


def slice_features(features: Features, start: int, stop: int) -> Features:
    """Rows ``start:stop`` of a padded batch, trimmed to the longest of those rows."""
    mask = features["attention_mask"][start:stop]
    width = int(mask.sum(dim=1).max().item())
    return {key: value[start:stop, :width] for key, value in features.items()}


def cached_mnrl_step(
    embed: Embedder,
    batches: Sequence[Features],
    *,
    mini_batch_size: int,
    scale: float,
    similarity: str,
    gather: bool,
    symmetric: bool = False,
    matryoshka: Matryoshka | None = None,
    backward: Callable[[Tensor], None],
    sync: Callable[[bool], AbstractContextManager] = lambda is_last: nullcontext(),
    observe: Callable[[list[Tensor]], None] = lambda reps: None,
) -> Tensor:
    """GradCache: the loss of a big batch with the activation memory of one mini-batch.

    1. embed every column in mini-batches without a graph; 2. take the loss and its gradient with respect
    to those embeddings; 3. re-embed each mini-batch with a graph (same dropout) and push the cached
    gradient through it. ``sync(is_last)`` wraps each re-embedding forward *and* its backward, so under
    DistributedDataParallel the caller can skip the gradient all-reduce for all but the last mini-batch
    (DDP decides at forward time whether the next backward syncs). ``observe`` sees every column's embeddings.
    With ``matryoshka`` the cached gradient is that of the summed slice losses: one re-embedding serves all dims.
    """
    plan, reps = embed_without_graph(embed, batches, mini_batch_size)
    observe(reps)
    loss = ranking_loss(reps[0], reps[1:], scale=scale, similarity=similarity, gather=gather, symmetric=symmetric,
                        matryoshka=matryoshka)
    loss.backward()
    for index, (column, start, stop, rng) in enumerate(plan):
        with sync(index == len(plan) - 1), rng:
            embedded = embed(slice_features(batches[column], start, stop))  # (mini, D)
            backward((embedded * reps[column].grad[start:stop]).sum())
    return loss.detach()


def embed_without_graph(
    embed: Embedder, batches: Sequence[Features], mini_batch_size: int
) -> tuple[list[tuple[int, int, int, _RngReplay]], list[Tensor]]:
    """GradCache's first pass: every column's embeddings in mini-batches, and the RNG state of each."""
    plan, reps = [], []
    with torch.no_grad():
        for column, features in enumerate(batches):
            chunks = []
            for start in range(0, features["input_ids"].shape[0], mini_batch_size):
                rng = _RngReplay()
                chunks.append(embed(slice_features(features, start, start + mini_batch_size)))
                plan.append((column, start, start + mini_batch_size, rng))
            reps.append(torch.cat(chunks).detach().requires_grad_())  # (B, D), a leaf for the loss's gradient
    return plan, reps

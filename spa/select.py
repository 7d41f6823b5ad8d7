"""Which two of a prompt's K responses become its training pair.

  minmax    SPA: the highest- and the lowest-scored response (by the judge).
  easy      REAL: the least similar pair (cosine of mean response embeddings); the paper's recommendation.
  hard      REAL: the most similar pair.
  random    a uniformly random pair.
  centroid  REAL: 2-means over the embeddings; the response nearest each centroid.

Orientation (chosen / rejected) always comes from the judge's scores. A pair of identical texts, or of exactly
equal scores, is dropped (and counted by the caller).
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

STRATEGIES = ("minmax", "easy", "hard", "random", "centroid")
NEEDS_EMBEDDINGS = ("easy", "hard", "centroid")


def _cosine(emb: torch.Tensor) -> torch.Tensor:
    e = F.normalize(emb.double(), dim=-1)
    return e @ e.t()


def _extreme_pair(sim: torch.Tensor, largest: bool) -> tuple[int, int]:
    K = sim.shape[0]
    iu = torch.triu_indices(K, K, offset=1)
    vals = sim[iu[0], iu[1]]
    k = int(vals.argmax() if largest else vals.argmin())
    return int(iu[0, k]), int(iu[1, k])


def two_means(emb: torch.Tensor, iters: int = 20) -> tuple[int, int] | None:
    """Indices of the members nearest the two centroids of a (cosine) 2-means clustering; deterministic start at
    the least similar pair. None when the responses do not split into two clusters."""
    e = F.normalize(emb.double(), dim=-1)
    a, b = _extreme_pair(e @ e.t(), largest=False)
    cent = torch.stack([e[a], e[b]])
    assign = None
    for _ in range(iters):
        new = (e @ cent.t()).argmax(1)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        for c in range(2):
            if (assign == c).any():
                cent[c] = F.normalize(e[assign == c].mean(0), dim=0)
    if not ((assign == 0).any() and (assign == 1).any()):
        return None
    picks = []
    for c in range(2):
        members = (assign == c).nonzero().squeeze(1)
        picks.append(int(members[(e[members] @ cent[c]).argmax()]))
    return picks[0], picks[1]


def select_pair(scores: list[float], strategy: str = "minmax", embeddings: torch.Tensor | None = None,
                rng: random.Random | None = None) -> tuple[int, int] | None:
    """(chosen index, rejected index) among K scored responses, or None if the strategy finds no pair."""
    K = len(scores)
    if K < 2:
        return None
    if strategy == "minmax":
        i = max(range(K), key=lambda k: scores[k])
        j = min(range(K), key=lambda k: scores[k])
    elif strategy in ("easy", "hard"):
        if embeddings is None:
            raise ValueError(f"select strategy {strategy!r} needs response embeddings")
        i, j = _extreme_pair(_cosine(embeddings), largest=strategy == "hard")
    elif strategy == "centroid":
        if embeddings is None:
            raise ValueError("select strategy 'centroid' needs response embeddings")
        pair = two_means(embeddings)
        if pair is None:
            return None
        i, j = pair
    elif strategy == "random":
        i, j = (rng or random).sample(range(K), 2)
    else:
        raise ValueError(f"select strategy {strategy!r} is not one of {STRATEGIES}")
    return (i, j) if scores[i] >= scores[j] else (j, i)

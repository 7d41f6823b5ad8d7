"""Batched scoring: per-sequence log-probs (with the last hidden states) through spa_kernels' fused head
(spa_kernels.integrations: the model's own forward, then its lm_head with logit scaling, softcapping, bias and tied
or gathered weights handled in one place; never [batch, seq, vocab] logits). Every stage scores sequences here,
with the kernel implementation from kernel_impl(cfg); the models come from spa.models."""

from __future__ import annotations

import torch

IGNORE = -100


def kernel_impl(cfg) -> str:
    """The spa_kernels implementation every stage uses (train, judge, validate, eval): `train.kernel_impl`."""
    return cfg.train.kernel_impl


def pad_sequences(items: list[tuple[list[int], list[int]]], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask, labels aligned with input_ids (the response tokens, IGNORE on the
    prompt and the padding; shifted inside the model as for its own loss) and response_mask marking the response
    positions."""
    T = max(len(p) + len(r) for p, r in items)
    N = len(items)
    ids = torch.full((N, T), pad_id, dtype=torch.long)
    att = torch.zeros((N, T), dtype=torch.long)
    labels = torch.full((N, T), IGNORE, dtype=torch.long)
    resp = torch.zeros((N, T), dtype=torch.bool)
    for i, (p, r) in enumerate(items):
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor(p + r)
        att[i, :n] = 1
        labels[i, len(p):n] = torch.tensor(r)
        resp[i, len(p):n] = True
    return {"input_ids": ids.to(device), "attention_mask": att.to(device), "labels": labels.to(device),
            "response_mask": resp.to(device)}


def batch_logps(model, batch: dict, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(summed response log-probs [N] float32, last hidden states [N, T, H]) for a pad_sequences batch."""
    from spa_kernels.integrations.hf import sequence_logprobs

    out = sequence_logprobs(model, batch, return_hidden=True, impl=impl)
    return out.logps, out.hidden_states


def mean_response_embedding(hidden: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """REAL's embedding: the last hidden layer averaged over response tokens only (prompt excluded)."""
    m = response_mask.to(hidden.dtype).unsqueeze(-1)
    return ((hidden * m).sum(1) / m.sum(1).clamp(min=1)).float()


@torch.inference_mode()
def score_sequences(model, items: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int,
                    impl: str = "auto", embeddings: bool = False, progress: str | None = None):
    """Summed response log-probs [N] (float32, CPU) of (prompt_ids, response_ids) items under `model`, batched in
    length order; with embeddings=True also REAL's mean response embeddings [N, H]."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]) + len(items[i][1]))
    logps = torch.empty(len(items))
    embs = None
    starts = range(0, len(order), batch_size)
    for s in tqdm(starts, desc=progress, disable=progress is None, leave=False):
        idx = order[s:s + batch_size]
        batch = pad_sequences([items[i] for i in idx], pad_id, device)
        lp, hidden = batch_logps(model, batch, impl)
        logps[idx] = lp.float().cpu()
        if embeddings:
            e = mean_response_embedding(hidden, batch["response_mask"]).cpu()
            if embs is None:
                embs = torch.empty(len(items), e.shape[1])
            embs[idx] = e
    return (logps, embs) if embeddings else logps

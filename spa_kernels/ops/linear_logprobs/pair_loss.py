"""A pairwise preference loss from hidden states with its gradient computed during the forward, over a log-prob
kernel backend (cpu, cuda or triton: spa_kernels/ops/logprobs/) and ATen matmuls: FusedLinearPreferenceLoss's path
for a scalar loss (spa_kernels/nn.py).

Each chunk of a batch of pairs has its logits built once; they give the log-probs, the pair losses and, in place,
the logits' gradient, which two matmuls then turn into the hidden and weight gradients: 4 matmuls per token where
the forward + backward of linear_logprobs takes 5, and nothing saved for the backward.
"""

from __future__ import annotations

import torch

from ..._accumulate import accumulate_mm
from ..._validation import acc_dtype, label_check
from .chunked import _NO_IGNORE, chunk_logits_into, chunk_size_for

# A chunk may grow to one whole pair's logits, up to this size, so that the loss gradient is applied to logits still
# in the buffer instead of rebuilding them.
PAIR_CHUNK_BYTES = 256 * 2**20


def pair_chunk_size(seq_offsets: list[int], vocab: int, dtype: torch.dtype, device: torch.device) -> int:
    """Tokens per chunk for fused_linear_pair_loss: the usual chunk (chunk_size_for), or the longest pair's tokens
    when that is longer and its logits fit PAIR_CHUNK_BYTES (on a GPU: the usual chunk, never larger)."""
    tokens = seq_offsets[-1]
    chunk = chunk_size_for(tokens, vocab, dtype, device)
    longest = max((seq_offsets[p + 2] - seq_offsets[p] for p in range(0, len(seq_offsets) - 2, 2)), default=0)
    row = max(vocab, 1) * torch.empty((), dtype=dtype).element_size()
    if device.type != "cuda" and chunk < longest <= PAIR_CHUNK_BYTES // row:
        return longest
    return chunk



def pair_batches(seq_offsets: list[int], chunk: int) -> list[tuple[int, int]]:
    """Consecutive pairs [p0, p1) packed greedily so each batch's tokens fit one chunk of logits (a pair longer than
    a chunk is a batch of its own). seq_offsets: the 2P + 1 token offsets of the sequences, in pair order."""
    batches, p0 = [], 0
    pairs = (len(seq_offsets) - 1) // 2
    for p in range(1, pairs + 1):
        if seq_offsets[2 * p] - seq_offsets[2 * p0] > chunk and p - 1 > p0:
            batches.append((p0, p - 1))
            p0 = p - 1
    if pairs:
        batches.append((p0, pairs))
    return batches


def fused_linear_pair_loss(hidden, weight, bias, labels, index, seq_offsets: list[int], pair_loss,
                           inv_temperature: float, chunk_size: int | None, kernels, softcap: float | None = None):
    """A pairwise loss of per-sequence log-probs, with its gradient computed during the forward (no recomputed
    logits, no saved activations).

    hidden [R, H] (e.g. [2B * T, H] rows of the hidden states), weight [V, H], bias [V] | None; index [M] the rows
    that are scored, grouped by sequence in pair order (chosen 0, rejected 0, chosen 1, ...), labels [M] in [0, V)
    their labels, seq_offsets the 2P + 1 offsets of the sequences in index. pair_loss(p0, sums) gets the summed
    token log-probs of pairs [p0, p0 + k) in pair order ([2k]) and returns (loss, d loss / d sums): the loss must be
    a sum of per-pair terms. Returns (loss, sums [2P]); only the loss carries a gradient (to hidden, weight, bias).

    Pairs are packed into batches whose logits fit one chunk; a batch's logits are built once, give the log-probs,
    the pair losses, and in place their gradient, which the two gradient matmuls then consume (4 matmuls per token
    in all, against 5 when the backward rebuilds the logits). A pair longer than a chunk is done in sub-chunks, with
    the logits rebuilt for its gradient. Peak extra memory: one chunk of logits and the gradients themselves.
    """
    chunk = chunk_size or pair_chunk_size(seq_offsets, weight.shape[0], weight.dtype, weight.device)
    return FusedLinearPairLossFunction.apply(hidden, weight, bias, labels, index, seq_offsets, pair_loss,
                                             inv_temperature, chunk, kernels, softcap)


class FusedLinearPairLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, index, seq_offsets, pair_loss, inv_temperature: float,
                chunk: int, kernels, softcap: float | None = None):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        cap = {} if softcap is None else {"softcap": softcap}
        dt = acc_dtype(hidden.dtype)
        reduced = weight.dtype in (torch.bfloat16, torch.float16)
        M, S = index.shape[0], len(seq_offsets) - 1
        counts = torch.tensor([b - a for a, b in zip(seq_offsets, seq_offsets[1:])], device=hidden.device)
        seq_of_token = torch.repeat_interleave(torch.arange(S, device=hidden.device), counts, output_size=M)
        sums = hidden.new_zeros(S, dtype=torch.float64)  # thousands of token terms per sequence
        loss = hidden.new_zeros((), dtype=dt)
        # grad_h covers every row of hidden (unscored rows get zeros): the scored rows' gradient is written into it
        # directly, so no [M, H] copy of the scored rows or of their gradient is ever kept.
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32 if reduced else weight.dtype,
                             device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc_dtype(bias.dtype), device=bias.device) if need_b else None
        buf = hidden.new_empty(min(chunk, M), weight.shape[0])
        with label_check("trusted"):  # the caller has checked every label
            for p0, p1 in pair_batches(seq_offsets, chunk):
                t0, t1 = seq_offsets[2 * p0], seq_offsets[2 * p1]
                spans = [(s, min(s + chunk, t1)) for s in range(t0, t1, chunk)]
                lse = hidden.new_empty(t1 - t0, dtype=dt)

                def logits(s, e):
                    h = hidden.index_select(0, index[s:e])
                    return h, chunk_logits_into(buf[:e - s], h, weight, bias).unsqueeze(0)

                for s, e in spans:
                    h, z = logits(s, e)
                    tok, lse_c = kernels.forward(z, labels[s:e].unsqueeze(0), _NO_IGNORE, inv_temperature, **cap)
                    sums.index_add_(0, seq_of_token[s:e], tok[0].to(sums.dtype))
                    lse[s - t0:e - t0] = lse_c[0]
                batch_loss, grad_sums = pair_loss(p0, sums[2 * p0:2 * p1].to(dt))
                loss += batch_loss.detach().to(dt)
                grad_token = grad_sums.detach().to(dt)[seq_of_token[t0:t1] - 2 * p0]
                for s, e in spans:
                    if len(spans) > 1:  # the buffer holds the last span's logits: rebuild this span's
                        h, z = logits(s, e)
                    g = kernels.backward(grad_token[s - t0:e - t0].unsqueeze(0), z, labels[s:e].unsqueeze(0),
                                         lse[s - t0:e - t0].unsqueeze(0), _NO_IGNORE, inv_temperature,
                                         grad_out=z, **cap)[0]
                    if need_h:
                        grad_h.index_copy_(0, index[s:e], torch.mm(g, weight))
                    if need_w:
                        accumulate_mm(grad_w, g.t(), h, slice_bytes=buf.nbytes // 2)
                    if need_b:
                        grad_b.add_(g.sum(0, dtype=grad_b.dtype))
        if grad_w is not None and reduced:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        # Held on ctx, not saved tensors: backward hands them over and drops its references, so autograd can adopt
        # each as the leaf's .grad without a copy.
        ctx.grads = [grad_h, grad_w, grad_b]
        sums = sums.to(dt)
        ctx.mark_non_differentiable(sums)
        return loss, sums

    @staticmethod
    def backward(ctx, grad_loss, _grad_sums):
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("FusedLinearPairLossFunction's gradients were computed once and handed over already; "
                               "backward through it twice is not supported")
        if grad_loss is None:
            grads = [None, None, None]
        elif not bool(grad_loss == 1):
            grads = [None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in grads]
        return (*grads, None, None, None, None, None, None, None, None)

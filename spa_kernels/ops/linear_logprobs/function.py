"""Chunked log-probs from hidden states over a log-prob kernel backend (used by the cpu and cuda paths).

Forward: per chunk of tokens, logits = hidden_c @ weight.T (+ bias) by ATen matmul into one reusable [chunk, V]
buffer -> the backend's fused log-prob forward; only the per-token log-sum-exp is kept. Backward: per chunk, recompute
the logits into the buffer, let the backend's backward overwrite them with their gradient in place, then
grad_hidden_c = G @ W and grad_weight += G.T @ h_c, accumulated in float32 for bf16/fp16 weights (see
accumulate_mm). Peak extra memory: one chunk of logits, plus, for bf16/fp16 weights, the float32 accumulator of
grad_weight (and, only where torch's matmul cannot write float32 from bf16/fp16 inputs, a bounded slice of G.T @ h).
"""

from __future__ import annotations

from functools import cache

import torch

from ..._validation import acc_dtype, label_check
from ..logprobs.function import backend

_NO_IGNORE = -1  # tokens reaching this function are all scored (labels in [0, V)); -1 never matches one
CHUNK_BYTES = 256 * 2**20  # logits per chunk of the "torch" reference and the Triton path's tile budget
# CPU: logits per chunk. On the CPU a [chunk, H] x [H, V] matmul reaches its full rate from ~128 tokens on (the
# weight is then read once per >= 128 rows); larger chunks only add memory (and cache misses: a 2048-token chunk
# at V = 32000 is slower than 512 tokens). 32 MiB is 256 tokens at V = 32000 float32, 64 at V = 128256.
CPU_CHUNK_BYTES = 32 * 2**20
# CPU, fused pairwise loss (fused_linear_pair_loss): a chunk may grow to one whole pair's logits, up to this size, so
# that the loss gradient is applied to logits still in the buffer instead of rebuilding them (4 matmuls, not 5).
PAIR_CHUNK_BYTES = 256 * 2**20
# GPU: logits per chunk, at most GPU_CHUNK_BYTES and at most GPU_FREE_FRACTION of the memory free for tensors (the
# driver's free memory plus the caching allocator's unused reserve). At V = 128256 bf16, 512 MiB is 2048 tokens:
# a [2048, H] x [H, V] matmul already runs near peak, and a larger chunk would only take memory from the model.
GPU_CHUNK_BYTES = 512 * 2**20
GPU_FREE_FRACTION = 1 / 8
CHUNK_MULTIPLE = 128  # matmul-friendly chunk lengths


def default_chunk_size(vocab: int, budget_bytes: int = CHUNK_BYTES) -> int:
    return max(1, budget_bytes // (4 * max(vocab, 1)))


def free_device_bytes(device: torch.device) -> int:
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def chunk_size_for(tokens: int, vocab: int, dtype: torch.dtype, device: torch.device, free_bytes=None) -> int:
    """Tokens per chunk of the [chunk, V] logits buffer (in the logits' dtype), from V and, on a GPU, free memory."""
    row = max(vocab, 1) * torch.empty((), dtype=dtype).element_size()
    if device.type == "cuda":
        free = free_device_bytes(device) if free_bytes is None else free_bytes
        budget = min(GPU_CHUNK_BYTES, int(free * GPU_FREE_FRACTION))
    else:
        budget = CPU_CHUNK_BYTES
    chunk = max(1, budget // row)
    if chunk >= CHUNK_MULTIPLE:
        chunk -= chunk % CHUNK_MULTIPLE
    return max(1, min(chunk, tokens))


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


def chunk_logits_into(out, hidden, weight, bias):
    """out[:] = hidden @ weight.T (+ bias): the chunk's logits written into the reusable buffer."""
    if bias is None:
        return torch.mm(hidden, weight.t(), out=out)
    return torch.addmm(bias, hidden, weight.t(), out=out)


@cache
def _float32_addmm_of_reduced(device: torch.device) -> bool:
    """Whether torch.addmm(acc_f32, a_bf16, b_bf16, out_dtype=torch.float32, out=acc_f32) accumulates in place here
    (newer torch on CUDA; older versions require `acc` in the inputs' dtype). Probed once per device, on values."""
    if device.type != "cuda":
        return False
    try:
        acc = torch.ones(2, 2, device=device)
        a = torch.ones(2, 3, device=device, dtype=torch.bfloat16)
        torch.addmm(acc, a, a.t(), torch.float32, out=acc)
        return bool((acc == 4).all())
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slice_bytes: int) -> None:
    """acc += a @ b. acc is float32 when a, b are bf16/fp16: cuBLAS then accumulates straight into it where torch
    supports that; otherwise row slices of the product (at most slice_bytes each) are added, never a whole
    [rows, cols] product."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
    elif _float32_addmm_of_reduced(acc.device):
        torch.addmm(acc, a, b, acc.dtype, out=acc)
    else:
        rows = max(1, slice_bytes // max(1, b.shape[1] * a.element_size()))
        for r in range(0, a.shape[0], rows):
            acc[r:r + rows].add_(torch.mm(a[r:r + rows], b))


def chunked_linear_forward(kernels, hidden, weight, bias, labels, inv_temperature, chunk, softcap=None):
    M = hidden.shape[0]
    cap = {} if softcap is None else {"softcap": softcap}  # the kernels cap the scaled logits themselves
    dt = acc_dtype(hidden.dtype)
    token = hidden.new_empty(M, dtype=dt)
    lse = hidden.new_empty(M, dtype=dt)
    buf = hidden.new_empty(min(chunk, M), weight.shape[0])
    with label_check("trusted"):  # the public function has checked every label
        for s in range(0, M, chunk):
            h = hidden[s:s + chunk]
            z = chunk_logits_into(buf[:h.shape[0]], h, weight, bias).unsqueeze(0)
            t, lse_c = kernels.forward(z, labels[s:s + chunk].unsqueeze(0), _NO_IGNORE, inv_temperature, **cap)
            token[s:s + chunk] = t[0]
            lse[s:s + chunk] = lse_c[0]
    return token, lse


def chunked_linear_backward(kernels, grad_token, hidden, weight, bias, labels, lse, inv_temperature, chunk,
                            needs_input_grad, softcap=None):
    need_h, need_w, need_b = needs_input_grad
    reduced = weight.dtype in (torch.bfloat16, torch.float16)
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32 if reduced else weight.dtype,
                         device=weight.device) if need_w else None
    grad_b = torch.zeros(bias.shape, dtype=acc_dtype(bias.dtype), device=bias.device) if need_b else None
    buf = hidden.new_empty(min(chunk, hidden.shape[0]), weight.shape[0])
    cap = {} if softcap is None else {"softcap": softcap}
    with label_check("trusted"):
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s:s + chunk]
            z = chunk_logits_into(buf[:h.shape[0]], h, weight, bias).unsqueeze(0)
            g = kernels.backward(grad_token[s:s + chunk].unsqueeze(0), z, labels[s:s + chunk].unsqueeze(0),
                                 lse[s:s + chunk].unsqueeze(0), _NO_IGNORE, inv_temperature, grad_out=z, **cap)[0]
            if need_h:
                torch.mm(g, weight, out=grad_h[s:s + chunk])
            if need_w:
                accumulate_mm(grad_w, g.t(), h, slice_bytes=buf.nbytes // 2)
            if need_b:
                grad_b.add_(g.sum(0, dtype=grad_b.dtype))
    if grad_w is not None:
        grad_w = grad_w.to(weight.dtype)
    if grad_b is not None:
        grad_b = grad_b.to(bias.dtype)
    return grad_h, grad_w, grad_b


def linear_token_logprobs(hidden, weight, bias, labels, inv_temperature: float, chunk_size: int | None, impl: str,
                          softcap: float | None = None):
    """The chunked path for a backend ("cpu" / "cuda"); chunk_size=None picks it from V (and free GPU memory).
    With softcap the backend's kernels cap the chunk's scaled logits (softcap * tanh(u / softcap)) in forward and
    backward."""
    chunk = chunk_size or chunk_size_for(hidden.shape[0], weight.shape[0], weight.dtype, weight.device)
    return ChunkedLinearLogprobsFunction.apply(hidden, weight, bias, labels, inv_temperature, chunk, impl, softcap)


class ChunkedLinearLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, inv_temperature: float, chunk: int, impl: str,
                softcap: float | None = None):
        kernels = backend("logprobs", impl)
        token, lse = chunked_linear_forward(kernels, hidden, weight, bias, labels, inv_temperature, chunk, softcap)
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.args = (inv_temperature, chunk, impl, softcap)
        return token

    @staticmethod
    def backward(ctx, grad_token):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        inv_temperature, chunk, impl, softcap = ctx.args
        grads = chunked_linear_backward(backend("logprobs", impl), grad_token, hidden, weight, bias, labels, lse,
                                        inv_temperature, chunk, ctx.needs_input_grad[:3], softcap)
        return (*grads, None, None, None, None, None)


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
                           inv_temperature: float, chunk_size: int | None, impl: str, softcap: float | None = None):
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
                                             inv_temperature, chunk, impl, softcap)


class FusedLinearPairLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, index, seq_offsets, pair_loss, inv_temperature: float,
                chunk: int, impl: str, softcap: float | None = None):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        kernels = backend("logprobs", impl)
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

"""Chunked log-probs from hidden states over a log-prob kernel backend: the forward and backward of the cpu and cuda
linear_logprobs backends (cpu.py / cuda.py bind them to their log-prob kernels).

Forward: per chunk of tokens, logits = hidden_c @ weight.T (+ bias) by ATen matmul into one reusable [chunk, V]
buffer -> the backend's fused log-prob forward; only the per-token log-sum-exp is kept. Backward: per chunk, recompute
the logits into the buffer, let the backend's backward overwrite them with their gradient in place, then
grad_hidden_c = G @ W and grad_weight += G.T @ h_c, accumulated in float32 for bf16/fp16 weights (see
accumulate_mm). Peak extra memory: one chunk of logits, plus, for bf16/fp16 weights, the float32 accumulator of
grad_weight (and, only where torch's matmul cannot write float32 from bf16/fp16 inputs, a bounded slice of G.T @ h).
"""

from __future__ import annotations

import torch

from ..._accumulate import accumulate_mm
from ..._validation import acc_dtype, label_check

_NO_IGNORE = -1  # tokens reaching this function are all scored (labels in [0, V)); -1 never matches one
CHUNK_BYTES = 256 * 2**20  # logits per chunk of the "torch" reference and the Triton path's tile budget
# CPU: logits per chunk. On the CPU a [chunk, H] x [H, V] matmul reaches its full rate from ~128 tokens on (the
# weight is then read once per >= 128 rows); larger chunks only add memory (and cache misses: a 2048-token chunk
# at V = 32000 is slower than 512 tokens). 32 MiB is 256 tokens at V = 32000 float32, 64 at V = 128256.
CPU_CHUNK_BYTES = 32 * 2**20
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


def chunk_logits_into(out, hidden, weight, bias):
    """out[:] = hidden @ weight.T (+ bias): the chunk's logits written into the reusable buffer."""
    if bias is None:
        return torch.mm(hidden, weight.t(), out=out)
    return torch.addmm(bias, hidden, weight.t(), out=out)


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


def over(kernels):
    """(forward, backward) of the linear_logprobs backend protocol on `kernels` (a logprobs backend: the C++ CPU or
    the CUDA log-prob kernels), chunk by chunk of tokens; chunk_size=None picks the chunk from V (and free GPU
    memory). With softcap the kernels cap the chunk's scaled logits (softcap * tanh(u / softcap))."""

    def forward(hidden, weight, bias, labels, inv_temperature: float, chunk_size: int | None,
                softcap: float | None = None):
        """hidden [M, H], weight [V, H], bias [V] | None, labels [M] in [0, V) -> (token log-probs [M], lse [M])."""
        chunk = chunk_size or chunk_size_for(hidden.shape[0], weight.shape[0], weight.dtype, weight.device)
        return chunked_linear_forward(kernels, hidden, weight, bias, labels, inv_temperature, chunk, softcap)

    def backward(grad_token, hidden, weight, bias, labels, lse, inv_temperature: float, chunk_size: int | None,
                 needs_input_grad, softcap: float | None = None):
        """-> (grad_hidden, grad_weight, grad_bias), each None unless needed; chunks as in forward."""
        chunk = chunk_size or chunk_size_for(hidden.shape[0], weight.shape[0], weight.dtype, weight.device)
        return chunked_linear_backward(kernels, grad_token, hidden, weight, bias, labels, lse, inv_temperature,
                                       chunk, needs_input_grad, softcap)

    return forward, backward

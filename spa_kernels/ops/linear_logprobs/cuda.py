"""linear_logprobs with impl="cuda": ATen matmuls per chunk of tokens around the CUDA log-prob kernel (chunk
length from V and the GPU's free memory);
forward and backward are chunked.py's loops over those kernels."""

from __future__ import annotations

from ..logprobs import cuda as logits_kernels
from . import chunked

forward, backward = chunked.over(logits_kernels)

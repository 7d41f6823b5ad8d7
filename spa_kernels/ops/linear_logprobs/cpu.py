"""linear_logprobs with impl="cpu": ATen matmuls per chunk of tokens around the C++ log-prob kernel;
forward and backward are chunked.py's loops over those kernels."""

from __future__ import annotations

from ..logprobs import cpu as logits_kernels
from . import chunked

forward, backward = chunked.over(logits_kernels)

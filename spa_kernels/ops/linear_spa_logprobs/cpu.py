"""linear_spa_logprobs with impl="cpu": ATen matmuls per chunk of tokens around the cpu SPA kernel (chunked.py);
the backward is linear_logprobs' cpu backward (only the policy log-probs carry a gradient)."""

from __future__ import annotations

from ..linear_logprobs.cpu import backward  # noqa: F401 - this op's backward
from ..spa_logprobs import cpu as spa_kernels
from . import chunked

forward = chunked.over(spa_kernels)

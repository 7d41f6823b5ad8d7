"""linear_spa_logprobs with impl="cuda": ATen matmuls per chunk of tokens around the cuda SPA kernel (chunked.py);
the backward is linear_logprobs' cuda backward (only the policy log-probs carry a gradient)."""

from __future__ import annotations

from ..linear_logprobs.cuda import backward  # noqa: F401 - this op's backward
from ..spa_logprobs import cuda as spa_kernels
from . import chunked

forward = chunked.over(spa_kernels)

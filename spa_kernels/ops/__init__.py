"""One folder per op, one module per backend (reference.py = "torch", cpu.py, cuda.py, triton.py), function.py for
the autograd.Function the kernel backends share. Every kernel backend has `forward` and `backward` (the CUDA backward
of X is spa_kernels/ops/X/cuda.py:backward); spa_kernels/_dispatch.py lists them (BACKENDS) and hands the resolved
one to the Function. The op names match csrc/<op>/, tests/ops/test_<op>.py and benchmarks/:

  logprobs             token_logprobs, sequence_logprobs       (from logits)
  spa_logprobs         spa_sequence_logprobs                   (policy + reference + extrapolated, from logits)
  linear_logprobs      linear_sequence_logprobs                (from hidden states and the lm_head weight)
  linear_spa_logprobs  linear_spa_sequence_logprobs            (the SPA triple from hidden states)
"""

"""Run with `torchrun --nproc_per_node 2` (CPU, gloo): the fused log-prob head inside a model sharded with FSDP2
(fully_shard) gives the log-probs and (rank-averaged) gradients of the same model unsharded on the whole batch.
Cases: untied lm_head in the root unit, tied embeddings, and lm_head as its own unit (its weight is still a
sharded DTensor when the head reads it, so the head gathers it with full_tensor()). Prints "FSDP2 OK <case>" per
case; any mismatch raises. tests/integrations/test_multiprocess.py runs it."""

import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from spa_kernels.integrations._lm_head import add_logprob_head  # noqa: E402
from tests.toy import tiny_llama  # noqa: E402


def check(case, mesh, rank, world):
    sharded = tiny_llama(99, hidden_size=32, tie_word_embeddings=case == "tied")
    whole = tiny_llama(99, hidden_size=32, tie_word_embeddings=case == "tied")
    for model in (sharded, whole):
        add_logprob_head(model)
    for layer in sharded.model.layers:
        fully_shard(layer, mesh=mesh)
    if case == "own_unit":
        fully_shard(sharded.lm_head, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    assert isinstance(sharded.lm_head.weight, DTensor)

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 99, (2 * world, 12), generator=g)
    labels = ids.masked_fill(torch.arange(12) < 4, -100)  # a 4-token prompt
    mine = slice(2 * rank, 2 * rank + 2)
    got = sharded(input_ids=ids[mine], labels=labels[mine], spa_logprobs=True).logps
    got.sum().backward()
    want = whole(input_ids=ids, labels=labels, spa_logprobs=True).logps
    want.sum().backward()
    torch.testing.assert_close(got, want[mine].detach(), rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(sharded.named_parameters(), whole.parameters()):
        grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        # FSDP averages over ranks; the whole-batch model summed over all rows
        torch.testing.assert_close(grad, q.grad / world, rtol=1e-4, atol=1e-4 * q.grad.abs().max().item(),
                                   msg=f"{case}: {name}")
    print(f"FSDP2 OK {case} rank {rank}", flush=True)


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    for case in ("untied", "tied", "own_unit"):
        check(case, mesh, rank, world)
    # Every rank is done; then leave without the C++ teardown: torch's gloo threads occasionally abort a process at
    # exit ("terminate called without an active exception", SIGABRT) after every check has passed, even after a
    # barrier and destroy_process_group (seen now and then in CI on 2 busy cores).
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()

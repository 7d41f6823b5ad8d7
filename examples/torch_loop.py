"""A hand-written PyTorch DPO loop with the spa_kernels loss: a tiny random Llama learns to prefer correct sums
("3+4=" -> "7" over "9") on the CPU in seconds. No download.

    python examples/torch_loop.py [--steps 40] [--loss-type sigmoid|ipo|hinge|robust|simpo]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
from torch.utils.data import DataLoader

from spa_kernels.integrations.hf import PreferenceCollator, add_logprob_head, preference_loss_from_model

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # the checkout: tests/toy.py
from tests.toy import arithmetic_preferences, char_tokenizer, tiny_llama  # noqa: E402


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--loss-type", default="sigmoid")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args(argv)

    torch.manual_seed(0)
    tokenizer = char_tokenizer()
    policy = tiny_llama(len(tokenizer), hidden_size=64)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)  # the reference: the starting policy, frozen
    for model in (policy, ref):
        add_logprob_head(model)  # model(..., spa_logprobs=True) -> per-sequence log-probs, no [B, T, V] logits

    loader = DataLoader(arithmetic_preferences(256), batch_size=args.batch_size, shuffle=True,
                        collate_fn=PreferenceCollator(tokenizer, max_length=32))
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr)
    history = []
    while len(history) < args.steps:
        for batch in loader:
            out = preference_loss_from_model(policy, batch, ref_model=ref, beta=args.beta, loss_type=args.loss_type)
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            history.append({"loss": out.loss.item(), **out.metrics()})
            if len(history) % 10 == 0 or len(history) == 1:
                h = history[-1]
                print(f"step {len(history):3d}  loss {h['loss']:.4f}  rewards/accuracies "
                      f"{h['rewards/accuracies']:.2f}  rewards/margins {h['rewards/margins']:.4f}")
            if len(history) == args.steps:
                break
    return history


if __name__ == "__main__":
    main()

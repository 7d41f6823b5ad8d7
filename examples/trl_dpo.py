"""TRL's DPOTrainer with the spa_kernels loss: the one-line change is the import. A tiny random Llama on the CPU,
in seconds; no download.

    python examples/trl_dpo.py [--steps 40] [--loss-type sigmoid|ipo|hinge|robust]
    accelerate launch --config_file examples/accelerate/ddp_cpu.yaml examples/trl_dpo.py   # 2 CPU processes
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile

import torch
from datasets import Dataset
from trl import DPOConfig

from spa_kernels.integrations.trl import DPOTrainer  # was: from trl import DPOTrainer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # the checkout: tests/toy.py
from tests.toy import arithmetic_preferences, char_tokenizer, tiny_llama  # noqa: E402


def main(argv=None) -> DPOTrainer:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--loss-type", default="sigmoid")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--output-dir", default=None, help="default: a temporary directory")
    args = p.parse_args(argv)

    tokenizer = char_tokenizer()
    policy = tiny_llama(len(tokenizer), hidden_size=64)
    ref = copy.deepcopy(policy)  # pass ref_model explicitly: TRL would otherwise reload the policy by its hub name
    config = DPOConfig(
        output_dir=args.output_dir or tempfile.mkdtemp(prefix="spa_trl_"), max_steps=args.steps,
        per_device_train_batch_size=8, learning_rate=args.lr, lr_scheduler_type="constant", logging_steps=10,
        report_to="none", save_strategy="no", bf16=torch.cuda.is_available(), use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True, seed=0, loss_type=[args.loss_type], beta=args.beta, max_length=32)
    trainer = DPOTrainer(model=policy, ref_model=ref, args=config, processing_class=tokenizer,
                         train_dataset=Dataset.from_list(arithmetic_preferences(256)))
    trainer.train()
    return trainer


if __name__ == "__main__":
    main()

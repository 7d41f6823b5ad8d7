"""A few optimizer steps of a tiny Llama through one of the drop-in trainers; the main process saves the final
weights. tests/integrations/test_multiprocess.py runs it under `accelerate launch` with 2 CPU processes (gloo) and
once as a plain single process with the same global batch, and compares the weights.

    accelerate launch --multi_gpu --num_processes 2 tests/integrations/dist_train.py --driver trl \
        --per-device-batch 2 --out /tmp/w2.pt
    python tests/integrations/dist_train.py --driver trl --per-device-batch 4 --out /tmp/w1.pt

Drivers: trl, hf (the drop-in trainers), spa and spa-dnd (the spa trainer, spa.trainer.SPATrainer); another trainer
is one more entry in DRIVERS: a function (options) -> a transformers Trainer ready to .train().
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from tests.toy import char_tokenizer, load_preferences, tiny_llama  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "preferences.jsonl")


def training_kwargs(opts) -> dict:
    # SGD keeps the comparison sensitive to the gradient's scale (Adam would hide a factor of 2); no shuffling
    # differences: the sampler is seeded the same way for any number of processes
    return dict(output_dir=opts.output_dir, max_steps=opts.steps, per_device_train_batch_size=opts.per_device_batch,
                learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", logging_steps=1, report_to="none",
                save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0, data_seed=0, bf16=False,
                dataloader_num_workers=0)


def models():
    tokenizer = char_tokenizer()
    ref = tiny_llama(len(tokenizer))
    return tokenizer, copy.deepcopy(ref), ref


def trl_driver(opts):
    from datasets import Dataset
    from trl import DPOConfig

    from spa_kernels.integrations.trl import DPOTrainer

    tokenizer, policy, ref = models()
    return DPOTrainer(model=policy, ref_model=ref, processing_class=tokenizer,
                      train_dataset=Dataset.from_list(load_preferences(DATA)),
                      args=DPOConfig(**training_kwargs(opts), beta=0.5, max_length=96))


def hf_driver(opts):
    from datasets import Dataset
    from transformers import TrainingArguments

    from spa_kernels.integrations.hf import PreferenceTrainer

    tokenizer, policy, ref = models()
    return PreferenceTrainer(model=policy, ref_model=ref, processing_class=tokenizer, beta=0.5, max_length=96,
                             train_dataset=Dataset.from_list(load_preferences(DATA)),
                             args=TrainingArguments(**training_kwargs(opts)))


def _spa_trainer(opts, dnd: bool):
    """spa.s own trainer (spa.trainer.SPATrainer) on the same pairs: without DND the reference log-probs are
    precomputed (the seed-DPO path); with DND (lam 1/2) the reference model runs every step. refine_warmup=1.0
    keeps the label-flip weight a at 0: the noisy-pair window is per process, so only a = 0 makes one process and
    two comparable, and then the SPA loss equals DPO's through the extrapolated-logit kernel."""
    from transformers import TrainingArguments

    from spa.data import PromptEncoder
    from spa.refine import NoiseDetector
    from spa.scoring import score_sequences
    from spa.trainer import ListDataset, PairCollator, SPATrainer, tokenize_pairs

    tokenizer, policy, ref = models()
    enc = PromptEncoder(tokenizer, 10 ** 6, chat_template="none")
    pairs = [{"prompt": [{"role": "user", "content": r["prompt"]}], "chosen": r["chosen"], "rejected": r["rejected"]}
             for r in load_preferences(DATA)]
    feats, _ = tokenize_pairs(pairs, enc, 96)
    kw = dict(model=policy, processing_class=tokenizer, data_collator=PairCollator(tokenizer.pad_token_id),
              args=TrainingArguments(**training_kwargs(opts), remove_unused_columns=False), beta=0.5)
    if dnd:
        return SPATrainer(train_dataset=ListDataset(feats), loss_type="spa", ref_model=ref, lam=0.5,
                                 detector=NoiseDetector(), refine_warmup=1.0, **kw)
    items = [(f["prompt_ids"], f["chosen_ids"]) for f in feats] + [(f["prompt_ids"], f["rejected_ids"])
                                                                     for f in feats]
    lp = score_sequences(ref, items, tokenizer.pad_token_id, batch_size=8).tolist()
    for n, f in enumerate(feats):
        f["ref_chosen"], f["ref_rejected"] = lp[n], lp[n + len(feats)]
    return SPATrainer(train_dataset=ListDataset(feats), loss_type="sigmoid", **kw)


DRIVERS = {"trl": trl_driver, "hf": hf_driver, "spa": lambda opts: _spa_trainer(opts, dnd=False),
           "spa-dnd": lambda opts: _spa_trainer(opts, dnd=True)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--driver", choices=sorted(DRIVERS), required=True)
    p.add_argument("--per-device-batch", type=int, required=True)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", required=True, help="where the main process saves {state, world_size, log}")
    p.add_argument("--output-dir", default=None)
    opts = p.parse_args(argv)
    opts.output_dir = opts.output_dir or os.path.dirname(os.path.abspath(opts.out))
    trainer = DRIVERS[opts.driver](opts)
    trainer.train()
    state = trainer.accelerator.get_state_dict(trainer.model_wrapped)  # collective: gathers ZeRO-3 / FSDP shards
    if trainer.accelerator.is_main_process:
        torch.save({"state": {k: v.detach().cpu().float().clone() for k, v in state.items()},
                    "world_size": trainer.accelerator.num_processes,
                    "distributed_type": str(trainer.accelerator.distributed_type),
                    "log": trainer.state.log_history}, opts.out)
    # Tear the process group down before the interpreter exits: a gloo worker thread still alive at exit can abort
    # the process ("terminate called without an active exception") after the results are written.
    trainer.accelerator.wait_for_everyone()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

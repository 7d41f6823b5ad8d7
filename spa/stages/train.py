"""The train stage: DPO-family training of iteration i's model with SPATrainer (spa.trainer).

  iteration 0      DPO (sigmoid) on the seed, from pi_init with reference pi_init, train.seed_epochs epochs
  iteration i >= 1 train.iteration_loss on iter_<i>/pairs.jsonl, from pi_{i-1} with reference pi_{i-1}: "spa" is
                   the self-refined loss (spa.refine) when refine.enabled, lam = refine.lam[i-1] when refine.dnd
Without DND the reference log-probs are computed once before training and the reference model is freed; with DND
the reference model stays and gives its hidden states per step (no_grad). With model.peft the policy is a LoRA
adapter on pi_init's weights and every reference a view of the same weights (adapter disabled, or the previous
adapter frozen): spa.models.
Writes output_dir/iter_<i>/model/ (save_pretrained, with the tokenizer; with model.peft the adapter),
iter_<i>/train_metrics.json and iter_<i>/train_log.jsonl (the Trainer's log history). Checkpoints go to
output_dir/.partial/iter_<i>/train/; a rerun resumes from the last complete one (resume_from_checkpoint is passed
through to Trainer.train).
"""

from __future__ import annotations

import json
import logging
import os
import time

from .. import data as data_mod
from .. import distributed as dist
from ..io import Layout, atomic_write_json, read_jsonl, seed_everything
from ..models import (
    init_model_path,
    load_causal_lm,
    load_tokenizer,
    resolve_device,
    training_policy,
    training_reference,
)
from ..refine import NoiseDetector, lam_for_iteration
from ..scoring import kernel_impl, score_sequences
from ..trainer import (
    CrashPointCallback,
    ListDataset,
    PairCollator,
    SPATrainer,
    finish_stage,
    last_checkpoint,
    log_summary,
    quiet_progress,
    resumed_step,
    tokenize_pairs,
    training_arguments,
    uneven_last_batch,
)

logger = logging.getLogger("spa")


def precompute_ref_logps(ref_model, feats: list[dict], pad_id: int, batch_size: int, impl: str) -> None:
    """Adds ref_chosen / ref_rejected (summed response log-probs under the reference) to every feature."""
    items = [(f["prompt_ids"], f["chosen_ids"]) for f in feats] + [(f["prompt_ids"], f["rejected_ids"])
                                                                     for f in feats]
    lp = score_sequences(ref_model, items, pad_id, batch_size, impl,  # every process scores all; one bar
                         progress="reference log-probs" if dist.is_main() else None).tolist()
    for n, f in enumerate(feats):
        f["ref_chosen"], f["ref_rejected"] = lp[n], lp[n + len(feats)]


def run_train(cfg, iteration: int) -> str:
    """DPO (iteration 0: on the seed) or the SPA iteration's training; returns the model folder."""
    lay = Layout(cfg.output_dir)
    name = f"iter_{iteration}"
    partial = lay.partial(name, "train")
    t = cfg.train
    device = resolve_device(cfg.model.device)
    if iteration == 0:
        pairs, _, _, info = data_mod.seed_and_pools(cfg)
        init_path = ref_path = init_model_path(cfg)
        loss_type, epochs, lam = "sigmoid", t.seed_epochs, None
    else:
        pairs, info = read_jsonl(lay.pairs(iteration)), {}
        init_path = ref_path = lay.model(iteration - 1)
        epochs = t.epochs
        loss_type = t.iteration_loss
        if loss_type == "spa" and not cfg.refine.enabled:
            loss_type = "sigmoid"
        lam = lam_for_iteration(cfg.refine.lam, iteration) if loss_type == "spa" and cfg.refine.dnd else None
    tok = load_tokenizer(init_path, cfg.model.trust_remote_code)
    enc = data_mod.PromptEncoder(tok, cfg.data.max_prompt_length, cfg.data.long_prompts, cfg.data.chat_template)
    feats, counts = tokenize_pairs(pairs, enc, t.max_length)
    if not feats:
        raise ValueError(f"train {name}: no pair fits (data.max_prompt_length / train.max_length)")
    if loss_type == "dlma" and "score_margin" not in feats[0]:
        raise ValueError(f"train {name}: dlma needs judge scores (score_chosen / score_rejected) in the pairs")

    seed_everything(cfg.seed, "train", iteration)
    peft = cfg.model.peft is not None
    if peft:  # one copy of pi_init's weights: the policy's adapter on it, the reference a view (spa.models)
        model = training_policy(cfg, init_path, device, t.gradient_checkpointing)
        ref_model = training_reference(model, ref_path, per_step=lam is not None)
    else:
        ref_model = load_causal_lm(ref_path, cfg.model, device)
    if lam is None:  # precompute once (cached across a crash), then free the reference model
        cache = os.path.join(partial, "ref_logps.json")
        if os.path.exists(cache):
            with open(cache) as f:
                for f_, (c, r) in zip(feats, json.load(f)):
                    f_["ref_chosen"], f_["ref_rejected"] = c, r
        else:
            precompute_ref_logps(ref_model, feats, tok.pad_token_id, cfg.judge.batch_size, kernel_impl(cfg))
            if dist.is_main():  # every process computed the same values
                atomic_write_json(cache, [[f_["ref_chosen"], f_["ref_rejected"]] for f_ in feats])
        del ref_model
        ref_model = None
    if not peft:  # loaded after the reference is freed: one full model in memory at a time without DND
        model = load_causal_lm(init_path, cfg.model, device, train=True)
    args = training_arguments(partial, cfg, batch_size=t.batch_size, per_device=t.per_device_batch_size,
                          lr=t.learning_rate, epochs=epochs, scheduler=t.lr_scheduler_type, warmup=t.warmup_ratio,
                          weight_decay=t.weight_decay)
    detector = NoiseDetector(cfg.refine.percentile, cfg.refine.window) if loss_type == "spa" else None
    trainer = SPATrainer(model=model, args=args, train_dataset=ListDataset(feats),
                         data_collator=PairCollator(tok.pad_token_id), processing_class=tok,
                         loss_type=loss_type, beta=t.beta, ref_model=ref_model, lam=lam, detector=detector,
                         refine_alpha=cfg.refine.alpha, refine_warmup=cfg.refine.warmup_ratio,
                         dlma_gamma=t.dlma_gamma, kernel_impl=kernel_impl(cfg),
                         callbacks=[CrashPointCallback("train")])
    trainer.stage = f"{name}/train"
    quiet_progress(trainer, f"train {name}")
    uneven = uneven_last_batch(len(feats), t.batch_size, trainer.accelerator.num_processes)
    if uneven and dist.is_main():
        logger.warning("%s/train: %s", name, uneven)
    checkpoint = dist.broadcast(last_checkpoint(partial))
    resumed_at = resumed_step(checkpoint, f"{name}/train")
    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=checkpoint)
    seconds = time.perf_counter() - t0
    tokens = sum(2 * len(f["prompt_ids"]) + len(f["chosen_ids"]) + len(f["rejected_ids"]) for f in feats)
    # this session's share of the tokens: after a resume, the steps before the checkpoint were trained earlier
    trained = (trainer.state.global_step - resumed_at) / max(trainer.state.global_step, 1)
    metrics = {**info, **counts, "train/pairs": len(feats), "train/loss_type": loss_type, "train/lam": lam,
               "train/steps": trainer.state.global_step, "train/resumed_from_step": resumed_at,
               "train/seconds_computed": seconds,
               "train/tokens_per_s": tokens * epochs * trained / max(result.metrics.get("train_runtime", seconds),
                                                                     1e-9),
               **log_summary(trainer.state.log_history, "train")}
    return finish_stage(trainer, tok, lay.model(iteration), partial, metrics, lay.stage_metrics(name, "train"),
                   lay.path(name, "train_log.jsonl"))


__all__ = ["run_train", "precompute_ref_logps"]

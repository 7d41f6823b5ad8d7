"""The sft stage: supervised fine-tuning on demonstrations (loss on response tokens only) with SFTTrainer
(spa.trainer), from model.name_or_path or, with sft.from_scratch, a freshly initialised model (how the demo's tiny
Llama is made). Writes output_dir/sft/model/, sft/sft_metrics.json and sft/sft_log.jsonl; resumes from the last
complete checkpoint in output_dir/.partial/sft/train/.
"""

from __future__ import annotations

import logging
import time

from .. import data as data_mod
from .. import distributed as dist
from ..io import Layout, seed_everything
from ..models import load_causal_lm, load_tokenizer, new_model, resolve_device
from ..trainer import (
    CrashPointCallback,
    ListDataset,
    SFTCollator,
    SFTTrainer,
    finish_stage,
    last_checkpoint,
    log_summary,
    quiet_progress,
    resumed_step,
    training_arguments,
)

logger = logging.getLogger("spa")


def run_sft(cfg) -> str:
    """Supervised fine-tuning on sft.data; returns output_dir/sft/model."""
    lay = Layout(cfg.output_dir)
    s = cfg.sft
    if not s.data:
        raise ValueError("sft.data is not set: the SFT stage needs demonstrations")
    tok_path = cfg.model.tokenizer or cfg.model.name_or_path
    if not tok_path:
        raise ValueError("model.tokenizer (or model.name_or_path) is needed for the SFT stage")
    tok = load_tokenizer(tok_path, cfg.model.trust_remote_code)
    demos, stats = data_mod.load_demos(s.data, s.split, cfg.data.skip_invalid)
    enc = data_mod.PromptEncoder(tok, cfg.data.max_prompt_length, cfg.data.long_prompts, cfg.data.chat_template)
    feats, cut, too_long = [], 0, 0
    for d in demos:
        p = enc.encode(d["prompt"])
        if p is None:  # longer than data.max_prompt_length: counted by the encoder (data/prompts_skipped_long)
            continue
        if len(p) >= s.max_length:  # no room for a single response token
            too_long += 1
            continue
        r = enc.encode_response(d["response"])
        if len(p) + len(r) > s.max_length:
            cut += 1
            r = r[:s.max_length - len(p)]
        feats.append({"prompt_ids": p, "response_ids": r})
    if not feats:
        raise ValueError(f"sft: none of the {len(demos)} demonstrations of {s.data} fits: {too_long} prompts fill "
                         f"sft.max_length {s.max_length}, the rest exceed data.max_prompt_length "
                         f"{cfg.data.max_prompt_length} tokens")
    seed_everything(cfg.seed, "sft")
    device = resolve_device(cfg.model.device)
    if s.from_scratch is not None:
        model = new_model(tok, s.from_scratch).to(device)
    else:
        if not cfg.model.name_or_path:
            raise ValueError("model.name_or_path is needed for the SFT stage (or sft.from_scratch)")
        model = load_causal_lm(cfg.model.name_or_path, cfg.model, device, train=True)
    parameters = sum(p.numel() for p in model.parameters())
    if dist.is_main():  # the size, before hours of training: a from_scratch key left out takes transformers' default
        c = model.config
        size = (f"{parameters / 1e9:.2f}B" if parameters >= 1e9 else f"{parameters / 1e6:.2f}M" if parameters >= 1e5
                else f"{parameters / 1e3:.1f}K")
        logger.info("sft: %s %s, %s parameters (%s layers, hidden %s, intermediate %s), %d examples",
                    "a new" if s.from_scratch is not None else "fine-tuning", c.model_type, size,
                    getattr(c, "num_hidden_layers", "?"), getattr(c, "hidden_size", "?"),
                    getattr(c, "intermediate_size", "?"), len(feats))
    partial = lay.partial("sft", "train")
    args = training_arguments(partial, cfg, batch_size=s.batch_size, per_device=None, lr=s.learning_rate,
                          epochs=s.epochs, scheduler=s.lr_scheduler_type, warmup=s.warmup_ratio,
                          weight_decay=s.weight_decay, max_steps=s.max_steps)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ListDataset(feats), data_collator=SFTCollator(
        tok.pad_token_id), processing_class=tok, callbacks=[CrashPointCallback("sft")])
    trainer.stage = "sft"
    quiet_progress(trainer, "sft")
    if too_long and dist.is_main():
        logger.warning("sft: %d of %d demonstrations skipped: their prompt alone fills sft.max_length %d tokens",
                       too_long, len(demos), s.max_length)
    checkpoint = dist.broadcast(last_checkpoint(partial))
    resumed_step(checkpoint, "sft")
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=checkpoint)
    metrics = {**stats.as_metrics("data/sft"), **enc.metrics(), "sft/examples": len(feats),
               "sft/prompts_over_max_length": too_long, "sft/parameters": parameters,
               "sft/responses_truncated": cut, "sft/steps": trainer.state.global_step,
               "sft/seconds_computed": time.perf_counter() - t0, **log_summary(trainer.state.log_history, "sft")}
    return finish_stage(trainer, tok, lay.sft_model, partial, metrics, lay.stage_metrics("sft", "sft"),
                   lay.path("sft", "sft_log.jsonl"))


__all__ = ["run_sft"]

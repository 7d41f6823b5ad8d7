"""The validate stage: iteration i's model on the held-out gold seed pairs (spa.validation) ->
output_dir/iter_<i>/validation.json (the metrics) and validation_pairs.json (the per-pair log-probs they are
computed from)."""

from __future__ import annotations

import logging

from .. import data as data_mod
from .. import distributed as dist
from ..io import Layout, atomic_write_json
from ..models import init_model_path, load_model, load_tokenizer, reference_model, resolve_device
from ..scoring import kernel_impl
from ..validation import validation_metrics, validation_rows, validation_scores

logger = logging.getLogger("spa")


def run_validate(cfg, iteration: int) -> str:
    """Measures iteration i's model on the held-out gold pairs; returns iter_<i>/validation_pairs.json."""
    lay = Layout(cfg.output_dir)
    if not dist.is_main():  # a few hundred held-out pairs: the main process alone scores them
        return lay.validation_pairs(iteration)
    device = resolve_device(cfg.model.device)
    path = lay.model(iteration)
    tok = load_tokenizer(path, cfg.model.trust_remote_code)
    enc = data_mod.PromptEncoder(tok, cfg.data.max_prompt_length, cfg.data.long_prompts, cfg.data.chat_template)
    rows = validation_rows(cfg, enc)
    if not rows:
        raise ValueError("validate: no held-out validation pair fits data.max_prompt_length; raise "
                         "data.validation_size or data.max_prompt_length")
    model = load_model(path, cfg, device)
    reference = reference_model(cfg, model, init_model_path(cfg), device)
    scores = validation_scores(model, reference, enc, rows, cfg.judge.batch_size, kernel_impl(cfg))
    metrics = validation_metrics(scores, cfg.train.beta)
    atomic_write_json(lay.validation(iteration), metrics)
    out = lay.validation_pairs(iteration)
    atomic_write_json(out, scores)  # last: the stage's done mark (a run validated without it is validated again)
    m = metrics
    logger.info("validate iter %d: reward accuracy %.3f (95%% CI %.2f-%.2f) on %d held-out gold pairs, margin %.3f",
                iteration, m["val/reward_accuracy"], m["val/reward_accuracy_ci_low"],
                m["val/reward_accuracy_ci_high"], m["val/reward_accuracy_pairs"], m["val/reward_margin"])
    return out


__all__ = ["run_validate"]

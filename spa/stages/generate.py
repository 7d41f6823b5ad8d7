"""The generate stage: K sampled responses per prompt from pi_{i-1} with the generate.backend (spa.generation;
default transformers' generate, batched with left padding in length order), in resumable shards (split between the
processes of a multi-process launch, spa.distributed), with a progress bar and tokens/s.

Writes output_dir/iter_<i>/samples.jsonl: {"id", "prompt", "responses": [K], "finished": [K], "num_tokens": [K]}
(finished = ended with EOS rather than at max_new_tokens) and iter_<i>/generate_metrics.json.
"""

from __future__ import annotations

import logging

from .. import data as data_mod
from .. import distributed as dist
from ..generation import build_backend, generate_responses
from ..io import Layout, atomic_write_json, atomic_write_jsonl, remove_partial, sharded
from ..models import load_model, load_tokenizer, resolve_device

logger = logging.getLogger("spa")


def run_generate(cfg, iteration: int) -> str:
    """Samples for iteration >= 1 from the previous iteration's model; returns the samples.jsonl path."""
    if iteration < 1:
        raise ValueError(f"generate runs in iterations >= 1 (iteration 0 is the seed DPO), got {iteration}")
    lay = Layout(cfg.output_dir)
    final = lay.samples(iteration)
    _, _, pools, info = data_mod.seed_and_pools(cfg)
    if iteration > len(pools):
        raise ValueError(f"iteration {iteration} has no prompt pool: loop.iterations is {cfg.loop.iterations}")
    policy_path = lay.model(iteration - 1)
    g = cfg.generate
    tok = load_tokenizer(policy_path, cfg.model.trust_remote_code)
    enc = data_mod.PromptEncoder(tok, cfg.data.max_prompt_length, cfg.data.long_prompts, cfg.data.chat_template)
    items = []
    for p in pools[iteration - 1]:
        ids = enc.encode(p["prompt"])
        if ids is not None:
            items.append({**p, "ids": ids})
    device = resolve_device(cfg.model.device)
    # A LoRA run's policy is an adapter: sampled unmerged, the model the judge, validate and eval score. Merging it
    # into bf16 / fp16 base weights would round small updates away (most entries of a 1e-5 update are lost).
    model = load_model(policy_path, cfg, device) if g.backend == "hf" else None
    backend = build_backend(g, policy_path, cfg.model, tok, device, model=model)
    totals = {"new_tokens": 0, "seconds": 0.0, "shards_computed": 0}

    def work(shard: int, chunk: list[dict]) -> list[dict]:
        res, stats = generate_responses(backend, tok, [c["ids"] for c in chunk], g.num_samples,
                                        temperature=g.temperature, top_p=g.top_p, max_new_tokens=g.max_new_tokens,
                                        seed_key=(cfg.seed, "generate", iteration, shard),
                                        progress=f"generate iter {iteration} shard {shard}" if dist.is_main() else None)
        totals["new_tokens"] += stats["new_tokens"]
        totals["seconds"] += stats["seconds"]
        totals["shards_computed"] += 1
        return [{"id": c["id"], "prompt": c["prompt"], **r} for c, r in zip(chunk, res)]

    rows = [r for shard in sharded(items, g.shard_size, lay.partial(f"iter_{iteration}", "generate"), "generate", work)
            for r in shard]
    per_process = dist.gather(totals)
    if not dist.is_main():
        return final
    new_tokens = sum(t["new_tokens"] for t in per_process)
    seconds = max(t["seconds"] for t in per_process)  # the processes run at the same time
    n_resp = sum(len(r["responses"]) for r in rows)
    metrics = {**info, **enc.metrics(), "generate/prompts": len(rows), "generate/responses": n_resp,
               "generate/unfinished": sum(not f for r in rows for f in r["finished"]),
               "generate/mean_tokens": sum(sum(r["num_tokens"]) for r in rows) / max(n_resp, 1),
               "generate/new_tokens_computed": new_tokens,
               "generate/tokens_per_s": new_tokens / max(seconds, 1e-9),
               "generate/shards_computed": sum(t["shards_computed"] for t in per_process),
               "generate/shards_per_process": [t["shards_computed"] for t in per_process],
               "generate/backend": g.backend}
    atomic_write_json(lay.stage_metrics(f"iter_{iteration}", "generate"), metrics)
    atomic_write_jsonl(final, rows)  # last: its existence marks the stage done
    remove_partial(lay.partial(f"iter_{iteration}", "generate"))
    logger.info("generate iter %d: %d prompts x %d samples, %.0f tokens/s", iteration, len(rows), g.num_samples,
                metrics["generate/tokens_per_s"])
    return final

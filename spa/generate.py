"""The generate stage: K sampled responses per prompt from pi_{i-1} with the generate.backend (spa.generation;
default transformers' generate, batched with left padding in length order), in resumable shards (split between the
processes of a multi-process launch, spa.distributed), with a progress bar and tokens/s.

Writes output_dir/iter_<i>/samples.jsonl: {"id", "prompt", "responses": [K], "finished": [K], "num_tokens": [K]}
(finished = ended with EOS rather than at max_new_tokens) and iter_<i>/generate_metrics.json.
"""

from __future__ import annotations

import logging
import time

import torch

from . import data as data_mod
from . import distributed as dist
from .generation import HFBackend, SamplingParams, build_backend
from .io import Layout, atomic_write_json, atomic_write_jsonl, remove_partial, sharded
from .modeling import load_model, load_tokenizer, resolve_device

logger = logging.getLogger("spa")


def generate_responses(generator, tokenizer, prompts: list[list[int]], num_samples: int, *, temperature: float,
                       top_p: float, max_new_tokens: int, seed_key: tuple, batch_size: int | None = None,
                       progress: str | None = None) -> tuple[list[dict], dict]:
    """num_samples responses for each tokenised prompt. `generator`: a spa.generation.GenerationBackend, or a
    transformers causal LM, run with the hf backend in batches of `batch_size` prompts. The backend derives every
    seed from seed_key, so the result depends only on the prompts and seed_key. temperature 0 = greedy.
    Returns ([{responses, finished, num_tokens}], stats)."""
    if isinstance(generator, torch.nn.Module):  # a transformers model: the hf backend
        if batch_size is None:
            raise ValueError("batch_size is needed to generate with a transformers model")
        generator = HFBackend(generator, tokenizer.pad_token_id, tokenizer.eos_token_id, batch_size)
    eos = tokenizer.eos_token_id
    t0 = time.perf_counter()
    params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
    token_ids = generator.generate(prompts, num_samples, params, seed_key, progress)
    seconds = time.perf_counter() - t0
    out, new_tokens = [], 0
    for rows in token_ids:
        texts, finished, counts = [], [], []
        for toks in rows:
            done = bool(toks) and toks[-1] == eos
            texts.append(tokenizer.decode(toks[:-1] if done else toks, skip_special_tokens=True))
            finished.append(done)
            counts.append(len(toks))
            new_tokens += len(toks)
        out.append({"responses": texts, "finished": finished, "num_tokens": counts})
    return out, {"new_tokens": new_tokens, "seconds": seconds, "tokens_per_s": new_tokens / max(seconds, 1e-9)}


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

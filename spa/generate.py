"""The generate stage: K sampled responses per prompt from pi_{i-1} with model.generate, batched with left padding
in length order, in resumable shards, with a progress bar and tokens/s.

Writes output_dir/iter_<i>/samples.jsonl: {"id", "prompt", "responses": [K], "finished": [K], "num_tokens": [K]}
(finished = ended with EOS rather than at max_new_tokens) and iter_<i>/generate_metrics.json.
"""

from __future__ import annotations

import logging
import time

import torch

from . import data as data_mod
from .io import Layout, atomic_write_json, atomic_write_jsonl, remove_partial, seed_everything, sharded
from .modeling import load_model, load_tokenizer, resolve_device

logger = logging.getLogger("spa")


@torch.inference_mode()
def generate_responses(model, tokenizer, prompts: list[list[int]], num_samples: int, *, temperature: float,
                       top_p: float, max_new_tokens: int, batch_size: int, seed_key: tuple,
                       progress: str | None = None) -> tuple[list[dict], dict]:
    """num_samples responses for each tokenised prompt. Batch b is seeded from (seed_key, b), so the result depends
    only on the prompts and seed_key. temperature 0 = greedy. Returns ([{responses, finished, num_tokens}], stats)."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[dict | None] = [None] * len(prompts)
    new_tokens, t0 = 0, time.perf_counter()
    sample = temperature > 0
    gen_kw = dict(do_sample=sample, max_new_tokens=max_new_tokens, num_return_sequences=num_samples if sample else 1,
                  pad_token_id=pad, eos_token_id=eos)
    if sample:
        gen_kw.update(temperature=temperature, top_p=top_p, top_k=0)  # top_k=0: no top-k cut (the paper has none)
    bar = tqdm(total=len(prompts), desc=progress, disable=progress is None, leave=False, unit="prompt")
    for b, s in enumerate(range(0, len(order), batch_size)):
        idx = order[s:s + batch_size]
        T = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), T), pad, dtype=torch.long)
        att = torch.zeros((len(idx), T), dtype=torch.long)
        for r, i in enumerate(idx):  # left padding
            ids[r, T - len(prompts[i]):] = torch.tensor(prompts[i])
            att[r, T - len(prompts[i]):] = 1
        seed_everything(*seed_key, b)
        seqs = model.generate(input_ids=ids.to(device), attention_mask=att.to(device), **gen_kw)[:, T:].cpu()
        if not sample:  # greedy: the same response num_samples times
            seqs = seqs.repeat_interleave(num_samples, 0)
        for r, i in enumerate(idx):
            texts, finished, counts = [], [], []
            for row in seqs[r * num_samples:(r + 1) * num_samples].tolist():
                done = eos in row
                toks = row[:row.index(eos)] if done else [t for t in row if t != pad]
                texts.append(tokenizer.decode(toks, skip_special_tokens=True))
                finished.append(done)
                counts.append(len(toks) + int(done))
                new_tokens += len(toks) + int(done)
            out[i] = {"responses": texts, "finished": finished, "num_tokens": counts}
        bar.update(len(idx))
        elapsed = time.perf_counter() - t0
        bar.set_postfix(tok_s=f"{new_tokens / max(elapsed, 1e-9):.0f}")
    bar.close()
    seconds = time.perf_counter() - t0
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
    model = load_model(policy_path, cfg, resolve_device(cfg.model.device), merge=True)
    totals = {"new_tokens": 0, "seconds": 0.0, "shards_computed": 0}

    def work(shard: int, chunk: list[dict]) -> list[dict]:
        res, stats = generate_responses(model, tok, [c["ids"] for c in chunk], g.num_samples,
                                        temperature=g.temperature, top_p=g.top_p, max_new_tokens=g.max_new_tokens,
                                        batch_size=g.batch_size, seed_key=(cfg.seed, "generate", iteration, shard),
                                        progress=f"generate iter {iteration} shard {shard}")
        totals["new_tokens"] += stats["new_tokens"]
        totals["seconds"] += stats["seconds"]
        totals["shards_computed"] += 1
        return [{"id": c["id"], "prompt": c["prompt"], **r} for c, r in zip(chunk, res)]

    rows = [r for shard in sharded(items, g.shard_size, lay.partial(f"iter_{iteration}", "generate"), "generate", work)
            for r in shard]
    n_resp = sum(len(r["responses"]) for r in rows)
    metrics = {**info, **enc.metrics(), "generate/prompts": len(rows), "generate/responses": n_resp,
               "generate/unfinished": sum(not f for r in rows for f in r["finished"]),
               "generate/mean_tokens": sum(sum(r["num_tokens"]) for r in rows) / max(n_resp, 1),
               "generate/new_tokens_computed": totals["new_tokens"],
               "generate/tokens_per_s": totals["new_tokens"] / max(totals["seconds"], 1e-9),
               "generate/shards_computed": totals["shards_computed"]}
    atomic_write_json(lay.stage_metrics(f"iter_{iteration}", "generate"), metrics)
    atomic_write_jsonl(final, rows)  # last: its existence marks the stage done
    remove_partial(lay.partial(f"iter_{iteration}", "generate"))
    logger.info("generate iter %d: %d prompts x %d samples, %.0f tokens/s", iteration, len(rows), g.num_samples,
                metrics["generate/tokens_per_s"])
    return final

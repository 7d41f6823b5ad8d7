"""The eval stage: a model against the SFT model on held-out prompts, scored by a gold oracle.

For each held-out prompt (eval.prompts) every model samples eval.num_samples responses with the same seeds
(common random numbers: the comparison is not blurred by independent sampling noise). Reported:
  win_rate_vs_sft   mean over (prompt, sample) of 1 if oracle(model) > oracle(sft), 1/2 on a tie, else 0
  mean_score        mean oracle score;  mean_tokens / mean_chars: response length
  exact_rate        fraction of responses with an oracle score of 1 or more (a perfect response for an oracle
                    scoring in [0, 1], as the built-in tasks' do)
  reward_accuracy   on held-out gold pairs (eval.pairs): how often the model's implicit reward
                    beta*(log pi(y|x) - log pi_init(y|x)) ranks chosen above rejected (ties 1/2)
Writes output_dir/<sft|iter_i>/eval_samples.jsonl and eval.json. Under a multi-process launch the sampling shards
are split between the processes (spa.distributed); the main process scores and writes.
"""

from __future__ import annotations

import logging
import math
import os

from .. import data as data_mod
from .. import distributed as dist
from ..generation import build_backend, generate_responses
from ..io import Layout, atomic_write_json, atomic_write_jsonl, eval_name, read_jsonl, remove_partial, sharded
from ..judges import ImplicitRewardJudge
from ..models import init_model_path, load_model, load_tokenizer, reference_model, resolve_device
from ..oracle import load_oracle, pairwise_win
from ..scoring import kernel_impl

logger = logging.getLogger("spa")


def _mean_se(xs: list[float]) -> tuple[float, float]:
    n = len(xs)
    m = sum(xs) / n
    var = sum((x - m) ** 2 for x in xs) / (n - 1) if n > 1 else 0.0
    return m, math.sqrt(var / n)


def run_eval(cfg, iteration: int | None) -> str:
    """Evaluates pi_init (iteration None) or iteration i's model; returns the eval.json path."""
    e = cfg.eval
    if not e.prompts and not e.pairs:
        raise ValueError("eval needs eval.prompts (win rate, score, length) and/or eval.pairs (reward accuracy)")
    lay = Layout(cfg.output_dir)
    name = eval_name(iteration)
    # decided by the main process alone, so that every process of a multi-process run takes the same branch
    if iteration is not None and e.prompts and e.oracle and dist.broadcast(not os.path.exists(lay.eval("sft"))):
        run_eval(cfg, None)  # the baseline every model is compared with
    path = init_model_path(cfg) if iteration is None else lay.model(iteration)
    device = resolve_device(cfg.model.device)
    tok = load_tokenizer(path, cfg.model.trust_remote_code)
    enc = data_mod.PromptEncoder(tok, cfg.data.max_prompt_length, cfg.data.long_prompts, cfg.data.chat_template)
    model = load_model(path, cfg, device) if cfg.generate.backend == "hf" or e.pairs else None
    oracle = load_oracle(e.oracle) if e.oracle else None
    result: dict = {"model": path}

    if e.prompts:
        prompts, _ = data_mod.load_prompts(e.prompts, e.prompts_split, cfg.data.skip_invalid)
        prompts = prompts[:e.max_prompts] if e.max_prompts else prompts
        items = [{**p, "ids": ids} for p in prompts if (ids := enc.encode(p["prompt"])) is not None]
        max_new = e.max_new_tokens or cfg.generate.max_new_tokens

        backend = build_backend(cfg.generate, path, cfg.model, tok, device, model)

        def work(shard: int, chunk: list[dict]) -> list[dict]:
            res, _ = generate_responses(backend, tok, [c["ids"] for c in chunk], e.num_samples,
                                        temperature=e.temperature, top_p=cfg.generate.top_p, max_new_tokens=max_new,
                                        seed_key=(cfg.seed, "eval", shard),
                                        progress=f"eval {name} shard {shard}" if dist.is_main() else None)
            rows = []
            for c, r in zip(chunk, res):
                row = {"id": c["id"], "prompt": c["prompt"], **r}
                if oracle is not None:
                    q = data_mod.prompt_text(c["prompt"])
                    row["oracle"] = [float(oracle(q, y)) for y in r["responses"]]
                rows.append(row)
            return rows

        rows = [r for shard in sharded(items, cfg.generate.shard_size, lay.partial(name, "eval"), "eval", work)
                for r in shard]
    if not dist.is_main():  # the scores and the outputs are the main process's
        return lay.eval(name)
    if e.prompts:
        atomic_write_jsonl(lay.eval_samples(name), rows)
        resp = [(y, n) for r in rows for y, n in zip(r["responses"], r["num_tokens"])]
        result.update({"eval/prompts": len(rows), "eval/samples": len(resp), **enc.metrics(),
                       "eval/mean_tokens": sum(n for _, n in resp) / len(resp),
                       "eval/mean_chars": sum(len(y) for y, _ in resp) / len(resp)})
        if oracle is not None:
            scores = [s for r in rows for s in r["oracle"]]
            result["eval/mean_score"], result["eval/mean_score_se"] = _mean_se(scores)
            result["eval/exact_rate"] = sum(x >= 1.0 for x in scores) / len(scores)
            if iteration is not None:
                base = {r["id"]: r["oracle"] for r in read_jsonl(lay.eval_samples("sft"))}
                wins = [pairwise_win(a, b) for r in rows if r["id"] in base for a, b in zip(r["oracle"], base[r["id"]])]
                result["eval/win_rate_vs_sft"], result["eval/win_rate_se"] = _mean_se(wins)

    if e.pairs and iteration is not None:
        pairs, _ = data_mod.load_pairs(e.pairs, e.pairs_split, cfg.data.skip_invalid)
        pairs = pairs[:e.max_prompts] if e.max_prompts else pairs
        reference = reference_model(cfg, model, init_model_path(cfg), device)
        judge = ImplicitRewardJudge(model, reference, enc, cfg.judge.beta, cfg.judge.batch_size,
                                    kernel_impl(cfg))
        kept = [p for p in pairs if enc.encode(p["prompt"]) is not None]
        scores = judge.score([{"prompt": p["prompt"], "responses": [p["chosen"], p["rejected"]]} for p in kept])
        result["eval/reward_accuracy"] = sum(pairwise_win(c, r) for c, r in scores) / len(scores)
        result["eval/reward_pairs"] = len(scores)

    atomic_write_json(lay.eval(name), result)
    remove_partial(lay.partial(name, "eval"))
    logger.debug("eval %s: %s", name, {k: round(v, 4) for k, v in result.items() if isinstance(v, float)})
    return lay.eval(name)


__all__ = ["run_eval"]

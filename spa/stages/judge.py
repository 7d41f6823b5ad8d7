"""The judge stage: an iteration's samples -> preference pairs, with the configured judge (spa.judges) and pair
selection (spa.select), in resumable shards.

run_judge writes output_dir/iter_<i>/pairs.jsonl: {"id", "prompt", "chosen", "rejected", "score_chosen",
"score_rejected", "scores"} and iter_<i>/judge_metrics.json (pairs kept, identical responses and exact ties dropped,
mean margin, lengths and the length relation of the pairs, the judge's agreement with the held-out gold validation
pairs (judge/validation_accuracy, spa.validation) with its warnings, and with eval.oracle the oracle's agreement
with the judge). Under a multi-process launch the shards are split between the processes (spa.distributed); the
main process does the rest.
"""

from __future__ import annotations

import logging
import random
import time

import torch

from .. import data as data_mod
from .. import distributed as dist
from ..io import Layout, atomic_write_json, atomic_write_jsonl, read_jsonl, remove_partial, sharded
from ..judges import ImplicitRewardJudge, build_judge, flatten_responses, judge_rows
from ..models import load_model, resolve_device
from ..oracle import load_oracle, pairwise_win
from ..scoring import kernel_impl, score_sequences
from ..select import NEEDS_EMBEDDINGS, select_pair
from ..validation import judge_validation, validation_rows, warn_if_length_decides, warn_if_uninformative

logger = logging.getLogger("spa")


def response_embeddings(model, enc, rows, batch_size, impl) -> list[torch.Tensor]:
    items = [(enc.encode(r["prompt"]), enc.encode_response(resp)) for r, _, resp in flatten_responses(rows)]
    _, emb = score_sequences(model, items, enc.tokenizer.pad_token_id, batch_size, impl, embeddings=True)
    return list(torch.split(emb, [len(r["responses"]) for r in rows]))


def run_judge(cfg, iteration: int) -> str:
    """Pairs for iteration i >= 1 from its samples; returns the pairs.jsonl path."""
    lay = Layout(cfg.output_dir)
    samples = read_jsonl(lay.samples(iteration))
    judge, enc = build_judge(cfg, iteration)
    strategy = cfg.select.strategy
    need_emb = strategy in NEEDS_EMBEDDINGS
    embedder = None
    if need_emb and not isinstance(judge, ImplicitRewardJudge):
        embedder = load_model(lay.model(iteration - 1), cfg, resolve_device(cfg.model.device))
    t0 = time.perf_counter()

    def work(shard: int, rows: list[dict]) -> list[dict]:
        judged = judge_rows(judge, rows, enc, cfg.judge, embeddings=isinstance(judge, ImplicitRewardJudge) and need_emb)
        scores, embs = judged.scores, judged.embeddings
        if need_emb and embs is None:
            embs = response_embeddings(embedder, enc, rows, cfg.judge.batch_size, kernel_impl(cfg))
        out = []
        for n, (r, sc) in enumerate(zip(rows, scores)):
            rng = random.Random(f"{cfg.seed}/select/{iteration}/{r['id']}")
            pick = select_pair(sc, strategy, None if embs is None else embs[n], rng)
            row = {"id": r["id"], "prompt": r["prompt"], "scores": sc, "length_slope": judged.length_slope}
            if pick is None:
                row["status"] = "no_pair"
            else:
                c, j = pick
                row.update(chosen=r["responses"][c], rejected=r["responses"][j], score_chosen=sc[c],
                           score_rejected=sc[j])
                row["status"] = ("identical" if r["responses"][c] == r["responses"][j]
                                 else "tie" if sc[c] == sc[j] else "kept")
            out.append(row)
        return out

    rows = [r for shard in sharded(samples, cfg.generate.shard_size, lay.partial(f"iter_{iteration}", "judge"), "judge",
                                   work, progress=f"judge iter {iteration}")
            for r in shard]
    if not dist.is_main():  # the rest (checks on the held-out pairs, the oracle, the outputs) is the main process's
        return lay.pairs(iteration)
    kept = [{k: v for k, v in r.items() if k not in ("status", "length_slope")} for r in rows if r["status"] == "kept"]
    if not kept:
        raise RuntimeError(f"judge iter {iteration}: every pair was dropped (identical responses or exact ties); "
                           "raise generate.temperature or generate.num_samples")
    count = lambda s: sum(r["status"] == s for r in rows)
    metrics = {"judge/prompts": len(rows), "judge/pairs": len(kept), "judge/dropped_identical": count("identical"),
               "judge/dropped_ties": count("tie"), "judge/dropped_no_pair": count("no_pair"),
               "judge/mean_margin": sum(p["score_chosen"] - p["score_rejected"] for p in kept) / len(kept),
               "judge/chosen_chars": sum(len(p["chosen"]) for p in kept) / len(kept),
               "judge/rejected_chars": sum(len(p["rejected"]) for p in kept) / len(kept),
               "judge/seconds_computed": time.perf_counter() - t0}
    # Length relation of each pair (response tokens incl. EOS): a judge that systematically prefers the shorter or
    # the longer response shows here first (SPA's known drift is towards longer ones).
    relation = []
    for p in kept:
        lc, lr = len(enc.encode_response(p["chosen"])), len(enc.encode_response(p["rejected"]))
        relation.append("same_length" if lc == lr else "chosen_shorter" if lc < lr else "chosen_longer")
    differ = [x for x in relation if x != "same_length"]
    metrics["judge/chosen_shorter_fraction"] = (sum(x == "chosen_shorter" for x in differ) / len(differ)
                                                if differ else None)
    metrics["judge/length_warning"] = warn_if_length_decides(metrics["judge/chosen_shorter_fraction"], len(differ),
                                                             iteration)
    if cfg.data.validation_size:  # the judge on the held-out gold pairs, exactly as on generated pairs
        val_rows = validation_rows(cfg, enc)
        if not val_rows:
            logger.warning("judge iter %d: no held-out validation pair fits data.max_prompt_length: the judge is not "
                           "checked", iteration)
        else:
            # judge.length_regress: the slope fitted on the generated responses, not on the gold pairs (whose
            # lengths go with their labels)
            slopes = [r["length_slope"] for r in rows if r.get("length_slope") is not None]
            slope = sum(slopes) / len(slopes) if slopes else None
            metrics.update(judge_validation(judge_rows(judge, val_rows, enc, cfg.judge, slope=slope).scores))
            if slope is not None:
                metrics["judge/length_slope"] = slope
            warning = warn_if_uninformative(metrics, iteration)
            metrics["judge/validation_warning"] = warning
    if cfg.eval.oracle:  # how often the self-judgment agrees with the gold oracle (a diagnostic; not used)
        oracle = load_oracle(cfg.eval.oracle)
        wins = [pairwise_win(oracle(data_mod.prompt_text(p["prompt"]), p["chosen"]),
                             oracle(data_mod.prompt_text(p["prompt"]), p["rejected"])) for p in kept]
        metrics["judge/oracle_accuracy"] = sum(wins) / len(wins)
        for rel in ("chosen_shorter", "chosen_longer", "same_length"):
            sel = [w for w, x in zip(wins, relation) if x == rel]
            metrics[f"judge/oracle_accuracy_{rel}"] = sum(sel) / len(sel) if sel else None
            metrics[f"judge/pairs_{rel}"] = len(sel)
    atomic_write_json(lay.stage_metrics(f"iter_{iteration}", "judge"), metrics)
    atomic_write_jsonl(lay.pairs(iteration), kept)
    remove_partial(lay.partial(f"iter_{iteration}", "judge"))
    logger.info("judge iter %d: %d pairs kept of %d prompts", iteration, len(kept), len(rows))
    return lay.pairs(iteration)



__all__ = ["run_judge", "response_embeddings"]

"""Each stage alone on the tiny model (Python API), checked against float64 recomputations from full logits."""

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import spa
from spa.data import PromptEncoder
from spa.generation import generate_responses
from spa.io import Layout, read_json, read_jsonl
from spa.tasks.reverse import oracle


def ref_logps(model, prompt_ids, response_ids) -> float:
    """Summed response log-prob from the full logits in float64 (the reference the kernels are checked against)."""
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    lp = torch.log_softmax(logits[:-1], -1).gather(1, ids[0, 1:, None])[:, 0]
    return float(lp[len(prompt_ids) - 1:].sum())


def test_sft_stage_writes_a_hub_like_model(sft_run):
    lay = Layout(sft_run)
    model = AutoModelForCausalLM.from_pretrained(lay.sft_model)
    tok = AutoTokenizer.from_pretrained(lay.sft_model)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.vocab_size == len(tok)
    assert tok.apply_chat_template([{"role": "user", "content": "ab"}], tokenize=False, add_generation_prompt=True) \
        == "<s><|user|>ab<|assistant|>"
    m = read_json(lay.stage_metrics("sft", "sft"))
    assert m["sft/steps"] == 4 and m["sft/examples"] == 96 and m["data/sft/rows"] == 96
    assert m["sft/parameters"] == sum(p.numel() for p in model.parameters()) and m["sft/prompts_over_max_length"] == 0
    assert len(read_jsonl(lay.path("sft", "sft_log.jsonl"))) >= 1
    assert not os.path.exists(lay.partial("sft", "train"))  # checkpoints are removed once the model is saved


def test_stages_one_by_one(run_with_sft):
    cfg = run_with_sft
    lay = Layout(cfg.output_dir)

    # iteration 0: DPO on the seed, reference pi_init, log-probs precomputed (no reference model while training)
    spa.run_train(cfg, 0)
    m0 = read_json(lay.stage_metrics("iter_0", "train"))
    # 25% of the 16 seed pairs are held out for validation
    assert m0["train/pairs"] == 12 and m0["train/steps"] == 3 and m0["train/loss_type"] == "sigmoid"
    assert m0["data/seed_pairs"] == 12 and m0["data/validation_pairs"] == 4 and m0["train/tokens_per_s"] > 0
    logged = read_jsonl(lay.path("iter_0", "train_log.jsonl"))
    trl_names = {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                 "logps/rejected"}
    assert trl_names <= set().union(*logged)
    assert os.path.exists(os.path.join(lay.model(0), "config.json"))

    # generate: K samples per prompt from pi_0
    spa.run_generate(cfg, 1)
    samples = read_jsonl(lay.samples(1))
    assert len(samples) == 8 and all(len(s["responses"]) == 2 for s in samples)
    assert all(n <= 9 for s in samples for n in s["num_tokens"])  # max_new_tokens 8 (+ EOS counted)
    g = read_json(lay.stage_metrics("iter_1", "generate"))
    assert g["generate/prompts"] == 8 and g["generate/tokens_per_s"] > 0 and g["generate/shards_computed"] == 2

    # judge (the default): beta * pi_0's own per-token log-prob, chosen = max, rejected = min
    spa.run_judge(cfg, 1)
    pairs = read_jsonl(lay.pairs(1))
    jm = read_json(lay.stage_metrics("iter_1", "judge"))
    assert jm["judge/pairs"] == len(pairs) and jm["judge/pairs"] + jm["judge/dropped_identical"] + \
        jm["judge/dropped_ties"] == 8
    assert 0 <= jm["judge/oracle_accuracy"] <= 1
    policy = AutoModelForCausalLM.from_pretrained(lay.model(0))
    enc = PromptEncoder(AutoTokenizer.from_pretrained(lay.model(0)), 24)
    by_id = {s["id"]: s for s in samples}
    for p in pairs:
        prompt = enc.encode(p["prompt"])
        expect = []
        for resp in by_id[p["id"]]["responses"]:
            r = enc.encode_response(resp)
            expect.append(0.1 * ref_logps(policy, prompt, r) / len(r))
        assert p["scores"] == pytest.approx(expect, abs=2e-4)
        assert p["score_chosen"] == max(p["scores"]) and p["score_rejected"] == min(p["scores"])
        assert p["chosen"] != p["rejected"]

    # train iteration 1: SPA loss with DND (lam 1/2), reference pi_0
    spa.run_train(cfg, 1)
    m1 = read_json(lay.stage_metrics("iter_1", "train"))
    assert m1["train/loss_type"] == "spa" and m1["train/lam"] == 0.5 and m1["train/pairs"] == len(pairs)
    assert {"train/refine/threshold", "train/refine/noisy_fraction", "train/refine/alpha"} <= set(m1)

    # eval: win rate vs SFT (ties 1/2), oracle score, length, implicit-reward accuracy on gold pairs
    spa.run_eval(cfg, 1)
    e = read_json(lay.eval("iter_1"))
    assert os.path.exists(lay.eval("sft"))  # the baseline is evaluated on demand
    rows = read_jsonl(lay.eval_samples("iter_1"))
    base = {r["id"]: r for r in read_jsonl(lay.eval_samples("sft"))}
    wins = []
    for r in rows:
        q = r["prompt"][-1]["content"]
        assert r["oracle"] == [oracle(q, y) for y in r["responses"]]
        wins += [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(r["oracle"], base[r["id"]]["oracle"])]
    assert e["eval/win_rate_vs_sft"] == pytest.approx(sum(wins) / len(wins))
    scores = [s for r in rows for s in r["oracle"]]
    assert e["eval/mean_score"] == pytest.approx(sum(scores) / len(scores)) and len(wins) == len(scores) == 8
    assert e["eval/reward_pairs"] == 8 and 0 <= e["eval/reward_accuracy"] <= 1
    assert e["eval/mean_tokens"] > 0


def test_generate_is_seeded_and_batched(sft_run):
    model = AutoModelForCausalLM.from_pretrained(Layout(sft_run).sft_model)
    tok = AutoTokenizer.from_pretrained(Layout(sft_run).sft_model)
    enc = PromptEncoder(tok, 24)
    prompts = [enc.encode([{"role": "user", "content": f"reverse: {w}"}]) for w in ("ab", "abcdefg", "xyz", "q")]
    kw = dict(temperature=0.7, top_p=1.0, max_new_tokens=6, batch_size=2, seed_key=(1, "t"))
    a, stats = generate_responses(model, tok, prompts, 3, **kw)
    b, _ = generate_responses(model, tok, prompts, 3, **kw)
    assert a == b and len(a) == 4 and all(len(r["responses"]) == 3 for r in a)
    assert stats["new_tokens"] == sum(sum(r["num_tokens"]) for r in a) and stats["tokens_per_s"] > 0
    c, _ = generate_responses(model, tok, prompts, 3, **{**kw, "seed_key": (2, "t")})
    assert c != a
    greedy, _ = generate_responses(model, tok, prompts, 2, **{**kw, "temperature": 0.0})
    assert all(r["responses"][0] == r["responses"][1] for r in greedy)
    # left padding does not change a greedy answer: each prompt alone gives the same response
    alone, _ = generate_responses(model, tok, prompts[1:2], 1, **{**kw, "temperature": 0.0})
    assert alone[0]["responses"][0] == greedy[1]["responses"][0]


def test_train_without_dnd_and_plain_dpo(run_with_sft):
    """refine.dnd=false: the self-refinement margin comes from beta*h itself (reference precomputed); with
    refine.enabled=false the iteration trains plain DPO."""
    cfg = run_with_sft.replace(**{"refine.dnd": False})
    lay = Layout(cfg.output_dir)
    os.makedirs(lay.iter_dir(1))
    init = cfg.output_dir + "/sft/model"
    import shutil

    shutil.copytree(init, lay.model(0))  # pi_0 = pi_init here: only the training stage is under test
    with open(lay.pairs(1), "w") as f:
        for i, w in enumerate(["abc", "hello", "xyzw", "kite"] * 2):
            f.write(json.dumps({"id": str(i), "prompt": [{"role": "user", "content": f"reverse: {w}"}],
                                "chosen": w[::-1], "rejected": w, "score_chosen": 1.0, "score_rejected": 0.0})
                    + "\n")
    spa.run_train(cfg, 1)
    m = read_json(lay.stage_metrics("iter_1", "train"))
    assert m["train/loss_type"] == "spa" and m["train/lam"] is None and "train/refine/threshold" in m
    cfg2 = cfg.replace(output_dir=cfg.output_dir + "_dpo", **{"refine.enabled": False})
    shutil.copytree(cfg.output_dir + "/iter_0", cfg2.output_dir + "/iter_0")
    shutil.copytree(cfg.output_dir + "/sft", cfg2.output_dir + "/sft")
    os.makedirs(cfg2.output_dir + "/iter_1")
    shutil.copy(lay.pairs(1), cfg2.output_dir + "/iter_1/pairs.jsonl")
    spa.run_train(cfg2, 1)
    m2 = read_json(Layout(cfg2.output_dir).stage_metrics("iter_1", "train"))
    assert m2["train/loss_type"] == "sigmoid" and "train/refine/threshold" not in m2


def test_dlma_iteration_with_contrastive_judge_and_real_selection(run_with_sft):
    """DLMA's contrastive self-reward as the judge, REAL's least-similar pair (embeddings from pi_{i-1}), and the
    DLMA loss with the judge's score margin."""
    import shutil

    cfg = run_with_sft.replace(**{"judge.type": "contrastive", "train.iteration_loss": "dlma",
                                  "select.strategy": "easy", "generate.num_samples": 3})
    lay = Layout(cfg.output_dir)
    shutil.copytree(lay.sft_model, lay.model(0))  # pi_0 = pi_init: the iteration's stages are under test
    spa.run_generate(cfg, 1)
    spa.run_judge(cfg, 1)
    pairs = read_jsonl(lay.pairs(1))
    assert pairs and all(len(p["scores"]) == 3 for p in pairs)
    assert all(p["score_chosen"] >= p["score_rejected"] for p in pairs)  # oriented by the judge
    spa.run_train(cfg, 1)
    m = read_json(lay.stage_metrics("iter_1", "train"))
    assert m["train/loss_type"] == "dlma" and m["train/pairs"] == len(pairs)


def test_function_judge_orients_pairs_by_the_oracle(run_with_sft):
    """judge.type: function with the task's gold oracle (the gold-label control run): every kept pair is ordered
    by the oracle, ties dropped, and the length-relation diagnostics add up."""
    import shutil

    cfg = run_with_sft.replace(**{"judge.type": "function", "judge.function": "spa.tasks.reverse:oracle",
                                  "generate.num_samples": 3})
    lay = Layout(cfg.output_dir)
    shutil.copytree(lay.sft_model, lay.model(0))
    spa.run_generate(cfg, 1)
    spa.run_judge(cfg, 1)
    pairs = read_jsonl(lay.pairs(1))
    m = read_json(lay.stage_metrics("iter_1", "judge"))
    assert pairs and m["judge/pairs"] == len(pairs)
    for p in pairs:
        q = p["prompt"][-1]["content"]
        assert oracle(q, p["chosen"]) > oracle(q, p["rejected"])
        assert p["score_chosen"] == oracle(q, p["chosen"])
    assert m["judge/oracle_accuracy"] == 1.0
    n = {k: m[f"judge/pairs_{k}"] for k in ("chosen_shorter", "chosen_longer", "same_length")}
    assert sum(n.values()) == len(pairs)
    if n["chosen_shorter"] + n["chosen_longer"]:
        assert m["judge/chosen_shorter_fraction"] == n["chosen_shorter"] / (n["chosen_shorter"] + n["chosen_longer"])


@pytest.mark.parametrize("main", [True, False])
def test_reference_logps_bar_only_on_the_main_process(monkeypatch, main):
    """Under a multi-process launch every process precomputes the reference log-probs; only the main process shows
    the bar (docs/trainer.md: logs and progress bars come from the main process)."""
    import spa.stages.train as train_mod

    seen = {}

    def fake_score(model, items, pad_id, batch_size, impl, progress=None):
        seen["progress"] = progress
        return torch.zeros(len(items))

    monkeypatch.setattr(train_mod, "score_sequences", fake_score)
    monkeypatch.setattr(train_mod.dist, "is_main", lambda: main)
    feats = [{"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3]}]
    train_mod.precompute_ref_logps(None, feats, 0, 4, "torch")
    assert seen["progress"] == ("reference log-probs" if main else None) and feats[0]["ref_chosen"] == 0

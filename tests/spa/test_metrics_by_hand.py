"""Every metric the trainer reports, against a value computed by hand on a tiny fixed case (not a range):

- eval:  eval/win_rate_vs_sft, eval/mean_score, eval/exact_rate (fixed responses, a fixed oracle), and
         eval/reward_accuracy (the implicit reward of 3 gold pairs from the models' own forward + log_softmax);
- judge: judge/oracle_accuracy, judge/chosen_shorter_fraction, judge/validation_accuracy (a function judge on fixed
         samples and on the held-out seed pairs);
- train: rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins, logps/chosen, logps/rejected as
         logged by the train stage's trainer (full-logit log-probs by hand).
"""

import os
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainingArguments

import spa
from spa.data import PromptEncoder, load_pairs, load_prompts, prompt_text
from spa.io import Layout, atomic_write_jsonl, read_json
from spa.models import load_tokenizer
from spa.trainer import PairCollator, SPATrainer, tokenize_pairs
from spa.validation import validation_rows

from .test_stages import ref_logps

# oracle / judge scores of the fixed responses
ORACLE = {"a": 0.0, "b": 1.0, "c": 0.5, "d": 0.2, "e": 1.2, "f": 0.0,
          "ab": 1.0, "abcd": 0.0, "xyz": 0.0, "x": 1.0, "qq": 1.0, "rr": 0.5, "k": 1.0, "kkk": 0.0}
JUDGE = {"ab": 2.0, "abcd": 1.0, "xyz": 3.0, "x": 0.5, "qq": 1.0, "rr": 0.0, "k": 1.0, "kkk": 0.0, "mm": 0.0}


def fixed_oracle(prompt: str, response: str) -> float:
    return ORACLE.get(response, 0.0)


def fixed_judge(prompt: str, response: str) -> float:
    """The fixed scores above; elsewhere (the held-out seed pairs) the number of distinct characters."""
    return JUDGE.get(response, float(len(set(response))))


def _win(a, b):
    return 1.0 if a > b else 0.5 if a == b else 0.0


def _perturbed_iter0(cfg):
    """iter_0/model: the SFT model with perturbed weights (so the implicit reward is not 0)."""
    lay = Layout(cfg.output_dir)
    model = AutoModelForCausalLM.from_pretrained(lay.sft_model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(lay.model(0))
    load_tokenizer(lay.sft_model).save_pretrained(lay.model(0))
    return lay


# sft / model responses for the 3 eval prompts (2 samples each), by prompt position
SFT = [["a", "b"], ["c", "d"], ["a", "a"]]
MODEL = [["b", "b"], ["e", "f"], ["b", "a"]]


def test_eval_metrics_by_hand(run_with_sft, monkeypatch, task):
    cfg = run_with_sft.replace(**{"eval.oracle": "tests.spa.test_metrics_by_hand:fixed_oracle",
                                  "eval.max_prompts": 3, "eval.num_samples": 2, "judge.beta": 0.5})
    lay = _perturbed_iter0(cfg)
    tok = load_tokenizer(lay.sft_model)
    enc = PromptEncoder(tok, cfg.data.max_prompt_length, cfg.data.long_prompts, cfg.data.chat_template)
    prompts, _ = load_prompts(task["eval_prompts"], cfg.eval.prompts_split)
    position = {tuple(enc.encode(p["prompt"])): i for i, p in enumerate(prompts[:3])}

    def fake_generate(backend, tok, ids, num_samples, **kw):
        table = SFT if os.path.samefile(backend.model.config._name_or_path, lay.sft_model) else MODEL
        res = [table[position[tuple(x)]] for x in ids]
        return [{"responses": r, "finished": [True] * len(r), "num_tokens": [len(y) + 1 for y in r]}
                for r in res], {}

    monkeypatch.setattr("spa.stages.eval.generate_responses", fake_generate)
    e = read_json(spa.run_eval(cfg, 0))
    s = read_json(lay.eval("sft"))
    # by hand: wins (b>a, b=b, e>c, f<d, b>a, a=a) = (1, .5, 1, 0, 1, .5); scores as in ORACLE
    assert e["eval/win_rate_vs_sft"] == pytest.approx(4 / 6)
    assert e["eval/mean_score"] == pytest.approx((1 + 1 + 1.2 + 0 + 1 + 0) / 6)
    assert e["eval/exact_rate"] == pytest.approx(4 / 6)  # b, b, e (1.2), b
    assert s["eval/mean_score"] == pytest.approx((0 + 1 + 0.5 + 0.2 + 0 + 0) / 6)
    assert s["eval/exact_rate"] == pytest.approx(1 / 6)
    assert "eval/win_rate_vs_sft" not in s

    # reward accuracy: beta * (log pi_0 - log pi_init) of chosen vs rejected, from the models' full logits
    pi0 = AutoModelForCausalLM.from_pretrained(lay.model(0)).eval()
    init = AutoModelForCausalLM.from_pretrained(lay.sft_model).eval()
    pairs, _ = load_pairs(task["eval_pairs"], cfg.eval.pairs_split)
    wins = []
    for p in pairs[:3]:
        ids = enc.encode(p["prompt"])
        c, r = (enc.encode_response(p[k]) for k in ("chosen", "rejected"))
        reward = lambda y, ids=ids: 0.5 * (ref_logps(pi0, ids, y) - ref_logps(init, ids, y))
        wins.append(_win(reward(c), reward(r)))
    assert e["eval/reward_pairs"] == 3
    assert e["eval/reward_accuracy"] == pytest.approx(sum(wins) / 3)
    assert sum(wins) / 3 != 0.5  # a flipped comparison would give 1 - x: this case tells them apart


def test_judge_metrics_by_hand(run_with_sft):
    cfg = run_with_sft.replace(**{"judge.type": "function", "judge.function":
                                  "tests.spa.test_metrics_by_hand:fixed_judge",
                                  "eval.oracle": "tests.spa.test_metrics_by_hand:fixed_oracle"})
    lay = Layout(cfg.output_dir)
    shutil.copytree(lay.sft_model, lay.model(0))
    samples = [["ab", "abcd"], ["xyz", "x"], ["qq", "rr"], ["mm", "mm"], ["k", "kkk"]]
    atomic_write_jsonl(lay.samples(1), [{"id": f"p{i}", "prompt": [{"role": "user", "content": f"reverse: {w}"}],
                                         "responses": r, "num_tokens": [len(y) + 1 for y in r]}
                                        for i, (w, r) in enumerate(zip("abcde", samples))])
    spa.run_judge(cfg, 1)
    m = read_json(lay.stage_metrics("iter_1", "judge"))
    # by hand: chosen = the judge's higher score; "mm"/"mm" is dropped (identical)
    # ab>abcd (shorter, oracle 1 > 0: win), xyz>x (longer, 0 < 1: loss), qq>rr (same length, 1 > .5: win),
    # k>kkk (shorter, win)
    assert m["judge/pairs"] == 4 and m["judge/dropped_identical"] == 1
    assert m["judge/oracle_accuracy"] == pytest.approx(3 / 4)
    assert m["judge/chosen_shorter_fraction"] == pytest.approx(2 / 3)
    # held-out seed pairs: the judge's agreement with the gold chosen response
    enc = PromptEncoder(load_tokenizer(lay.model(0)), cfg.data.max_prompt_length, cfg.data.long_prompts,
                        cfg.data.chat_template)
    rows = validation_rows(cfg, enc)
    wins = [_win(fixed_judge(prompt_text(r["prompt"]), r["responses"][0]),
                 fixed_judge(prompt_text(r["prompt"]), r["responses"][1])) for r in rows]
    assert m["judge/validation_accuracy_pairs"] == len(rows) == 4
    assert m["judge/validation_accuracy"] == pytest.approx(sum(wins) / len(wins))
    assert sum(wins) / len(wins) != 0.5


def test_train_metrics_by_hand(run_with_sft, tmp_path):
    lay = _perturbed_iter0(run_with_sft)
    tok = load_tokenizer(lay.sft_model)
    policy = AutoModelForCausalLM.from_pretrained(lay.model(0)).eval()
    reference = AutoModelForCausalLM.from_pretrained(lay.sft_model).eval()
    enc = PromptEncoder(tok, 32)
    pairs = [{"prompt": [{"role": "user", "content": f"reverse: {w}"}], "chosen": w[::-1], "rejected": w + "x"}
             for w in ("abc", "hello", "kite")]
    feats, _ = tokenize_pairs(pairs, enc, 32)
    for f in feats:
        f["ref_chosen"] = ref_logps(reference, f["prompt_ids"], f["chosen_ids"])
        f["ref_rejected"] = ref_logps(reference, f["prompt_ids"], f["rejected_ids"])
    trainer = SPATrainer(model=policy, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]),
                         loss_type="sigmoid", beta=0.5, kernel_impl="torch")
    trainer.compute_loss(policy, PairCollator(tok.pad_token_id)(feats))
    trainer.log({"eval_loss": 0.0} if not policy.training else {"loss": 0.0})
    logged = trainer.state.log_history[-1]
    prefix = "" if policy.training else "eval_"
    pc = [ref_logps(policy, f["prompt_ids"], f["chosen_ids"]) for f in feats]
    pr = [ref_logps(policy, f["prompt_ids"], f["rejected_ids"]) for f in feats]
    cr = [0.5 * (p - f["ref_chosen"]) for p, f in zip(pc, feats)]
    rr = [0.5 * (p - f["ref_rejected"]) for p, f in zip(pr, feats)]
    mean = lambda xs: sum(xs) / len(xs)
    want = {"rewards/chosen": mean(cr), "rewards/rejected": mean(rr),
            "rewards/accuracies": mean([float(c > r) for c, r in zip(cr, rr)]),
            "rewards/margins": mean([c - r for c, r in zip(cr, rr)]), "logps/chosen": mean(pc),
            "logps/rejected": mean(pr)}
    for k, v in want.items():
        assert logged[prefix + k] == pytest.approx(v, abs=1e-4), k
    assert want["rewards/accuracies"] not in (0.0, 0.5, 1.0)  # a flipped comparison would change it

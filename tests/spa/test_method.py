"""The method's pieces: pair selection (SPA min-max, REAL), self-refinement, the judges, and the Trainer's loss
against a float64 recomputation from full logits."""

import random

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

from spa.config import JudgeConfig
from spa.data import PromptEncoder
from spa.io import Layout
from spa.judges import (
    ContrastivePromptJudge,
    FunctionJudge,
    ImplicitRewardJudge,
    LLMJudge,
    RewardModelJudge,
    adjust_for_length,
    judge_rows,
    length_slope,
)
from spa.refine import NoiseDetector, lam_for_iteration, refine_alpha
from spa.select import select_pair, two_means
from spa.trainer import PairCollator, SPATrainer, tokenize_pairs

from .test_stages import ref_logps

# --- selection ------------------------------------------------------------------------------------------------

EMB = torch.tensor([[1.0, 0.0], [0.9, 0.1], [-1.0, 0.05], [0.0, 1.0]])  # 0 ~ 1; 2 opposite to 0; 3 orthogonal


def test_select_strategies():
    scores = [0.3, 0.9, -0.2, 0.1]
    assert select_pair(scores, "minmax") == (1, 2)
    assert select_pair(scores, "easy", EMB) == (0, 2)  # least similar pair, oriented by the scores
    assert select_pair(scores, "hard", EMB) == (1, 0)  # most similar pair
    assert select_pair([0.0, 0.0, 1.0, 0.0], "easy", EMB) == (2, 0)
    picks = {select_pair(scores, "random", rng=random.Random(s)) for s in range(30)}
    assert len(picks) > 1 and all(scores[c] >= scores[r] for c, r in picks)
    assert select_pair(scores, "random", rng=random.Random(3)) == select_pair(scores, "random", rng=random.Random(3))
    assert select_pair([1.0], "minmax") is None
    with pytest.raises(ValueError, match="needs response embeddings"):
        select_pair(scores, "easy")
    with pytest.raises(ValueError, match="is not one of"):
        select_pair(scores, "best")


def test_two_means_centroid():
    emb = torch.tensor([[1.0, 0.0], [0.95, 0.05], [0.9, 0.12], [0.0, 1.0], [0.12, 0.99], [0.25, 0.97]])
    c, r = two_means(emb)
    assert {c, r} == {1, 4}  # the member nearest each cluster's centroid
    assert select_pair([0.0, 0.0, 0.0, 0.0, 1.0, 0.0], "centroid", emb) == (4, 1)
    assert two_means(torch.ones(3, 2)) is None  # identical responses do not split


# --- self-refinement ------------------------------------------------------------------------------------------

def test_noise_detector_running_percentile():
    det = NoiseDetector(percentile=10.0, window=5)
    noisy, thr = det(torch.tensor([0.5, -1.0, 2.0]))
    assert thr == pytest.approx(float(torch.quantile(torch.tensor([0.5, -1.0, 2.0]), 0.1)))
    assert noisy.tolist() == [False, True, False]
    noisy, thr = det(torch.tensor([3.0, 4.0, 5.0]))  # the window keeps the last 5: 0.5 drops out
    assert list(det.margins) == [-1.0, 2.0, 3.0, 4.0, 5.0]
    assert thr == pytest.approx(-1.0 + 0.4 * 3.0) and noisy.tolist() == [False, False, False]
    noisy, thr = det(torch.tensor([0.1]))
    assert thr == pytest.approx(0.1 + 0.4 * 1.9) and noisy.tolist() == [True]
    again = NoiseDetector()
    again.load_state_dict(det.state_dict())
    assert list(again.margins) == list(det.margins) and again.window == 5


def test_refine_schedule():
    assert [refine_alpha(s, 10) for s in range(10)] == [0.0, 0.0] + [0.1] * 8
    assert refine_alpha(0, 10, alpha=0.3, warmup_ratio=0.0) == 0.3
    assert [lam_for_iteration([0.5, 0.25, 0.125], i) for i in (1, 2, 3, 4)] == [0.5, 0.25, 0.125, 0.125]
    with pytest.raises(ValueError):
        lam_for_iteration([0.5], 0)


# --- judges ---------------------------------------------------------------------------------------------------

ROWS = [{"prompt": [{"role": "user", "content": "reverse: abc"}], "responses": ["cba", "abc", "cb"]},
        {"prompt": [{"role": "user", "content": "reverse: hello"}], "responses": ["olleh", "ollehh"]}]


@pytest.fixture(scope="module")
def models(sft_run):
    path = Layout(sft_run).sft_model
    tok = AutoTokenizer.from_pretrained(path)
    policy = AutoModelForCausalLM.from_pretrained(path)
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return tok, policy.eval(), reference.eval()


def test_implicit_reward_judge(models):
    tok, policy, reference = models
    enc = PromptEncoder(tok, 32)
    judge = ImplicitRewardJudge(policy, reference, enc, beta=0.1, batch_size=2)
    scores, emb = judge.score(ROWS, embeddings=True)
    weighted = ImplicitRewardJudge(policy, reference, enc, beta=0.1, batch_size=3, reference_weight=0.25,
                                   token_average=True).score(ROWS)
    for row, sc, e, w in zip(ROWS, scores, emb, weighted):
        p = enc.encode(row["prompt"])
        for resp, s, vec, sw in zip(row["responses"], sc, e, w):
            r = enc.encode_response(resp)
            expect = 0.1 * (ref_logps(policy, p, r) - ref_logps(reference, p, r))
            assert s == pytest.approx(expect, abs=1e-4)
            expect = 0.1 * (ref_logps(policy, p, r) - 0.25 * ref_logps(reference, p, r)) / len(r)
            assert sw == pytest.approx(expect, abs=1e-5)
            with torch.no_grad():
                hidden = policy.model(input_ids=torch.tensor([p + r])).last_hidden_state[0]
            torch.testing.assert_close(vec, hidden[len(p):].mean(0), atol=1e-4, rtol=1e-4)  # response tokens only
    assert [len(s) for s in scores] == [3, 2]


def test_implicit_reward_judge_reference_choices(models, tmp_path):
    """judge.reference (the paper's ablation): none scores beta * log pi_{i-1}; previous uses pi_{i-2} from i = 2."""
    from spa import Config
    from spa.models import judge_reference_path

    tok, policy, _ = models
    enc = PromptEncoder(tok, 32)
    scores = ImplicitRewardJudge(policy, None, enc, beta=0.5, batch_size=2).score(ROWS)
    p, r = enc.encode(ROWS[1]["prompt"]), enc.encode_response(ROWS[1]["responses"][1])
    assert scores[1][1] == pytest.approx(0.5 * ref_logps(policy, p, r), abs=1e-4)
    cfg = Config.from_dict({"output_dir": str(tmp_path), "model": {"name_or_path": "init-model"},
                            "sft": {"enabled": False}, "judge": {"reference": "previous"}})
    assert judge_reference_path(cfg, 1) == "init-model"
    assert judge_reference_path(cfg, 3) == str(tmp_path / "iter_1" / "model")
    assert judge_reference_path(cfg.replace(**{"judge.reference": "init"}), 3) == "init-model"


def test_contrastive_prompt_judge(models):
    tok, policy, _ = models
    enc = PromptEncoder(tok, 64)
    judge = ContrastivePromptJudge(policy, enc, "{prompt} (good)", "{prompt} (bad)", batch_size=3)
    scores = judge.score(ROWS)
    row = ROWS[1]
    pos = enc.encode([{"role": "user", "content": "reverse: hello (good)"}])
    neg = enc.encode([{"role": "user", "content": "reverse: hello (bad)"}])
    for resp, s in zip(row["responses"], scores[1]):
        r = enc.encode_response(resp)
        assert s == pytest.approx(ref_logps(policy, pos, r) - ref_logps(policy, neg, r), abs=1e-4)
    with pytest.raises(ValueError, match="must contain"):
        ContrastivePromptJudge(policy, enc, "good", "{prompt} bad")


def test_function_judge(models):
    from spa.oracle import load_oracle
    from spa.tasks.reverse import oracle

    tok, _, _ = models
    enc = PromptEncoder(tok, 32)
    judge = FunctionJudge(load_oracle("spa.tasks.reverse:oracle", "judge.function"))
    scores = judge_rows(judge, ROWS, enc, JudgeConfig(length_penalty=0.01)).scores  # the penalty, as for any judge
    for row, sc in zip(ROWS, scores):
        q = row["prompt"][-1]["content"]
        for resp, s in zip(row["responses"], sc):
            assert s == pytest.approx(oracle(q, resp) - 0.01 * len(enc.encode_response(resp)))
    with pytest.raises(ValueError, match="judge.function 'spa.tasks.reverse:nope': .* no callable 'nope'"):
        load_oracle("spa.tasks.reverse:nope", "judge.function")
    with pytest.raises(ValueError, match="NaN"):
        FunctionJudge(lambda q, r: float("nan")).score(ROWS)


def test_length_adjustments():
    scores, lengths = [[1.0, 2.0], [3.0, 4.0]], [[1, 3], [2, 2]]
    assert adjust_for_length(scores, lengths) == scores
    assert adjust_for_length(scores, lengths, penalty=0.5) == [[0.5, 0.5], [2.0, 3.0]]
    # within prompts: row 1 deviations (-1, 1) in tokens and (-2, 2) in score, row 2 has no length variation
    assert length_slope([[2.0, 6.0], [4.0, 5.0]], lengths) == 2.0
    assert adjust_for_length([[2.0, 6.0], [4.0, 5.0]], lengths, slope=2.0) == [[0.0, 0.0], [0.0, 1.0]]
    assert adjust_for_length([[2.0, 6.0]], [[1, 3]], penalty=1.0, slope=2.0) == [[-1.0, -3.0]]
    assert length_slope([[1.0, 5.0]], [[2, 2]]) == 0.0  # no length variation
    # both prompts prefer the shorter answer by 1 per token; across prompts, longer answers score higher: the
    # slope is the within-prompt -1 (a pooled fit would say +1.24 and widen the length bias)
    confounded, clen = [[1.0, 0.0], [10.0, 9.0]], [[3, 4], [10, 11]]
    assert length_slope(confounded, clen) == pytest.approx(-1.0)
    assert adjust_for_length(confounded, clen, slope=-1.0) == [[4.0, 4.0], [20.0, 20.0]]


def test_judge_rows_applies_the_length_settings(models):
    tok, _, _ = models
    enc = PromptEncoder(tok, 32)
    judge = FunctionJudge(lambda q, r: float(len(r)))  # score = characters: a pure length preference
    fitted = judge_rows(judge, ROWS, enc, JudgeConfig(length_regress=True))
    assert fitted.length_slope == pytest.approx(1.0)  # one character = one token here
    # characters - (characters + EOS) = -1 for every response: the length preference is gone
    assert fitted.scores == [[pytest.approx(-1.0)] * 3, [pytest.approx(-1.0)] * 2]
    given = judge_rows(judge, ROWS, enc, JudgeConfig(length_regress=True), slope=0.5)
    assert given.length_slope == 0.5 and given.scores[1] == [pytest.approx(5 - 0.5 * 6), pytest.approx(6 - 0.5 * 7)]
    plain = judge_rows(judge, ROWS, enc, JudgeConfig(), slope=0.5)  # regression off: no slope applied
    assert plain.length_slope is None and plain.scores == [[3.0, 3.0, 2.0], [5.0, 6.0]]


def test_llm_judge_is_order_symmetric(models):
    tok, policy, _ = models
    enc = PromptEncoder(tok, 256)
    judge = LLMJudge(policy, enc, "q {prompt} a {a} b {b} ?", ["a", "b"], batch_size=4)
    scores = judge.score(ROWS)
    assert scores[1][0] == pytest.approx(-scores[1][1])  # K=2: s(a beats b) = -s(b beats a)
    assert sum(scores[0]) == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match="two different"):
        LLMJudge(policy, enc, "{prompt}{a}{b}", ["a", "a"])


def test_reward_model_judge(tmp_path, task):
    tok = AutoTokenizer.from_pretrained(task["tokenizer"])
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForSequenceClassification(cfg).save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    judge = RewardModelJudge(str(tmp_path / "rm"), torch.device("cpu"), batch_size=2)
    scores = judge.score(ROWS)
    rm = LlamaForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    text = tok.apply_chat_template(ROWS[0]["prompt"] + [{"role": "assistant", "content": "cb"}], tokenize=False)
    with torch.no_grad():
        expect = rm(**tok(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item()
    assert scores[0][2] == pytest.approx(expect, abs=1e-4)  # batched with padding = alone


# --- the Trainer's loss ---------------------------------------------------------------------------------------

def _dpo_reference(policy, ref_fn, feats, beta, lam=None, threshold=None, alpha=0.0):
    """float64 DPO / SPA loss from full logits; ref_fn(prompt, response) -> summed reference log-prob."""
    losses = []
    for f in feats:
        pc, pr = (ref_logps(policy, f["prompt_ids"], f[k]) for k in ("chosen_ids", "rejected_ids"))
        rc, rr = (ref_fn(f["prompt_ids"], f[k]) for k in ("chosen_ids", "rejected_ids"))
        h = torch.tensor((pc - rc) - (pr - rr), dtype=torch.float64)
        z = 0.0
        if threshold is not None:
            z = float(threshold(f))
        losses.append(-(1 - alpha * z) * F.logsigmoid(beta * h) - alpha * z * F.logsigmoid(-beta * h))
    return torch.stack(losses).mean()


def _extrapolated(policy, reference, lam, prompt, response):
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        z = (1 + lam) * policy(input_ids=ids).logits[0].double() - lam * reference(input_ids=ids).logits[0].double()
    lp = torch.log_softmax(z[:-1], -1).gather(1, ids[0, 1:, None])[:, 0]
    return float(lp[len(prompt) - 1:].sum())


def test_trainer_loss_matches_full_logit_reference(models, tmp_path):
    from transformers import TrainingArguments

    tok, policy, reference = models
    enc = PromptEncoder(tok, 32)
    pairs = [{"prompt": [{"role": "user", "content": f"reverse: {w}"}], "chosen": w[::-1], "rejected": w + "x"}
             for w in ("abc", "hello", "kite")]
    feats, _ = tokenize_pairs(pairs, enc, 32)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    for f in feats:
        f["ref_chosen"] = ref_logps(reference, f["prompt_ids"], f["chosen_ids"])
        f["ref_rejected"] = ref_logps(reference, f["prompt_ids"], f["rejected_ids"])
    batch = PairCollator(tok.pad_token_id)(feats)

    dpo = SPATrainer(model=policy, args=args, loss_type="sigmoid", beta=0.1)
    loss = dpo.compute_loss(policy, batch)
    expect = _dpo_reference(policy, lambda p, r: ref_logps(reference, p, r), feats, 0.1)
    assert loss.item() == pytest.approx(expect.item(), abs=1e-5)
    mode = "train" if policy.training else "eval"
    assert {"rewards/chosen", "rewards/accuracies", "logps/rejected"} <= set(dpo.preference_metrics(mode))

    # SPA with DND: reference hidden states per step, noise from the extrapolated margin, a = alpha after warm-up
    det = NoiseDetector(percentile=50.0, window=50)
    spa_tr = SPATrainer(model=policy, args=args, loss_type="spa", beta=0.1, ref_model=reference, lam=0.5,
                               detector=det, refine_alpha=0.1, refine_warmup=0.0)
    spa_tr.state.max_steps = 10
    loss = spa_tr.compute_loss(policy, {k: v for k, v in batch.items() if not k.startswith("ref_")})
    margins = []
    for f in feats:
        ec, er = (_extrapolated(policy, reference, 0.5, f["prompt_ids"], f[k]) for k in ("chosen_ids", "rejected_ids"))
        margins.append(0.1 * ((ec - f["ref_chosen"]) - (er - f["ref_rejected"])))
    thr = float(torch.quantile(torch.tensor(margins, dtype=torch.float64), 0.5))
    noisy = {i: m <= thr + 1e-9 for i, m in enumerate(margins)}
    assert det.margins and list(det.margins) == pytest.approx(margins, abs=1e-4)
    expect = _dpo_reference(policy, lambda p, r: ref_logps(reference, p, r), feats, 0.1,
                            threshold=lambda f: noisy[feats.index(f)], alpha=0.1)
    assert sum(noisy.values()) >= 1 and loss.item() == pytest.approx(expect.item(), abs=1e-5)
    assert spa_tr.preference_metrics(mode)["refine/alpha"] == [0.1]


def test_trainer_dlma_loss(models, tmp_path):
    from transformers import TrainingArguments

    tok, policy, reference = models
    enc = PromptEncoder(tok, 32)
    pairs = [{"prompt": [{"role": "user", "content": f"reverse: {w}"}], "chosen": w[::-1], "rejected": w,
              "score_chosen": sc, "score_rejected": 0.0} for w, sc in (("abc", 3.0), ("hello", 100.0))]
    feats, _ = tokenize_pairs(pairs, enc, 32)
    for f in feats:
        f["ref_chosen"] = ref_logps(reference, f["prompt_ids"], f["chosen_ids"])
        f["ref_rejected"] = ref_logps(reference, f["prompt_ids"], f["rejected_ids"])
    batch = PairCollator(tok.pad_token_id)(feats)
    trainer = SPATrainer(model=policy, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True,
                                                                     report_to=[]),
                                loss_type="dlma", beta=0.1, dlma_gamma=0.2)
    loss = trainer.compute_loss(policy, batch)
    losses = []
    for f, R in zip(feats, (3.0, 40.0)):  # the self-reward margin is clamped to [-40, 40]
        h = (ref_logps(policy, f["prompt_ids"], f["chosen_ids"]) - f["ref_chosen"]) - \
            (ref_logps(policy, f["prompt_ids"], f["rejected_ids"]) - f["ref_rejected"])
        losses.append(-F.logsigmoid(torch.tensor(0.1 * (h - 0.2 * R), dtype=torch.float64)))
    assert loss.item() == pytest.approx(torch.stack(losses).mean().item(), abs=1e-5)

"""Judges score each of a prompt's K responses; spa.select turns the scores into a (chosen, rejected) pair.

  ImplicitRewardJudge   SPA's direct preference judgment r = beta * (log pi_{i-1}(y|x) - log pi_init(y|x)),
                        summed over response tokens, with spa_kernels in inference mode (the default); the
                        reference can also be the previous iteration's model or none (judge.reference, the
                        paper's ablation), weighted (judge.reference_weight: r = beta * (log pi - w log pi_ref)),
                        and the log-probs averaged over tokens (judge.token_average).
  ContrastivePromptJudge DLMA's self-reward R = log pi(y | p+, x) - log pi(y | p-, x).
  RewardModelJudge      any transformers sequence-classification reward model (first logit).
  LLMJudge              LLM-as-judge: pairwise "A or B" log-odds, both orders, summed per response.
  FunctionJudge         any programmatic scorer `module:function(prompt, response) -> float` (a verifier, a rule;
                        with the task's gold oracle it is the gold-label control: the same loop with a perfect judge).

Each has score(rows) -> [[K floats]] for rows {"prompt": messages, "responses": [K str]}; the implicit judge can
also return REAL's response embeddings from the same forward pass. Length adjustments apply to every judge in one
place (adjust_for_length): judge.length_penalty subtracts length_penalty * response tokens (DICE-style), and
judge.length_regress removes the least-squares linear fit of the scores on response tokens.

The judge stage that applies them to an iteration's samples is spa.stages.judge.run_judge; the models they
score with come from spa.models.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from . import data as data_mod
from .io import Layout
from .models import (
    judge_reference_path,
    load_model,
    load_reward_model,
    load_tokenizer,
    reference_model,
    resolve_device,
)
from .oracle import load_oracle
from .scoring import kernel_impl, score_sequences

logger = logging.getLogger("spa")


def flatten_responses(rows):
    """[(row, k, response)] over every response of every row, in order (the layout the judges score in)."""
    return [(r, k, resp) for r in rows for k, resp in enumerate(r["responses"])]


def _unflat(values, rows) -> list[list[float]]:
    out, pos = [], 0
    for r in rows:
        out.append([float(v) for v in values[pos:pos + len(r["responses"])]])
        pos += len(r["responses"])
    return out


class ImplicitRewardJudge:
    def __init__(self, policy, reference, encoder: data_mod.PromptEncoder, beta: float = 0.1,
                 batch_size: int = 32, impl: str = "auto", reference_weight: float = 1.0,
                 token_average: bool = False):
        self.policy, self.reference, self.enc = policy, reference, encoder
        self.beta, self.batch_size, self.impl = beta, batch_size, impl
        self.reference_weight, self.token_average = reference_weight, token_average

    def score(self, rows: list[dict], embeddings: bool = False):
        items, lengths = [], []
        for r, _, resp in flatten_responses(rows):
            ids = self.enc.encode_response(resp)
            items.append((self.enc.encode(r["prompt"]), ids))
            lengths.append(len(ids))
        if any(p is None for p, _ in items):
            raise ValueError("a prompt exceeds data.max_prompt_length (long_prompts=skip): judge only generated rows")
        pad = self.enc.tokenizer.pad_token_id
        pol = score_sequences(self.policy, items, pad, self.batch_size, self.impl, embeddings=embeddings)
        pol, emb = pol if embeddings else (pol, None)
        ref = 0.0
        if self.reference is not None and self.reference_weight:
            ref = self.reference_weight * score_sequences(self.reference, items, pad, self.batch_size, self.impl)
        r = self.beta * (pol - ref)
        if self.token_average:
            r = r / torch.tensor(lengths, dtype=torch.float32)
        scores = _unflat(r.tolist(), rows)
        if not embeddings:
            return scores
        sizes = [len(x["responses"]) for x in rows]
        return scores, list(torch.split(emb, sizes))


class ContrastivePromptJudge:
    """DLMA: R = log pi(y | p+) - log pi(y | p-), p+/- the user's last message put into positive_prompt /
    negative_prompt ('{prompt}' placeholder)."""

    def __init__(self, model, encoder: data_mod.PromptEncoder, positive_prompt: str, negative_prompt: str,
                 batch_size: int = 32, impl: str = "auto"):
        for name, t in (("positive_prompt", positive_prompt), ("negative_prompt", negative_prompt)):
            if "{prompt}" not in t:
                raise ValueError(f"judge.{name} must contain '{{prompt}}', got {t!r}")
        self.model, self.enc, self.pos, self.neg = model, encoder.unlimited(), positive_prompt, negative_prompt
        self.batch_size, self.impl = batch_size, impl

    def _variant(self, messages, template):
        last = max(i for i, m in enumerate(messages) if m["role"] == "user")
        msgs = [dict(m) for m in messages]
        msgs[last]["content"] = template.replace("{prompt}", msgs[last]["content"])
        return msgs

    def score(self, rows: list[dict]):
        pos_items, neg_items = [], []
        for r, _, resp in flatten_responses(rows):
            ids = self.enc.encode_response(resp)
            pos_items.append((self.enc.encode(self._variant(r["prompt"], self.pos)), ids))
            neg_items.append((self.enc.encode(self._variant(r["prompt"], self.neg)), ids))
        pad = self.enc.tokenizer.pad_token_id
        pos = score_sequences(self.model, pos_items, pad, self.batch_size, self.impl)
        neg = score_sequences(self.model, neg_items, pad, self.batch_size, self.impl)
        return _unflat((pos - neg).tolist(), rows)


class RewardModelJudge:
    """Scores (prompt, response) with a sequence-classification model's first logit; the conversation goes
    through the reward model's own chat template (plain 'prompt\\n\\nresponse' without one)."""

    def __init__(self, path: str, device, batch_size: int = 32, trust_remote_code: bool = False):
        self.model, self.tok = load_reward_model(path, device, trust_remote_code)
        self.batch_size = batch_size

    def _text(self, messages, response):
        if getattr(self.tok, "chat_template", None):
            return self.tok.apply_chat_template(messages + [{"role": "assistant", "content": response}],
                                                tokenize=False)
        return "\n\n".join([m["content"] for m in messages] + [response])

    @torch.inference_mode()
    def score(self, rows: list[dict]):
        flat = flatten_responses(rows)
        texts = [self._text(r["prompt"], resp) for r, _, resp in flat]
        device = next(self.model.parameters()).device
        self.tok.padding_side = "right"
        out = []
        for s in range(0, len(texts), self.batch_size):
            enc = self.tok(texts[s:s + self.batch_size], return_tensors="pt", padding=True,
                           add_special_tokens=not getattr(self.tok, "chat_template", None)).to(device)
            out += self.model(**enc).logits[:, 0].float().cpu().tolist()
        return _unflat(out, rows)


class LLMJudge:
    """LLM-as-judge: for every ordered pair (a, b) of a prompt's responses, d = log p(choice A) - log p(choice B)
    after llm_template; s(a beats b) = (d(a, b) - d(b, a)) / 2 removes the position bias; a response's score is
    the sum of its pairwise log-odds."""

    def __init__(self, model, encoder: data_mod.PromptEncoder, template: str, choices: list[str],
                 batch_size: int = 32, impl: str = "auto"):
        for ph in ("{prompt}", "{a}", "{b}"):
            if ph not in template:
                raise ValueError(f"judge.llm_template must contain {ph}")
        self.model, self.enc, self.template = model, encoder.unlimited(), template
        tok = encoder.tokenizer
        self.choices = [tok(c, add_special_tokens=False).input_ids for c in choices]
        if not all(self.choices) or self.choices[0] == self.choices[1]:
            raise ValueError(f"judge.llm_choices {choices!r} must tokenize to two different non-empty strings")
        self.batch_size, self.impl = batch_size, impl

    def score(self, rows: list[dict]):
        items, index = [], []
        for n, r in enumerate(rows):
            q = data_mod.prompt_text(r["prompt"])
            K = len(r["responses"])
            for a in range(K):
                for b in range(K):
                    if a == b:
                        continue
                    text = self.template.format(prompt=q, a=r["responses"][a], b=r["responses"][b])
                    p = self.enc.encode([{"role": "user", "content": text}])
                    items += [(p, self.choices[0]), (p, self.choices[1])]
                    index.append((n, a, b))
        lp = score_sequences(self.model, items, self.enc.tokenizer.pad_token_id, self.batch_size, self.impl)
        d = (lp[0::2] - lp[1::2]).tolist()
        dd = {key: v for key, v in zip(index, d)}
        scores = [[0.0] * len(r["responses"]) for r in rows]
        for (n, a, b), v in dd.items():
            s = (v - dd[(n, b, a)]) / 2
            scores[n][a] += s
        return scores


class FunctionJudge:
    """Scores each response with fn(last user message, response) (the eval oracle's signature)."""

    def __init__(self, fn):
        self.fn = fn

    def score(self, rows: list[dict]):
        out = []
        for r in rows:
            q = data_mod.prompt_text(r["prompt"])
            scores = []
            for resp in r["responses"]:
                s = float(self.fn(q, resp))
                if s != s:  # NaN would make every comparison false and the pick arbitrary
                    raise ValueError(f"judge.function returned NaN for prompt {q[:60]!r}, response {resp[:60]!r}")
                scores.append(s)
            out.append(scores)
        return out


def length_slope(scores: list[list[float]], lengths: list[list[int]]) -> float:
    """Least-squares slope of score on response tokens *within* prompts (each prompt's means removed first), so
    that prompts with longer answers do not set the slope; 0 when no prompt's responses differ in length."""
    num = den = 0.0
    for srow, nrow in zip(scores, lengths):
        if len(srow) < 2:
            continue
        ms, mn = sum(srow) / len(srow), sum(nrow) / len(nrow)
        num += sum((n - mn) * (x - ms) for x, n in zip(srow, nrow))
        den += sum((n - mn) ** 2 for n in nrow)
    return num / den if den else 0.0


def adjust_for_length(scores: list[list[float]], lengths: list[list[int]], penalty: float = 0.0,
                      slope: float = 0.0) -> list[list[float]]:
    """Every judge's length adjustment: score - (penalty + slope) * response tokens (penalty: DICE-style; slope:
    judge.length_regress's fitted length_slope)."""
    total = penalty + slope
    if not total:
        return scores
    return [[x - total * n for x, n in zip(srow, nrow)] for srow, nrow in zip(scores, lengths)]


@dataclass
class Judgment:
    scores: list[list[float]]  # per row, per response: the judge's score after the length adjustments
    embeddings: list[torch.Tensor] | None  # REAL's response embeddings, when asked for (implicit judge)
    length_slope: float | None  # judge.length_regress: the slope removed (None when it is off)


def judge_rows(judge, rows: list[dict], enc: data_mod.PromptEncoder, jcfg, embeddings: bool = False,
               slope: float | None = None) -> Judgment:
    """The configured judgment of rows {"prompt", "responses"}: the judge's scores with judge.length_penalty and
    judge.length_regress applied (the slope fitted on these rows, or `slope` when given); with embeddings
    (implicit judge only), also REAL's response embeddings."""
    res = judge.score(rows, embeddings=True) if embeddings else judge.score(rows)
    scores, embs = res if embeddings else (res, None)
    lengths = [[len(enc.encode_response(y)) for y in r["responses"]] for r in rows]
    if jcfg.length_regress and slope is None:
        slope = length_slope(scores, lengths)
    slope = slope if jcfg.length_regress else None
    return Judgment(adjust_for_length(scores, lengths, jcfg.length_penalty, slope or 0.0), embs, slope)


def build_judge(cfg, iteration: int):
    """The configured judge for iteration i (>= 1): its policy is pi_{i-1}; the implicit judge's reference is pi_init
    (or, per judge.reference, pi_{i-2} or none); with model.peft the reference is a view of the policy's weights
    (spa.models.reference_model)."""
    lay = Layout(cfg.output_dir)
    device = resolve_device(cfg.model.device)
    j = cfg.judge
    policy_path = lay.model(iteration - 1)
    tok = load_tokenizer(policy_path, cfg.model.trust_remote_code)
    enc = data_mod.PromptEncoder(tok, cfg.data.max_prompt_length, cfg.data.long_prompts, cfg.data.chat_template)
    impl = kernel_impl(cfg)
    if j.type == "implicit":
        policy = load_model(policy_path, cfg, device)
        reference = None if j.reference == "none" else reference_model(cfg, policy,
                                                                       judge_reference_path(cfg, iteration), device)
        return ImplicitRewardJudge(policy, reference, enc, j.beta, j.batch_size, impl, j.reference_weight,
                                   j.token_average), enc
    if j.type == "contrastive":
        policy = load_model(policy_path, cfg, device)
        return ContrastivePromptJudge(policy, enc, j.positive_prompt, j.negative_prompt, j.batch_size, impl), enc
    if j.type == "function":
        return FunctionJudge(load_oracle(j.function, "judge.function")), enc
    if j.type == "reward_model":
        return RewardModelJudge(j.model, device, j.batch_size, cfg.model.trust_remote_code), enc
    model = load_model(j.model or policy_path, cfg, device)
    judge_enc = enc if not j.model else data_mod.PromptEncoder(
        load_tokenizer(j.model, cfg.model.trust_remote_code), 10 ** 9)  # the judge model's own template
    return LLMJudge(model, judge_enc, j.llm_template, j.llm_choices, j.batch_size, impl), enc


__all__ = ["ImplicitRewardJudge", "ContrastivePromptJudge", "RewardModelJudge", "LLMJudge", "FunctionJudge",
           "adjust_for_length", "length_slope", "Judgment", "judge_rows", "build_judge"]

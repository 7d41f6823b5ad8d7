"""spa_kernels.integrations.hf: the collator, the fused head, preference_loss_from_model against an eager
logits -> log_softmax -> preference_loss composition, the PreferenceTrainer, and the examples."""

import copy
import os
import runpy

import pytest
import torch

from spa_kernels import preference_loss
from spa_kernels.integrations.hf import (
    PreferenceCollator,
    PreferenceTrainer,
    add_logprob_head,
    preference_logps,
    preference_loss_from_model,
)
from tests.integrations.conftest import models
from tests.toy import tiny_llama

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples")


def eager_logps(model, batch, average=False):
    """The model's own logits, float64 log_softmax, shifted labels, summed (or averaged) per row."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    lp = torch.log_softmax(logits.double(), -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    s = (lp * mask).sum(-1)
    return s / mask.sum(-1).clamp(min=1) if average else s


def test_collator(tokenizer, rows):
    batch = PreferenceCollator(tokenizer)(rows[:3])
    ids, labels, att = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape == labels.shape == att.shape and ids.shape[0] == 6
    for i, ex in enumerate(rows[:3]):
        for row, field in ((i, "chosen"), (i + 3, "rejected")):
            n = int(att[row].sum())
            assert tokenizer.decode(ids[row, :n]) == ex["prompt"] + ex[field] + tokenizer.eos_token
            n_prompt = len(tokenizer(ex["prompt"])["input_ids"])
            assert (labels[row, :n_prompt] == -100).all()  # the prompt is not scored
            assert (labels[row, n_prompt:n] == ids[row, n_prompt:n]).all()
            assert (labels[row, n:] == -100).all() and (ids[row, n:] == tokenizer.pad_token_id).all()
    assert "ref_chosen_logps" not in batch


def test_collator_truncation_and_errors(tokenizer, rows):
    ex = dict(rows[0])
    n_prompt = len(tokenizer(ex["prompt"])["input_ids"])
    batch = PreferenceCollator(tokenizer, max_length=n_prompt + 2)([ex])
    assert batch["input_ids"].shape == (2, n_prompt + 2) and ((batch["labels"] != -100).sum(-1) == 2).all()
    with pytest.raises(ValueError, match="example 0: the prompt has .* no chosen token"):
        PreferenceCollator(tokenizer, max_length=n_prompt)([ex])
    with pytest.raises(ValueError, match="example 1: field 'rejected' must be a string"):
        PreferenceCollator(tokenizer)([ex, {"prompt": "a", "chosen": "b"}])
    with pytest.raises(ValueError, match="ref_chosen_logps is present in some examples"):
        PreferenceCollator(tokenizer)([{**ex, "ref_chosen_logps": -1.0, "ref_rejected_logps": -2.0}, ex])
    batch = PreferenceCollator(tokenizer, pad_to_multiple_of=16)(
        [{**ex, "ref_chosen_logps": -1.0, "ref_rejected_logps": -2.0}])
    assert batch["input_ids"].shape[1] % 16 == 0
    torch.testing.assert_close(batch["ref_rejected_logps"], torch.tensor([-2.0]))


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "ipo", "hinge", "simpo", "spa", "dlma"])
def test_loss_matches_eager_composition(loss_type, tokenizer, rows):
    policy, ref = models(tokenizer)
    batch = PreferenceCollator(tokenizer)(rows[:5])
    kw = dict(beta=0.3, label_smoothing=0.1 if loss_type in ("sigmoid", "robust") else 0.0)
    if loss_type == "spa":
        kw["noisy"] = torch.tensor([True, False, False, True, False])
    if loss_type == "dlma":
        kw["margin"] = torch.tensor([0.5, -1.0, 2.0, 0.0, 0.3])
    eager_policy = copy.deepcopy(policy)
    out = preference_loss_from_model(policy, batch, ref_model=ref, loss_type=loss_type, **kw)
    out.loss.backward()

    average = loss_type in ("ipo", "simpo")
    lp = eager_logps(eager_policy, batch, average)
    with torch.no_grad():
        rp = eager_logps(ref, batch, average)
    no_ref = loss_type == "simpo"
    want = preference_loss(lp[:5], lp[5:], None if no_ref else rp[:5], None if no_ref else rp[5:],
                           loss_type=loss_type, **kw)
    want.loss.backward()
    assert out.loss.item() == pytest.approx(want.loss.item(), rel=1e-5)
    for (name, pg), pw in zip(policy.named_parameters(), eager_policy.parameters()):
        scale = pw.grad.abs().max().item()
        assert (pg.grad - pw.grad).abs().max().item() <= 1e-4 * scale + 1e-10, name
    torch.testing.assert_close(out.chosen_logps.double(), eager_logps(eager_policy, batch)[:5].detach(), rtol=1e-5,
                               atol=1e-5)


def test_precomputed_and_peft_reference(tokenizer, rows):
    peft = pytest.importorskip("peft")
    policy, ref = models(tokenizer)
    batch = PreferenceCollator(tokenizer)(rows[:4])
    with torch.no_grad():
        ref_logps = eager_logps(ref, batch).float()
    pre = dict(batch, ref_chosen_logps=ref_logps[:4], ref_rejected_logps=ref_logps[4:])
    a = preference_loss_from_model(policy, pre)
    b = preference_loss_from_model(policy, batch, ref_model=ref)
    assert a.loss.item() == pytest.approx(b.loss.item(), rel=1e-5)

    # PEFT without ref_model: the reference is the base model (adapters disabled)
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM")
    base = copy.deepcopy(ref)
    peft_model = peft.get_peft_model(copy.deepcopy(ref), lora)
    out = preference_loss_from_model(peft_model, batch, beta=0.2)
    with torch.no_grad():
        base_logps, adapted = eager_logps(base, batch), eager_logps(peft_model, batch)
    want = preference_loss(adapted[:4], adapted[4:], base_logps[:4], base_logps[4:], beta=0.2)
    assert out.loss.item() == pytest.approx(want.loss.item(), rel=1e-5)
    assert out.metrics()["rewards/margins"] != 0
    out.loss.backward()
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if "lora_" in n)

    with pytest.raises(ValueError, match="no reference"):
        preference_loss_from_model(policy, batch)


def test_head_logit_scale_bias_and_stats(tokenizer, rows):
    """The head against the model's own logits with a logit scale and an lm_head bias; the token statistics."""
    model = tiny_llama(len(tokenizer), logit_scale=0.25)  # LlamaConfig keeps unknown keys; read as Cohere's
    model.lm_head.bias = torch.nn.Parameter(torch.randn(len(tokenizer)) * 0.5)
    batch = PreferenceCollator(tokenizer)(rows[:3])
    out = preference_logps(model, batch, token_stats=True)
    logits = 0.25 * torch.nn.functional.linear(model.model(input_ids=batch["input_ids"],
                                                           attention_mask=batch["attention_mask"]).last_hidden_state,
                                               model.lm_head.weight, model.lm_head.bias)[:, :-1].double()
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    logp = torch.log_softmax(logits, -1)
    want = (logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask).sum(-1)
    torch.testing.assert_close(out.logps.double(), want.detach(), rtol=1e-5, atol=1e-5)
    assert torch.equal(out.num_tokens, mask.sum(-1))
    entropy = -(logp.exp() * logp).sum(-1)
    torch.testing.assert_close(out.entropy_sum.double(), (entropy * mask).sum(-1).detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.mean_logit_sum.double(), (logits.mean(-1) * mask).sum(-1).detach(), rtol=1e-5,
                               atol=1e-5)
    top1 = (logits.argmax(-1) == labels) & mask
    assert torch.equal(out.top1_count, top1.sum(-1).float())
    out.logps.sum().backward()
    assert model.lm_head.bias.grad is not None and model.lm_head.bias.grad.abs().sum() > 0


def test_head_refusals_and_passthrough(tokenizer, rows):
    with pytest.raises(ValueError, match="positive logit scale"):
        add_logprob_head(tiny_llama(len(tokenizer), logit_scale=-1.0))
    model = tiny_llama(len(tokenizer))
    add_logprob_head(model)
    batch = PreferenceCollator(tokenizer)(rows[:2])
    plain = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])  # unchanged without the flag
    assert plain.logits.shape == (*batch["input_ids"].shape, len(tokenizer))
    twin = copy.deepcopy(model)  # a copy's plain and fused forwards run the copy's weights
    with torch.no_grad():
        twin.lm_head.weight.mul_(2)
    assert not torch.allclose(twin(input_ids=batch["input_ids"]).logits, model(input_ids=batch["input_ids"]).logits)
    assert not torch.allclose(preference_logps(twin, batch).logps, preference_logps(model, batch).logps)
    with pytest.raises(ValueError, match="spa_logprobs=True needs labels"):
        model(input_ids=batch["input_ids"], spa_logprobs=True)
    from transformers import MixtralConfig, MixtralForCausalLM

    moe = MixtralForCausalLM(MixtralConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                           num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                           num_local_experts=2, output_router_logits=True))
    with pytest.raises(ValueError, match="router auxiliary loss"):
        preference_logps(moe, batch)


def partition_like_zero3(module):
    """Stands in for DeepSpeed ZeRO-3 on `module` with its own kind of hooks: outside the module's forward its
    weight's data is a NaN tensor (its 'partitioned' state; any read there poisons the result); a forward pre-hook
    gathers it, a forward hook releases it and arms a gather on the outputs' gradients for the backward, and a
    post-accumulate-grad hook releases it again. Like DeepSpeed, it swaps `param.data`. Returns the event log."""
    weight, full = module.weight, module.weight.data
    partitioned = torch.full_like(full, float("nan"))
    events = []

    def gather(*_):
        events.append("gather")
        weight.data = full

    def release(*_):
        events.append("release")
        weight.data = partitioned

    def after_forward(mod, args, outputs):
        release()
        for out in outputs if isinstance(outputs, tuple) else (outputs,):
            if out.requires_grad:
                out.register_hook(lambda grad: (gather(), grad)[1])

    module.register_forward_pre_hook(gather)
    module.register_forward_hook(after_forward)
    weight.register_post_accumulate_grad_hook(release)
    release()
    events.clear()
    return events


def test_head_runs_inside_lm_head_hooks(tokenizer, rows):
    """The fused head is the lm_head's forward: engine hooks on that module (here a ZeRO-3 imitation) gather the
    weight for the forward and the backward; results equal the unpartitioned model's."""
    policy, ref = models(tokenizer)
    batch = PreferenceCollator(tokenizer)(rows[:3])
    expected = copy.deepcopy(policy)
    want = preference_loss_from_model(expected, batch, ref_model=ref)
    want.loss.backward()

    events = partition_like_zero3(policy.lm_head)
    got = preference_loss_from_model(policy, batch, ref_model=ref)
    got.loss.backward()
    assert events == ["gather", "release", "gather", "release"]
    assert got.loss.item() == pytest.approx(want.loss.item(), rel=1e-6)
    for (name, p), q in zip(policy.named_parameters(), expected.parameters()):
        assert torch.isfinite(p.grad).all(), name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
    assert "forward" not in policy.lm_head.__dict__  # the swapped-in forward is gone again


def test_preference_trainer(tokenizer, rows, tmp_path):
    from datasets import Dataset
    from transformers import TrainingArguments

    policy, ref = models(tokenizer)
    start = copy.deepcopy(policy)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4,
                             learning_rate=3e-3, logging_steps=3, report_to="none", save_strategy="no", use_cpu=True,
                             disable_tqdm=True, per_device_eval_batch_size=8)
    trainer = PreferenceTrainer(model=policy, ref_model=ref, args=args, processing_class=tokenizer,
                                train_dataset=Dataset.from_list(rows), eval_dataset=Dataset.from_list(rows[:8]),
                                beta=0.2, loss_type="ipo")
    # one loss through the trainer equals the helper's on the same batch
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert trainer.compute_loss(trainer.model, batch).item() == pytest.approx(
        preference_loss_from_model(start, batch, ref_model=ref, beta=0.2, loss_type="ipo").loss.item(), rel=1e-5)
    trainer._preference_metrics = None
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected"):
        assert key in logged[0]
    assert all(not torch.equal(p, q) for p, q in zip(trainer.model.parameters(), start.parameters()))
    metrics = trainer.evaluate()
    assert {"eval_loss", "eval_rewards/margins", "eval_logps/chosen"} <= set(metrics)
    with pytest.raises(ValueError, match="needs per-pair inputs"):
        PreferenceTrainer(model=policy, args=args, processing_class=tokenizer, train_dataset=Dataset.from_list(rows),
                          loss_type="spa")


@pytest.mark.parametrize("name", ["torch_loop.py", "hf_trainer.py", "trl_dpo.py"])
def test_examples_run(name, tmp_path, capsys):
    if name == "trl_dpo.py":
        pytest.importorskip("trl")
    argv = ["--steps", "20"] + ([] if name == "torch_loop.py" else ["--output-dir", str(tmp_path)])
    result = runpy.run_path(os.path.join(EXAMPLES, name))["main"](argv)
    if name == "torch_loop.py":
        losses = [h["loss"] for h in result]
        assert len(losses) == 20 and sum(losses[-5:]) / 5 < losses[0] - 0.02
    else:
        losses = [h["loss"] for h in result.state.log_history if "loss" in h]
        assert losses and losses[-1] < 0.69

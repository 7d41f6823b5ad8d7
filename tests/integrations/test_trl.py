"""spa_kernels.integrations.trl against TRL's own DPOTrainer on a tiny random Llama and tests/data/preferences.jsonl:
the same loss (rel 1e-5, fp32), the same parameter gradients (rel 1e-4), the same logged metrics, the same short
training run; the precomputed-reference, PEFT (LoRA), tied-embedding and logit-scale cases; what is passed through
to TRL and what is refused."""

import copy
import logging

import pytest
import torch

trl = pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from trl import DPOConfig  # noqa: E402

from spa_kernels.integrations import trl as spa_trl  # noqa: E402
from tests.integrations.conftest import models, perturbed  # noqa: E402

LOSS_TYPES = ["sigmoid", "ipo", "hinge", "robust"]


def dpo_args(tmp_path, **overrides):
    kw = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, report_to="none", bf16=False, use_cpu=True,
              save_strategy="no", disable_tqdm=True, max_length=96, logging_steps=1, seed=0, learning_rate=1e-3,
              beta=0.5)
    kw.update(overrides)
    return DPOConfig(**kw)


def build(cls, policy, ref, tokenizer, rows, tmp_path, peft_config=None, **overrides):
    """A trainer on private copies of the models (the two trainers of a comparison must not share parameters)."""
    return cls(model=copy.deepcopy(policy), ref_model=None if ref is None else copy.deepcopy(ref),
               args=dpo_args(tmp_path, **overrides), train_dataset=Dataset.from_list(rows),
               processing_class=tokenizer, peft_config=peft_config)


def first_batch(trainer):
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def step(trainer, batch):
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return loss.detach()


def assert_same_step(theirs, ours, batch=None):
    """One compute_loss + backward through each trainer on the same batch: loss, gradients and metrics agree."""
    batch = first_batch(theirs) if batch is None else batch
    assert ours._spa_state is True
    want, got = step(theirs, batch), step(ours, batch)
    assert torch.isfinite(want) and want != 0
    assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item()), (got.item(), want.item())
    n_grads = 0
    for (name, pw), pg in zip(theirs.model.named_parameters(), ours.model.parameters()):
        assert (pw.grad is None) == (pg.grad is None), name
        if pw.grad is None:
            continue
        scale = pw.grad.abs().max().item()
        err = (pg.grad - pw.grad).abs().max().item()
        assert err <= 1e-4 * scale + 1e-12, f"{name}: max grad error {err:.3g}, grad scale {scale:.3g}"
        n_grads += scale > 0
    assert n_grads > 0
    assert_same_metrics(theirs._metrics["train"], ours._metrics["train"])


def assert_same_metrics(want, got):
    assert list(got) == list(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-5), key


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_one_step_matches_trl(loss_type, tie, tokenizer, rows, tmp_path):
    policy, ref = models(tokenizer, tie=tie)
    kw = dict(loss_type=[loss_type], label_smoothing=0.1 if loss_type == "robust" else 0.0)
    theirs = build(trl.DPOTrainer, policy, ref, tokenizer, rows, tmp_path, **kw)
    ours = build(spa_trl.DPOTrainer, policy, ref, tokenizer, rows, tmp_path, **kw)
    if tie:
        assert ours.model.lm_head.weight is ours.model.model.embed_tokens.weight
    assert_same_step(theirs, ours)


def pair_margins(trainer, batch):
    """h = (logp_c - ref_c) - (logp_r - ref_r) per pair, through the fused heads the trainer installed."""
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        lr = [m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                spa_logprobs=True).logps for m in (trainer.model, trainer.ref_model)]
    chosen, rejected = (lr[0] - lr[1]).chunk(2)
    return chosen - rejected


def test_hinge_batch_has_both_branches(tokenizer, rows, tmp_path):
    """The hinge comparison above is only meaningful if some pairs are inside the margin and some outside."""
    policy, ref = models(tokenizer)
    ours = build(spa_trl.DPOTrainer, policy, ref, tokenizer, rows, tmp_path, loss_type=["hinge"])
    active = 1 - ours.beta * pair_margins(ours, first_batch(ours)) > 0
    assert active.any() and (~active).any(), active


def test_weighted_loss_combination(tokenizer, rows, tmp_path):
    policy, ref = models(tokenizer)
    kw = dict(loss_type=["sigmoid", "ipo", "hinge"], loss_weights=[0.7, 0.2, 0.1])
    theirs = build(trl.DPOTrainer, policy, ref, tokenizer, rows, tmp_path, **kw)
    ours = build(spa_trl.DPOTrainer, policy, ref, tokenizer, rows, tmp_path, **kw)
    assert_same_step(theirs, ours)


def test_torch_reference_impl(tokenizer, rows, tmp_path):
    policy, ref = models(tokenizer)
    theirs = build(trl.DPOTrainer, policy, ref, tokenizer, rows, tmp_path)
    ours = spa_trl.DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(ref), args=dpo_args(tmp_path),
                              train_dataset=Dataset.from_list(rows), processing_class=tokenizer, kernel_impl="torch")
    assert_same_step(theirs, ours)


def test_precomputed_reference(tokenizer, rows, tmp_path):
    policy, ref = models(tokenizer)
    kw = dict(precompute_ref_log_probs=True, precompute_ref_batch_size=5)
    theirs = build(trl.DPOTrainer, policy, ref, tokenizer, rows, tmp_path, **kw)
    ours = build(spa_trl.DPOTrainer, policy, ref, tokenizer, rows, tmp_path, **kw)
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        want, got = torch.tensor(theirs.train_dataset[key]), torch.tensor(ours.train_dataset[key])
        assert want.shape == (len(rows),) and (want < 0).all()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    batch = first_batch(theirs)
    assert "ref_chosen_logps" in batch
    # our own reference pass agrees with TRL's on the same batch
    for a, b in zip(theirs.compute_ref_log_probs(theirs.ref_model, batch), ours.compute_ref_log_probs(ours.ref_model,
                                                                                                      batch)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert_same_step(theirs, ours, batch)


@pytest.mark.parametrize("precompute", [False, True], ids=["live_ref", "precomputed_ref"])
def test_peft_lora(precompute, tokenizer, rows, tmp_path):
    peft = pytest.importorskip("peft")
    policy, _ = models(tokenizer)
    # random (not zero) LoRA init so the adapted policy differs from its reference, the base model
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                           task_type="CAUSAL_LM")
    kw = dict(precompute_ref_log_probs=precompute, loss_type=["sigmoid"])
    theirs = build(trl.DPOTrainer, policy, None, tokenizer, rows, tmp_path, peft_config=lora, **kw)
    ours = build(spa_trl.DPOTrainer, policy, None, tokenizer, rows, tmp_path, peft_config=lora, **kw)
    assert ours.ref_model is None
    trainable = [n for n, p in ours.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert_same_step(theirs, ours)
    assert ours._metrics["train"]["rewards/margins"][0] != 0  # the reference really is the adapter-free model


def assert_same_step_as_trl(make_model, tokenizer, rows, tmp_path):
    """A seeded reference model from make_model(), a perturbed policy, one step of TRL's DPOTrainer and of ours."""
    torch.manual_seed(0)
    ref = make_model()
    policy = perturbed(ref)
    theirs = build(trl.DPOTrainer, policy, ref, tokenizer, rows, tmp_path)
    ours = build(spa_trl.DPOTrainer, policy, ref, tokenizer, rows, tmp_path)
    assert_same_step(theirs, ours)


def test_logit_scale_model(tokenizer, rows, tmp_path):
    """Cohere multiplies its logits by config.logit_scale: applied exactly (as temperature 1 / scale)."""
    from transformers import CohereConfig, CohereForCausalLM

    cfg = CohereConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, logit_scale=0.5, pad_token_id=0, bos_token_id=1,
                       eos_token_id=2)
    assert_same_step_as_trl(lambda: CohereForCausalLM(cfg), tokenizer, rows, tmp_path)


def test_softcapping_model(tokenizer, rows, tmp_path):
    """Gemma 2 softcaps its logits (cap * tanh(z / cap)): applied by the kernels (softcap=), same step as TRL's.
    The cap is small enough that it changes the log-probs (the logits reach several times the cap)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=4, head_dim=8, final_logit_softcapping=0.5,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
    assert_same_step_as_trl(lambda: Gemma2ForCausalLM(cfg), tokenizer, rows, tmp_path)


def test_unsupported_loss_passes_through(tokenizer, rows, tmp_path, caplog):
    policy, ref = models(tokenizer)
    kw = dict(loss_type=["exo_pair"], label_smoothing=1e-3)
    theirs = build(trl.DPOTrainer, policy, ref, tokenizer, rows, tmp_path, **kw)
    with caplog.at_level(logging.WARNING, logger="spa_kernels.integrations.trl"):
        ours = build(spa_trl.DPOTrainer, policy, ref, tokenizer, rows, tmp_path, **kw)
    notices = [r.getMessage() for r in caplog.records if r.name == "spa_kernels.integrations.trl"]
    assert len(notices) == 1 and "exo_pair" in notices[0] and "\n" not in notices[0]
    assert ours._spa_state is False
    batch = first_batch(theirs)
    assert step(ours, batch).item() == step(theirs, batch).item()


@pytest.mark.parametrize("option", [dict(ld_alpha=0.5), dict(use_weighting=True),
                                    dict(f_divergence_type="js_divergence")], ids=["ld_alpha", "wpo", "f_div"])
def test_unsupported_options_pass_through(option, tokenizer, rows, tmp_path, caplog):
    policy, ref = models(tokenizer)
    with caplog.at_level(logging.WARNING, logger="spa_kernels.integrations.trl"):
        ours = build(spa_trl.DPOTrainer, policy, ref, tokenizer, rows, tmp_path, **option)
    assert ours._spa_state is False
    assert any(next(iter(option)) in r.getMessage() for r in caplog.records)


def test_label_smoothing_notice_for_sigmoid(tokenizer, rows, tmp_path, caplog):
    """TRL 1.16's sigmoid loss ignores label_smoothing; so does the drop-in (same loss), and it says so."""
    policy, ref = models(tokenizer)
    theirs = build(trl.DPOTrainer, policy, ref, tokenizer, rows, tmp_path, label_smoothing=0.2)
    with caplog.at_level(logging.WARNING, logger="spa_kernels.integrations.trl"):
        ours = build(spa_trl.DPOTrainer, policy, ref, tokenizer, rows, tmp_path, label_smoothing=0.2)
    assert any("label_smoothing" in r.getMessage() for r in caplog.records)
    assert_same_step(theirs, ours)


def test_patch_existing_trainer(tokenizer, rows, tmp_path):
    policy, ref = models(tokenizer)
    theirs = build(trl.DPOTrainer, policy, ref, tokenizer, rows, tmp_path, loss_type=["ipo"])
    ours = spa_trl.patch_dpo_trainer(build(trl.DPOTrainer, policy, ref, tokenizer, rows, tmp_path,
                                           loss_type=["ipo"]))
    assert isinstance(ours, trl.DPOTrainer) and isinstance(ours, spa_trl.SpaDPOMixin)
    assert spa_trl.patch_dpo_trainer(ours) is ours and type(ours).__mro__.count(spa_trl.SpaDPOMixin) == 1
    assert_same_step(theirs, ours)
    with pytest.raises(TypeError, match="trl.DPOTrainer"):
        spa_trl.patch_dpo_trainer(object())


def test_bad_kernel_impl(tokenizer, rows, tmp_path):
    policy, ref = models(tokenizer)
    with pytest.raises(ValueError, match="kernel_impl='fast'"):
        spa_trl.DPOTrainer(model=policy, ref_model=ref, args=dpo_args(tmp_path), processing_class=tokenizer,
                           train_dataset=Dataset.from_list(rows), kernel_impl="fast")


def test_without_token_metrics(tokenizer, rows, tmp_path):
    policy, ref = models(tokenizer)
    theirs = build(trl.DPOTrainer, policy, ref, tokenizer, rows, tmp_path)
    ours = spa_trl.DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(ref), args=dpo_args(tmp_path),
                              train_dataset=Dataset.from_list(rows), processing_class=tokenizer, token_metrics=False)
    batch = first_batch(theirs)
    assert step(ours, batch).item() == pytest.approx(step(theirs, batch).item(), rel=1e-5)
    skipped = {"entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy"}
    want = {k: v for k, v in theirs._metrics["train"].items() if k not in skipped}
    assert_same_metrics(want, ours._metrics["train"])


def test_training_run_converges_the_same(tokenizer, rows, tmp_path):
    """Eight optimizer steps through Trainer.train (bf16 off): the logged loss curves and the final weights agree."""
    policy, ref = models(tokenizer)
    kw = dict(max_steps=8, learning_rate=3e-3, lr_scheduler_type="constant", per_device_train_batch_size=6)
    theirs = build(trl.DPOTrainer, policy, ref, tokenizer, rows, tmp_path / "trl", **kw)
    ours = build(spa_trl.DPOTrainer, policy, ref, tokenizer, rows, tmp_path / "spa", **kw)
    theirs.train()
    ours.train()
    curve = lambda t, key: [h[key] for h in t.state.log_history if key in h and "train_runtime" not in h]
    want, got = curve(theirs, "loss"), curve(ours, "loss")
    assert len(want) == len(got) == 8
    assert want[-1] < want[0] - 0.05  # it does learn: the loss goes down
    assert got == pytest.approx(want, rel=2e-3, abs=1e-4)
    assert curve(ours, "rewards/accuracies") == pytest.approx(curve(theirs, "rewards/accuracies"), abs=1e-6)
    for (name, pw), pg in zip(theirs.model.named_parameters(), ours.model.parameters()):
        torch.testing.assert_close(pg, pw, rtol=0, atol=1e-3, msg=name)


def test_evaluate_logs_the_same(tokenizer, rows, tmp_path):
    policy, ref = models(tokenizer)
    kw = dict(per_device_eval_batch_size=8)
    theirs = trl.DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(ref), args=dpo_args(tmp_path, **kw),
                            train_dataset=Dataset.from_list(rows), eval_dataset=Dataset.from_list(rows[:16]),
                            processing_class=tokenizer)
    ours = spa_trl.DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(ref),
                              args=dpo_args(tmp_path, **kw), train_dataset=Dataset.from_list(rows),
                              eval_dataset=Dataset.from_list(rows[:16]), processing_class=tokenizer)
    want, got = theirs.evaluate(), ours.evaluate()
    for key in want:
        if "runtime" in key or "per_second" in key:
            continue
        assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-5), key


def test_bf16_autocast_close_to_trl(tokenizer, rows, tmp_path):
    """TRL's default (bf16=True): autocast on the CPU. Both run the lm_head in bf16, so they agree loosely."""
    policy, ref = models(tokenizer)
    theirs = build(trl.DPOTrainer, policy, ref, tokenizer, rows, tmp_path, bf16=True)
    ours = build(spa_trl.DPOTrainer, policy, ref, tokenizer, rows, tmp_path, bf16=True)
    batch = first_batch(theirs)
    losses = []
    for t in (theirs, ours):
        t.model.zero_grad(set_to_none=True)
        with t.accelerator.autocast():
            losses.append(t.compute_loss(t.model, batch))
        losses[-1].backward()
    assert losses[1].item() == pytest.approx(losses[0].item(), rel=2e-2)
    gw = torch.cat([p.grad.flatten() for p in theirs.model.parameters()])
    gg = torch.cat([p.grad.flatten() for p in ours.model.parameters()])
    assert torch.nn.functional.cosine_similarity(gw, gg, dim=0) > 0.99

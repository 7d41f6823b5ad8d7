"""Every model family's head, through the one head path: the sequence log-probs of the `spa` trainer (judge /
eval / validation scoring: spa.scoring.score_sequences; training: SPATrainer) and of the drop-in
(spa_kernels.integrations.hf.sequence_logprobs) equal the model's own forward + log_softmax (float64 of its
float32 logits), on every implementation that runs here. Tiny models built from configs with random weights (no
download). Under TRITON_INTERPRET=1 the triton implementation runs too."""

import copy
from types import SimpleNamespace

import pytest
import torch
import transformers
from transformers import TrainingArguments

from spa.scoring import pad_sequences, score_sequences
from spa.trainer import SPATrainer
from spa_kernels import _dispatch
from spa_kernels.integrations._lm_head import logit_scale_and_softcap
from spa_kernels.integrations.hf import sequence_logprobs
from tests.conftest import impl_device, impl_params

V = 61
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
# family -> (config class, extra config, what the head does besides hidden @ W.T)
FAMILIES = {
    "llama_tied": ("LlamaConfig", dict(tie_word_embeddings=True), "tied"),
    "llama_untied": ("LlamaConfig", dict(tie_word_embeddings=False), None),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=False), None),
    "mistral": ("MistralConfig", dict(tie_word_embeddings=False), None),
    "phi": ("PhiConfig", dict(tie_word_embeddings=False), "bias"),
    "granite": ("GraniteConfig", dict(logits_scaling=4.0, tie_word_embeddings=False), "divides by 4"),
    "cohere": ("CohereConfig", dict(logit_scale=0.25), "multiplies by 0.25"),
    "gemma2": ("Gemma2Config", dict(final_logit_softcapping=0.75, head_dim=8), "softcap 0.75"),
}
ITEMS = [([1, 5, 9, 3], [7, 8, 2]), ([1, 4], [11, 12, 13, 14, 2]), ([1, 6, 6, 6, 6, 10], [20, 2])]


def build(family: str):
    cls, extra, _ = FAMILIES[family]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls)(**COMMON, **extra)).eval()
    with torch.no_grad():  # larger weights: logits well beyond a softcap and clearly changed by a scale
        head = model.get_output_embeddings()
        head.weight.mul_(8.0)
        if getattr(head, "bias", None) is not None:
            head.bias.normal_(0.0, 2.0)
    return model


def forward_logps(model, items) -> torch.Tensor:
    """Summed response log-probs from the model's own forward (its logits) and log_softmax, in float64."""
    out = []
    for prompt, response in items:
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].double()
        lp = torch.log_softmax(logits[:-1], -1).gather(1, ids[0, 1:, None])[:, 0]
        out.append(lp[len(prompt) - 1:].sum())
    return torch.stack(out)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    model = build(request.param)
    return request.param, model, forward_logps(model, ITEMS)


def _skip_unusable(impl, model):
    w = model.get_output_embeddings().weight.to(impl_device(impl))
    reason = _dispatch.unusable_reason("linear_logprobs", impl, {"hidden": w[None], "weight": w, "bias": None,
                                                                 "labels": torch.zeros(1, V, dtype=torch.long)})
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("impl", impl_params("linear_logprobs"))
def test_trainer_and_dropin_logps_equal_the_models_forward(family, impl):
    name, model, want = family
    _skip_unusable(impl, model)
    device = impl_device(impl)  # GPU backends score a copy of the model on the GPU
    model = copy.deepcopy(model).to(device) if device.type != "cpu" else model
    # the spa trainer's scoring (judge, eval, validation, reference precompute), batched with padding
    got = score_sequences(model, ITEMS, pad_id=0, batch_size=2, impl=impl).cpu()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4, msg=lambda m: f"{name} spa: {m}")
    # the drop-in's head on one padded batch (labels aligned with input_ids)
    batch = pad_sequences(ITEMS, 0, device)
    out = sequence_logprobs(model, batch, impl=impl, return_hidden=True)
    torch.testing.assert_close(out.logps.double().cpu(), want, rtol=1e-5, atol=1e-4,
                               msg=lambda m: f"{name} drop-in: {m}")
    assert out.hidden_states.shape == (*batch["input_ids"].shape, 32)


def test_head_transform_is_not_a_no_op(family):
    """Each family's head really differs from a plain hidden @ W.T (else the test above could not fail for it)."""
    name, model, want = family
    kind = FAMILIES[name][2]
    if kind in (None, "tied"):
        return
    plain = []
    for prompt, response in ITEMS:
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            h = model.base_model(input_ids=ids).last_hidden_state[0].double()
            z = h @ model.get_output_embeddings().weight.double().T
        lp = torch.log_softmax(z[:-1], -1).gather(1, ids[0, 1:, None])[:, 0]
        plain.append(lp[len(prompt) - 1:].sum())
    assert (torch.stack(plain) - want).abs().max() > 0.1, f"{name}: {kind} does not change the log-probs"


def test_spa_trainer_logps_and_rewards(family, tmp_path):
    """The train stage's per-pair log-probs and rewards (logged as logps/*, rewards/*) on every family."""
    name, model, want = family
    pairs = [(ITEMS[0], ITEMS[1]), (ITEMS[2], ITEMS[0])]  # (chosen, rejected) items
    batch = pad_sequences([c for c, _ in pairs] + [r for _, r in pairs], 0, "cpu")
    ref = torch.tensor([-3.0, -5.0, -7.0, -11.0])
    batch["ref_chosen_logps"], batch["ref_rejected_logps"] = ref[:2], ref[2:]
    trainer = SPATrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]),
                         loss_type="sigmoid", beta=0.5, kernel_impl="torch")
    out, _ = trainer.preference_step(model, batch)
    chosen, rejected = want[[0, 2]], want[[1, 0]]
    torch.testing.assert_close(out.chosen_logps.double(), chosen, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.rejected_logps.double(), rejected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.chosen_rewards.double(), 0.5 * (chosen - ref[:2].double()), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("config,expected", [
    (dict(logit_scale=0.5), (0.5, None)),
    (dict(output_multiplier=3.0), (3.0, None)),
    (dict(lm_head_multiplier=0.125), (0.125, None)),
    (dict(logits_scaling=8.0, model_type="granite"), (0.125, None)),
    (dict(logits_scaling=8.0, model_type="minicpm3"), (0.125, None)),
    (dict(logits_scaling=8.0, model_type="hyperclovax"), (8.0, None)),  # HyperCLOVA X multiplies
    (dict(final_logit_softcapping=30.0, model_type="gemma2"), (1.0, 30.0)),
    (dict(model_type="llama"), (1.0, None)),
])
def test_logit_scale_conventions(config, expected):
    """The conventions TRL 1.16's fused head reads (trl.trainer.utils / distillation_trainer)."""
    assert logit_scale_and_softcap(SimpleNamespace(**config)) == expected


def test_dnd_extrapolated_logps(family):
    """SPA's de-coupled noise detection through the head: reference and extrapolated log-probs equal those of the
    models' own logits ((1 + lam) z - lam z_ref, each z already scaled / biased as the model's forward makes it).
    Softcapped models are refused (the extrapolated kernel has no softcap)."""
    from spa_kernels.integrations.hf import extrapolated_preference_logps

    name, model, want = family
    ref = build(name)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = pad_sequences(ITEMS, 0, "cpu")
    if FAMILIES[name][2] == "softcap 0.75":
        with pytest.raises(ValueError, match="softcapping"):
            extrapolated_preference_logps(model, ref, batch, lam=0.5, impl="torch")
        return
    out = extrapolated_preference_logps(model, ref, batch, lam=0.5, impl="torch")
    ext = []
    for prompt, response in ITEMS:
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            z = 1.5 * model(input_ids=ids).logits[0].double() - 0.5 * ref(input_ids=ids).logits[0].double()
        lp = torch.log_softmax(z[:-1], -1).gather(1, ids[0, 1:, None])[:, 0]
        ext.append(lp[len(prompt) - 1:].sum())
    torch.testing.assert_close(out.logps.double(), want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.ref_logps.double(), forward_logps(ref, ITEMS), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.extrapolated_logps.double(), torch.stack(ext), rtol=1e-5, atol=1e-4)

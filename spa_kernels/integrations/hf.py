"""The spa_kernels preference loss for a plain `transformers.Trainer` or a hand-written PyTorch loop, on
(prompt, chosen, rejected) data.

    collator = PreferenceCollator(tokenizer, max_length=512)          # rows: chosen first, then rejected
    batch = collator([{"prompt": ..., "chosen": ..., "rejected": ...}, ...])
    out = preference_loss_from_model(model, batch, ref_model=ref_model, beta=0.1, loss_type="sigmoid")
    out.loss.backward(); out.metrics()  # rewards/chosen, rewards/margins, logps/chosen, ... (TRL's names)

    trainer = PreferenceTrainer(model=model, ref_model=ref_model, args=TrainingArguments(...),
                                train_dataset=dataset, processing_class=tokenizer, beta=0.1, loss_type="sigmoid")

The reference is, in this order: `ref_chosen_logps` / `ref_rejected_logps` in the batch (precomputed), `ref_model`,
or, for a PEFT model, the same model with its adapters disabled. Log-probs come from the model's last hidden states
through `linear_sequence_logprobs` (docs/integrations.md); no [batch, seq, vocab] logits are built.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
import transformers

from .. import LOSS_TYPES, PreferenceLossOutput, preference_loss
from ._lm_head import _MARK, SequenceLogprobsOutput, add_logprob_head

__all__ = ["PreferenceCollator", "PreferenceLossMixin", "PreferenceTrainer", "add_logprob_head", "ensure_logprob_head",
           "extrapolated_preference_logps", "preference_logps", "preference_loss_from_model", "reference_logps",
           "sequence_logprobs"]

PREFERENCE_COLUMNS = ["prompt", "chosen", "rejected", "ref_chosen_logps", "ref_rejected_logps"]


@dataclass
class PreferenceCollator:
    """Tokenizes (prompt, chosen, rejected) examples into one padded batch of 2B rows, chosen rows first:
    input_ids, attention_mask, labels (the prompt and the padding are -100), and ref_chosen_logps /
    ref_rejected_logps [B] when every example carries them.

    The prompt is tokenized with the tokenizer's special tokens (e.g. BOS), each response without, followed by EOS
    (add_eos). Sequences longer than max_length keep their start; an example whose prompt leaves no room for a
    response token is an error, not a silently empty row.
    """

    tokenizer: Any
    max_length: int | None = None
    add_eos: bool = True
    pad_to_multiple_of: int | None = None

    def _row(self, prompt_ids, text, i, field):
        ids = prompt_ids + self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if self.add_eos and self.tokenizer.eos_token_id is not None:
            ids = ids + [self.tokenizer.eos_token_id]
        labels = [-100] * len(prompt_ids) + ids[len(prompt_ids):]
        if self.max_length is not None:
            ids, labels = ids[:self.max_length], labels[:self.max_length]
        if all(label == -100 for label in labels):
            raise ValueError(f"example {i}: the prompt has {len(prompt_ids)} tokens and leaves no {field} token "
                             f"within max_length={self.max_length}")
        return ids, labels

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("PreferenceCollator got an empty list of examples")
        chosen, rejected = [], []
        for i, ex in enumerate(examples):
            for key in ("prompt", "chosen", "rejected"):
                if not isinstance(ex.get(key), str):
                    raise ValueError(f"example {i}: field {key!r} must be a string, got {type(ex.get(key)).__name__}"
                                     f" (keys: {sorted(ex)})")
            prompt_ids = self.tokenizer(ex["prompt"])["input_ids"]
            chosen.append(self._row(prompt_ids, ex["chosen"], i, "chosen"))
            rejected.append(self._row(prompt_ids, ex["rejected"], i, "rejected"))
        rows = chosen + rejected
        T = max(len(ids) for ids, _ in rows)
        if self.pad_to_multiple_of:
            T = -(-T // self.pad_to_multiple_of) * self.pad_to_multiple_of
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id  # masked out by attention_mask and labels either way
        if pad_id is None:
            raise ValueError("the tokenizer has neither a pad_token nor an eos_token to pad with")
        batch = {
            "input_ids": torch.tensor([ids + [pad_id] * (T - len(ids)) for ids, _ in rows]),
            "attention_mask": torch.tensor([[1] * len(ids) + [0] * (T - len(ids)) for ids, _ in rows]),
            "labels": torch.tensor([labels + [-100] * (T - len(labels)) for _, labels in rows]),
        }
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            present = [key in ex for ex in examples]
            if any(present) and not all(present):
                raise ValueError(f"{key} is present in some examples of the batch but not all")
            if all(present):
                batch[key] = torch.tensor([float(ex[key]) for ex in examples], dtype=torch.float32)
        return batch


def _unwrap(model):
    """The transformers model inside DDP / FSDP / DeepSpeed / torch.compile wrappers and a PEFT model."""
    if hasattr(model, "module") or hasattr(model, "_orig_mod"):  # wrapped (DDP, FSDP, DeepSpeed: .module; compile)
        from accelerate.utils import extract_model_from_parallel

        # only then: it imports deepspeed where installed, which prints a line on stdout
        model = extract_model_from_parallel(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def ensure_logprob_head(model, impl: str | None = None):
    """Installs the fused head (add_logprob_head) on the transformers model inside `model`'s wrappers, once, or
    again when `impl` changes; refuses a MoE model whose router auxiliary loss would be skipped."""
    inner = _unwrap(model)
    text_config = inner.config.get_text_config()
    if getattr(text_config, "output_router_logits", False):
        raise ValueError(f"{type(inner).__name__} adds a MoE router auxiliary loss (config.output_router_logits="
                         "True), which the spa_kernels head does not compute; set it to False to train without it")
    if getattr(inner, _MARK, None) is None or (impl is not None and getattr(inner, _MARK) != impl):
        add_logprob_head(inner, impl="auto" if impl is None else impl)


def sequence_logprobs(model, batch: dict, *, token_stats: bool = False, return_hidden: bool = False,
                      impl: str | None = None) -> SequenceLogprobsOutput:
    """Summed log-probs [N] of the labelled tokens of a batch {input_ids, attention_mask, labels} (labels aligned
    with input_ids, -100 where not scored, shifted inside as for the model's own loss), through the model's own
    forward (wrappers included) and its lm_head (scale, softcap, bias, tied or gathered weights: _lm_head.py).
    return_hidden=True adds the backbone's last hidden states [N, T, H] (`.hidden_states`). Installs the fused
    head on first use; install it yourself with add_logprob_head(model) before `accelerator.prepare(model)` so
    that mixed-precision autocast wraps it."""
    ensure_logprob_head(model, impl)
    return model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=batch["labels"],
                 spa_logprobs=True, spa_token_stats=token_stats, spa_return_hidden=return_hidden)


def preference_logps(model, batch: dict, *, token_stats: bool = False, impl: str | None = None
                     ) -> SequenceLogprobsOutput:
    """[2B] summed log-probs of the labelled tokens of a PreferenceCollator batch (chosen rows, then rejected):
    sequence_logprobs of the batch."""
    return sequence_logprobs(model, batch, token_stats=token_stats, impl=impl)


def extrapolated_preference_logps(model, ref_model, batch: dict, *, lam: float, impl: str | None = None
                                  ) -> SequenceLogprobsOutput:
    """SPA's de-coupled noise detection: policy log-probs (with grad), reference log-probs and the log-probs of the
    extrapolated logits (1 + lam) z - lam z_ref (`.logps`, `.ref_logps`, `.extrapolated_logps`, each [N]) of a
    batch as in sequence_logprobs, from one linear_spa_sequence_logprobs pass over both models' last hidden states
    (the reference's hidden states without grad). Both lm_heads run as their modules' forwards."""
    ensure_logprob_head(model, impl)
    with torch.no_grad():
        ref_hidden = sequence_logprobs(ref_model, batch, return_hidden=True, impl=impl).hidden_states
    return model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=batch["labels"],
                 spa_logprobs=True, spa_reference=(_unwrap(ref_model), ref_hidden, lam))


def reference_logps(model, batch: dict, ref_model=None, *, impl: str | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(ref_chosen_logps, ref_rejected_logps), each [B], without grad: precomputed in the batch, else from
    ref_model, else from a PEFT model with its adapters disabled."""
    if "ref_chosen_logps" in batch:
        return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    if ref_model is not None:
        context = contextlib.nullcontext()
    else:
        from accelerate.utils import extract_model_from_parallel, is_peft_model

        peft_model = extract_model_from_parallel(model)
        if not is_peft_model(peft_model):
            raise ValueError("no reference: pass ref_model, precomputed ref_chosen_logps/ref_rejected_logps in the "
                             "batch, or a PEFT model (its adapters are disabled for the reference)")
        ref_model, context = model, peft_model.disable_adapter()
    with torch.no_grad(), context:
        logps = preference_logps(ref_model, batch, impl=impl).logps
    return logps.chunk(2, dim=0)


def preference_loss_from_model(model, batch: dict, *, ref_model=None, beta: float = 0.1, loss_type: str = "sigmoid",
                               label_smoothing: float = 0.0, average_log_prob: bool | None = None,
                               impl: str | None = None, **loss_kwargs) -> PreferenceLossOutput:
    """The DPO-family loss of a PreferenceCollator batch: policy log-probs from `model`, the reference as in
    reference_logps, then preference_loss (loss_kwargs: e.g. noisy= for "spa", margin= for "dlma",
    simpo_gamma=). average_log_prob divides by the response length (default: True for ipo and simpo, as TRL).
    Returns the PreferenceLossOutput with chosen_logps / rejected_logps (summed, detached) filled in."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not one of {LOSS_TYPES}")
    average = loss_type in ("ipo", "simpo") if average_log_prob is None else average_log_prob
    out = preference_logps(model, batch, impl=impl)
    chosen, rejected = out.logps.chunk(2, dim=0)
    ref_chosen = ref_rejected = None
    if loss_type != "simpo":
        ref_chosen, ref_rejected = reference_logps(model, batch, ref_model, impl=impl)
    logps = [chosen, rejected, ref_chosen, ref_rejected]
    if average:
        n_chosen, n_rejected = out.num_tokens.clamp(min=1).chunk(2, dim=0)
        logps = [None if t is None else t / n for t, n in zip(logps, (n_chosen, n_rejected) * 2)]
    loss = preference_loss(*logps, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, **loss_kwargs)
    return dataclasses.replace(loss, chosen_logps=chosen.detach(), rejected_logps=rejected.detach())


class PreferenceLossMixin:
    """compute_loss for a transformers.Trainer subclass fed PreferenceCollator batches. Reads the loss options from
    `self.preference_options` (keyword arguments of preference_loss_from_model) and the reference from
    `self.ref_model` (None: precomputed in the data, or a PEFT model). Logs TRL's metric names, averaged over the
    steps between two logs and over processes. A subclass with its own loss overrides `preference_step`."""

    ref_model = None
    preference_options: dict = {}

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:  # keep the raw text columns for the collator
            self._signature_columns = list(PREFERENCE_COLUMNS)

    def preference_step(self, model, inputs) -> tuple[PreferenceLossOutput, dict[str, float]]:
        """(the loss output with chosen_logps / rejected_logps filled in, extra metrics to log) for one batch."""
        return preference_loss_from_model(model, inputs, ref_model=self.ref_model, **self.preference_options), {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # the accelerator's autocast, whichever order the head and accelerate's forward wrapper were installed in
        with self.accelerator.autocast():
            out, extra = self.preference_step(model, inputs)
        gather = self.accelerator.gather
        gathered = PreferenceLossOutput(loss=out.loss, losses=out.losses, chosen_rewards=gather(out.chosen_rewards),
                                        rejected_rewards=gather(out.rejected_rewards),
                                        chosen_logps=gather(out.chosen_logps),
                                        rejected_logps=gather(out.rejected_logps),
                                        noisy=None if out.noisy is None else gather(out.noisy))
        store = self.preference_metrics("train" if model.training else "eval")
        for key, value in {**gathered.metrics(), **extra}.items():
            store[key].append(float(value))
        return (out.loss, out) if return_outputs else out.loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def preference_metrics(self, mode: str = "train") -> dict[str, list[float]]:
        """The values of each metric ("train" or "eval") logged since the last log, one per step."""
        if getattr(self, "_preference_metrics", None) is None:
            self._preference_metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        return self._preference_metrics[mode]

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        metrics = self.preference_metrics(mode)
        prefix = "eval_" if mode == "eval" else ""
        logs.update({prefix + k: sum(v) / len(v) for k, v in metrics.items() if v})
        metrics.clear()
        super().log(logs, *args, **kwargs)


class PreferenceTrainer(PreferenceLossMixin, transformers.Trainer):
    """transformers.Trainer for (prompt, chosen, rejected) datasets with the spa_kernels loss.

    Same arguments as Trainer, plus ref_model (prepared like the model: device, mixed precision), the
    preference_loss_from_model options (beta, loss_type, label_smoothing, average_log_prob, impl, ...) and
    max_length for the default PreferenceCollator (built from processing_class when data_collator is None).
    """

    def __init__(self, model, args=None, *, ref_model=None, max_length: int | None = None,
                 beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 average_log_prob: bool | None = None, impl: str = "auto", data_collator=None,
                 processing_class=None, **trainer_kwargs):
        if data_collator is None:
            if processing_class is None:
                raise ValueError("PreferenceTrainer needs processing_class (a tokenizer) or a data_collator")
            data_collator = PreferenceCollator(processing_class, max_length=max_length)
        if loss_type in ("spa", "dlma"):
            raise ValueError(f"loss_type={loss_type!r} needs per-pair inputs (noisy / margin) that a dataset batch "
                             "does not carry: use preference_loss_from_model(..., noisy=/margin=) in your own loop")
        zero = torch.zeros(1)  # validates beta / loss_type / label_smoothing now rather than at the first step
        ref = (None, None) if loss_type == "simpo" else (zero, zero)
        preference_loss(zero, zero, *ref, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
        self.preference_options = dict(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                                       average_log_prob=average_log_prob, impl=impl)
        # before Trainer prepares (wraps) the model, so accelerate's mixed-precision wrapper sits above the head
        ensure_logprob_head(model, impl)
        super().__init__(model=model, args=args, data_collator=data_collator, processing_class=processing_class,
                         **trainer_kwargs)
        if ref_model is not None:
            ensure_logprob_head(ref_model, impl)
            ref_model.eval().requires_grad_(False)
            self.ref_model = self.accelerator.prepare_model(ref_model, evaluation_mode=True)

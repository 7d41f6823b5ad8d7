"""Drop-in for TRL's DPOTrainer (TRL 1.16): the same trainer, with the per-token log-prob and DPO-loss computation
replaced by `spa_kernels.linear_sequence_logprobs` on the backbone's last hidden states (only completion tokens
reach the lm_head matmul) and `spa_kernels.preference_loss`.

    from trl import DPOConfig
    from spa_kernels.integrations.trl import DPOTrainer        # instead of: from trl import DPOTrainer

or, for a trainer that already exists (any DPOTrainer subclass): `patch_dpo_trainer(trainer)`.

Covered: loss_type sigmoid, ipo, hinge, robust, alone or several with loss_weights; a separate reference model,
precompute_ref_log_probs, PEFT (reference = adapters disabled, or the "ref" adapter, exactly as TRL), tied
embeddings, lm_head bias, a positive logit scale (the conventions TRL reads) and final-logit softcapping
(Gemma 2/3, through the kernels' softcap=); TRL's metrics with the same names and meanings. Everything else TRL
offers (other loss types, ld_alpha, f-divergences, use_weighting, MoE router loss, vision-language models) runs
TRL's own code unchanged, after a one-line notice.
"""

from __future__ import annotations

import contextlib
import logging
import warnings

import torch
import trl
from accelerate.utils import is_peft_model
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter

from .. import _dispatch, preference_loss
from ._lm_head import add_logprob_head

__all__ = ["DPOTrainer", "SUPPORTED_LOSS_TYPES", "SpaDPOMixin", "patch_dpo_trainer", "unsupported_reason"]

logger = logging.getLogger(__name__)

SUPPORTED_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}


def unsupported_reason(trainer: trl.DPOTrainer) -> str | None:
    """Why this trainer's configuration stays on TRL's own loss, or None when the fused path covers it."""
    other = [t for t in trainer.loss_types if t not in SUPPORTED_LOSS_TYPES]
    if other:
        return f"loss_type {other} is not implemented by spa_kernels (it covers {list(SUPPORTED_LOSS_TYPES)})"
    if trainer.ld_alpha is not None:
        return f"ld_alpha={trainer.ld_alpha} (LD-DPO) is not implemented by spa_kernels"
    if trainer.f_divergence_type != "reverse_kl":
        return f"f_divergence_type={trainer.f_divergence_type!r} is not implemented by spa_kernels"
    if trainer.use_weighting:
        return "use_weighting=True (WPO) is not implemented by spa_kernels"
    if trainer.aux_loss_enabled:
        return "the MoE router auxiliary loss is not implemented by the spa_kernels head"
    if getattr(trainer, "_is_vlm", False):
        return "vision-language models are not covered by the spa_kernels head"
    return None


class SpaDPOMixin:
    """Overrides DPOTrainer._compute_loss and compute_ref_log_probs; put it before trl.DPOTrainer in the bases."""

    spa_impl: str = "auto"  # spa_kernels implementation: "auto" | "torch" | "cpu" | "triton" | "cuda"
    spa_token_metrics: bool = True  # log entropy, logits/*, mean_token_accuracy (one extra no-grad lm_head pass)
    _spa_state: bool | None = None  # None: not decided yet; False: TRL's own loss; True: the fused path

    def _spa_enabled(self) -> bool:
        """Decides once (on first use: precompute_ref_log_probs calls in before __init__ returns) and installs the
        fused head on the policy and the reference model."""
        if self._spa_state is None:
            if self.spa_impl != "auto" and self.spa_impl not in _dispatch.IMPLS:
                raise ValueError(f"kernel_impl={self.spa_impl!r} is not one of {('auto',) + _dispatch.IMPLS}")
            reason = unsupported_reason(self)
            if reason is not None:
                logger.warning("spa_kernels: %s; this trainer uses TRL's own DPO loss unchanged.", reason)
                self._spa_state = False
                return False
            for model in (self.model, self.ref_model):
                if model is not None:
                    model = self.accelerator.unwrap_model(model)
                    add_logprob_head(model.get_base_model() if is_peft_model(model) else model, impl=self.spa_impl)
            if self.label_smoothing and set(self.loss_types) - {"robust"}:
                logger.warning("spa_kernels: label_smoothing=%s only applies to loss_type 'robust' here, as in "
                               "TRL %s, which ignores it for sigmoid, ipo and hinge.", self.label_smoothing,
                               trl.__version__)
            self._spa_state = True
        return self._spa_state

    def _spa_adapter_context(self):
        """As TRL: a PEFT policy without ref_model is its own reference with the adapters disabled (or with the
        frozen "ref" adapter when an existing adapter is trained)."""
        if self.ref_model is None and is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            return use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        return contextlib.nullcontext()

    @staticmethod
    def _spa_model_inputs(inputs):
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        return model_kwargs, labels

    def compute_ref_log_probs(self, model, inputs):
        if not self._spa_enabled():
            return super().compute_ref_log_probs(model, inputs)
        model_kwargs, labels = self._spa_model_inputs(inputs)
        with (torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
              self._spa_adapter_context(), self.accelerator.autocast()):
            logps = model(**model_kwargs, labels=labels, spa_logprobs=True).logps
        return logps.chunk(2, dim=0)

    def _compute_loss(self, model, inputs, return_outputs):
        if not self._spa_enabled():
            return super()._compute_loss(model, inputs, return_outputs)
        mode = "train" if self.model.training else "eval"
        model_kwargs, labels = self._spa_model_inputs(inputs)
        completion_mask = inputs["completion_mask"]
        outputs = model(**model_kwargs, labels=labels, spa_logprobs=True, spa_token_stats=self.spa_token_metrics)
        chosen_logps, rejected_logps = outputs.logps.chunk(2, dim=0)  # the batch is [chosen, rejected]

        if self.precompute_ref_logps:
            ref_chosen_logps, ref_rejected_logps = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_model = self.model if self.ref_model is None else self.ref_model  # None: PEFT, adapters off
            # autocast as accelerate's wrapper of the prepared reference model would (the head sits above it)
            with (torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
                  self._spa_adapter_context(), self.accelerator.autocast()):
                ref_logps = ref_model(**model_kwargs, labels=labels, spa_logprobs=True).logps
            ref_chosen_logps, ref_rejected_logps = ref_logps.chunk(2, dim=0)

        loss = 0.0
        for loss_type, loss_weight in zip(self.loss_types, self.loss_weights, strict=True):
            logps = (chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
            if loss_type == "ipo":  # TRL's IPO divides each log-ratio by its completion length (unshifted mask)
                n_chosen, n_rejected = completion_mask.sum(dim=1).clamp(min=1).chunk(2, dim=0)
                logps = (logps[0] / n_chosen, logps[1] / n_rejected, logps[2] / n_chosen, logps[3] / n_rejected)
            out = preference_loss(*logps, beta=self.beta, loss_type=loss_type, reduction="mean",
                                  label_smoothing=self.label_smoothing if loss_type == "robust" else 0.0)
            loss = loss + out.loss * loss_weight

        self._spa_log_metrics(mode, inputs, outputs, chosen_logps, rejected_logps, ref_chosen_logps,
                              ref_rejected_logps)

        if return_outputs:  # as TRL: a deprecated path that needs the logits, recomputed by a plain forward
            warnings.warn("`return_outputs=True`, and the logits it passes to `compute_metrics`, are deprecated in "
                          "TRL; the fused head does not build logits, so they are recomputed with an extra forward.",
                          FutureWarning, stacklevel=2)
            with torch.no_grad():
                outputs = model(**model_kwargs)
        return (loss, outputs) if return_outputs else loss

    def _spa_log_metrics(self, mode, inputs, outputs, chosen_logps, rejected_logps, ref_chosen_logps,
                         ref_rejected_logps):
        """TRL 1.16's metrics, same names, same meaning, same cross-process reduction."""
        metrics, gather, gather_m = self._metrics[mode], self.accelerator.gather, self.accelerator.gather_for_metrics

        def ratio(num, den):
            num, den = gather_m(num).sum().item(), gather_m(den).sum().item()
            return num / den if den > 0 else 0.0

        chosen_tokens, rejected_tokens = outputs.num_tokens.chunk(2, dim=0)
        if self.spa_token_metrics:
            metrics["entropy"].append(ratio(outputs.entropy_sum.sum(), outputs.num_tokens.sum()))
        if mode == "train":
            num_tokens_in_batch = gather_m(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += num_tokens_in_batch // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        if self.spa_token_metrics:
            chosen_mean_logits, rejected_mean_logits = outputs.mean_logit_sum.chunk(2, dim=0)
            metrics["logits/chosen"].append(ratio(chosen_mean_logits.sum(), chosen_tokens.sum()))
            metrics["logits/rejected"].append(ratio(rejected_mean_logits.sum(), rejected_tokens.sum()))
            metrics["mean_token_accuracy"].append(ratio(outputs.top1_count.chunk(2, dim=0)[0].sum(),
                                                        chosen_tokens.sum()))

        chosen_rewards = self.beta * (chosen_logps - ref_chosen_logps).detach()
        rejected_rewards = self.beta * (rejected_logps - ref_rejected_logps).detach()
        metrics["rewards/chosen"].append(gather(chosen_rewards).mean().item())
        metrics["rewards/rejected"].append(gather(rejected_rewards).mean().item())
        metrics["rewards/accuracies"].append(gather((chosen_rewards > rejected_rewards).float()).mean().item())
        metrics["rewards/margins"].append(gather(chosen_rewards - rejected_rewards).mean().item())
        metrics["logps/chosen"].append(gather(chosen_logps.detach()).mean().item())
        metrics["logps/rejected"].append(gather(rejected_logps.detach()).mean().item())


class DPOTrainer(SpaDPOMixin, trl.DPOTrainer):
    """trl.DPOTrainer with the spa_kernels fused log-probs and preference loss. Same arguments, plus:

    kernel_impl: spa_kernels implementation, "auto" (fastest for the device) | "torch" | "cpu" | "triton" | "cuda".
    token_metrics: also log TRL's entropy, logits/chosen, logits/rejected and mean_token_accuracy, which need the
        full next-token distribution (one extra no-grad lm_head pass over the completion tokens); False skips them.
    """

    def __init__(self, *args, kernel_impl: str = "auto", token_metrics: bool = True, **kwargs):
        self.spa_impl, self.spa_token_metrics = kernel_impl, token_metrics
        super().__init__(*args, **kwargs)
        self._spa_enabled()  # decide (and refuse unsupported models) at construction, not at the first step


_PATCHED_CLASSES: dict[type, type] = {}


def patch_dpo_trainer(trainer: trl.DPOTrainer, *, kernel_impl: str = "auto",
                      token_metrics: bool = True) -> trl.DPOTrainer:
    """Switches an existing trl.DPOTrainer (or subclass) instance to the spa_kernels loss in place; returns it.
    Reference log-probs that were already precomputed by TRL are kept."""
    if not isinstance(trainer, trl.DPOTrainer):
        raise TypeError(f"patch_dpo_trainer expects a trl.DPOTrainer, got {type(trainer).__name__}")
    cls = type(trainer)
    if not issubclass(cls, SpaDPOMixin):
        if cls not in _PATCHED_CLASSES:
            _PATCHED_CLASSES[cls] = type(f"Spa{cls.__name__}", (SpaDPOMixin, cls), {"__module__": __name__})
        trainer.__class__ = _PATCHED_CLASSES[cls]
    trainer.spa_impl, trainer.spa_token_metrics, trainer._spa_state = kernel_impl, token_metrics, None
    trainer._spa_enabled()
    return trainer

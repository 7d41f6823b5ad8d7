"""A fused log-prob head for a transformers causal LM: `model(..., labels=labels, spa_logprobs=True)` runs the
backbone and scores the labels straight from the last hidden states with `linear_sequence_logprobs`, never
building [batch, seq, vocab] logits, and returns per-sequence log-probs.

The head is a patched `model.forward`, not a separate call, so that everything a wrapper arms in the model's
forward still happens: DDP's reducer bookkeeping, FSDP's unsharding of the root module's parameters (lm_head
included), DeepSpeed ZeRO-3's forward/backward hooks. Like TRL's fused head it reads `lm_head.weight` directly,
so under ZeRO-3 it gathers that weight itself (in the forward and again in the backward, which recomputes the
logits), and an FSDP2 DTensor weight is made whole first.

Logit transforms between the lm_head and the softmax are read from the config the way TRL 1.16 reads them:
a positive logit scale (Cohere `logit_scale`, `output_multiplier`, Falcon-H1 `lm_head_multiplier`, Granite /
MiniCPM3 `logits_scaling`) is applied exactly, as temperature = 1 / scale; final-logit softcapping (Gemma 2/3)
is refused, since the fused kernels compute log_softmax(h W^T / temperature) only.
"""

from __future__ import annotations

import contextlib
import functools
import types
from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput

from .. import linear_sequence_logprobs

_MARK = "_spa_logprob_head"
STATS_CHUNK_BYTES = 32 * 2**20  # float32 logits per chunk of the (no-grad) token-statistics pass


@dataclass
class SequenceLogprobsOutput(ModelOutput):
    """What `model(..., spa_logprobs=True)` returns; every field is a [N] vector over the rows of the batch.

    logps: summed log-probs of the scored tokens (labels != -100, after the causal shift), float32, with grad.
    num_tokens: scored tokens per row (int64).
    entropy_sum, mean_logit_sum, top1_count: only with `spa_token_stats=True`, no grad: per row, the sum over
        scored tokens of the next-token entropy, of the mean logit over the vocabulary, and the number of tokens
        whose label is the argmax (the first one on ties), all of the scaled logits (TRL's `entropy`,
        `logits/*` and `mean_token_accuracy` metrics).
    """

    logps: torch.Tensor | None = None
    num_tokens: torch.Tensor | None = None
    entropy_sum: torch.Tensor | None = None
    mean_logit_sum: torch.Tensor | None = None
    top1_count: torch.Tensor | None = None


def logit_scale_and_softcap(config) -> tuple[float, float | None]:
    """(scale, softcap) applied to the lm_head output before the softmax, read as TRL 1.16 reads them."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text_config, "final_logit_softcapping", None)
    scale = getattr(text_config, "logit_scale", None)
    if scale is None:
        scale = getattr(text_config, "output_multiplier", None)
    if scale is None:
        scale = getattr(text_config, "lm_head_multiplier", None)
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:
        logits_scaling = text_config.logits_scaling
        scale = logits_scaling if getattr(text_config, "model_type", "") == "hyperclovax" else 1 / logits_scaling
    return (1.0 if scale is None else float(scale)), softcap


def check_fusable(model) -> float:
    """The logit scale of `model` (1.0 when none), or a ValueError if the fused head cannot reproduce its logits."""
    scale, softcap = logit_scale_and_softcap(model.config)
    name = type(model).__name__
    if softcap is not None:
        raise ValueError(f"{name} applies final-logit softcapping (config.final_logit_softcapping={softcap}); the "
                         "spa_kernels fused head computes log_softmax(hidden @ lm_head.weight.T / temperature) only "
                         "and cannot apply tanh softcapping. Use the model's own loss (e.g. trl.DPOTrainer) for it.")
    if not scale > 0:
        raise ValueError(f"{name} scales its logits by {scale}; the fused head supports a positive logit scale only")
    if model.get_output_embeddings() is None or not hasattr(model.get_output_embeddings(), "weight"):
        raise ValueError(f"{name} has no output embedding (lm_head) with a weight to fuse the log-probs into")
    return scale


def zero3_gather(*params):
    """Gathers ZeRO-3 partitioned parameters for a direct read (the lm_head module's own gather hook never fires
    because the fused head does not call it). A null context without DeepSpeed ZeRO-3 or when already gathered
    (tied embeddings keep the weight available after embed_tokens ran)."""
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:  # pragma: no cover - transformers without the deepspeed integration
        return contextlib.nullcontext()
    if not is_deepspeed_zero3_enabled():
        return contextlib.nullcontext()
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    # deduplicated by identity: ZeRO-3 mishandles a parameter listed twice (tied or shared weights)
    todo = {id(p): p for p in params if p is not None and getattr(p, "ds_status", None) != ZeroParamStatus.AVAILABLE}
    return deepspeed.zero.GatheredParameters(list(todo.values())) if todo else contextlib.nullcontext()


def fused_logps(hidden, weight, bias, labels, dtype, options):
    """linear_sequence_logprobs with every input in `dtype` and autocast off: under autocast the kernels' chunked
    matmuls would run in the autocast dtype in the forward but not in the backward (autocast is not active there),
    and the log-sum-exp saved from one would not match the logits recomputed by the other."""
    with torch.autocast(hidden.device.type, enabled=False):
        cast = (lambda t: None if t is None else t.to(dtype))
        return linear_sequence_logprobs(cast(hidden), cast(weight), labels, bias=cast(bias), **options)


class RegatheredLinearLogprobs(torch.autograd.Function):
    """fused_logps for a weight that is only readable inside `gather(weight, bias)` (ZeRO-3). The caller enters the
    gather around `apply` (so autograd records the full shapes); the backward enters it again and recomputes the
    forward under autograd, since the kernels' own backward reads the weight too."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, gather, dtype, options):
        ctx.save_for_backward(hidden, weight, bias, labels)
        ctx.gather, ctx.dtype, ctx.options = gather, dtype, options
        return fused_logps(hidden, weight, bias, labels, dtype, options)

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, labels = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        with ctx.gather(weight, bias), torch.enable_grad():
            inputs = [None if t is None else t.detach().requires_grad_(need)
                      for t, need in zip((hidden, weight, bias), needs)]
            out = fused_logps(*inputs, labels, ctx.dtype, ctx.options)
            wanted = [t for t, need in zip(inputs, needs) if need]
            grads = iter(torch.autograd.grad(out, wanted, grad) if wanted else ())
            result = [next(grads) if need else None for need in needs]
        return (*result, None, None, None, None)


@torch.no_grad()
def token_stats(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(entropy, mean logit, label-is-argmax) per row of hidden [M, H] for logits scale * (hidden @ weight.T + bias),
    accumulated in float32, chunked over rows so no [M, V] tensor exists."""
    M, V = hidden.shape[0], weight.shape[0]
    entropy = hidden.new_empty(M, dtype=torch.float32)
    mean = hidden.new_empty(M, dtype=torch.float32)
    top1 = torch.empty(M, dtype=torch.bool, device=hidden.device)
    chunk = max(1, STATS_CHUNK_BYTES // (4 * V))
    for s in range(0, M, chunk):
        z = torch.nn.functional.linear(hidden[s:s + chunk], weight, bias).float() * scale
        logp = torch.log_softmax(z, dim=-1)
        entropy[s:s + chunk] = -(logp.exp() * logp).sum(-1)
        mean[s:s + chunk] = z.mean(-1)
        top1[s:s + chunk] = z.argmax(-1) == labels[s:s + chunk]  # argmax returns the first maximum
    return entropy, mean, top1


def _head_weights(model):
    head = model.get_output_embeddings()
    weight, bias = head.weight, getattr(head, "bias", None)
    try:  # FSDP2 keeps parameters as DTensors outside its unshard window (e.g. an lm_head wrapped on its own)
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        DTensor = ()
    if isinstance(weight, DTensor):
        weight = weight.full_tensor()
        bias = bias.full_tensor() if isinstance(bias, DTensor) else bias
    return weight, bias


def sequence_logprobs_from_hidden(model, hidden: torch.Tensor, labels: torch.Tensor, *, impl: str = "auto",
                                  token_stats_wanted: bool = False, scale: float | None = None
                                  ) -> SequenceLogprobsOutput:
    """Scores labels [N, T] (already aligned with hidden [N, T, H]: label t is predicted from hidden t) through the
    model's lm_head without building logits."""
    scale = check_fusable(model) if scale is None else scale
    weight, bias = _head_weights(model)
    device = weight.device
    # under autocast the lm_head runs in the autocast dtype, as the model's own lm_head (and TRL's head) would
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else weight.dtype
    hidden, labels = hidden.to(device), labels.to(device)  # the backbone may end elsewhere with a device_map
    mask = labels != -100
    options = dict(ignore_index=-100, temperature=1.0 / scale, impl=impl)
    gather = zero3_gather(weight, bias)
    with gather:
        if isinstance(gather, contextlib.nullcontext):
            logps = fused_logps(hidden, weight, bias, labels, dtype, options)
        else:
            logps = RegatheredLinearLogprobs.apply(hidden, weight, bias, labels, zero3_gather, dtype, options)
        out = SequenceLogprobsOutput(logps=logps, num_tokens=mask.sum(-1))
        if token_stats_wanted:
            rows = mask.nonzero()[:, 0]
            flat = mask.reshape(-1).nonzero().squeeze(1)
            h = hidden.detach().reshape(-1, hidden.shape[-1]).index_select(0, flat).to(dtype)
            with torch.autocast(device.type, enabled=False):
                entropy, mean, top1 = token_stats(h, weight.detach().to(dtype),
                                                  None if bias is None else bias.detach().to(dtype),
                                                  labels.reshape(-1).index_select(0, flat), scale)
            zeros = torch.zeros(labels.shape[0], dtype=torch.float32, device=device)
            out.entropy_sum = zeros.index_add(0, rows, entropy)
            out.mean_logit_sum = zeros.index_add(0, rows, mean)
            out.top1_count = zeros.index_add(0, rows, top1.float())
    return out


def add_logprob_head(model, *, impl: str = "auto") -> None:
    """Patches `model.forward` (a transformers causal LM; for PEFT, the base model inside) so that
    `model(input_ids, attention_mask=..., labels=labels, spa_logprobs=True, spa_token_stats=False)` returns a
    SequenceLogprobsOutput: labels [N, T] are aligned with input_ids (-100 = not scored) and shifted inside, as
    for the model's own loss. Without `spa_logprobs=True` the forward is unchanged. Idempotent; `impl` picks the
    spa_kernels implementation ("auto" = fastest for the device)."""
    check_fusable(model)
    if getattr(model, _MARK, None) is not None:
        setattr(model, _MARK, impl)
        return
    # kept on the instance, not in the closure, so that copy.deepcopy(model) rebinds it to the copy
    model._spa_previous_forward = model.forward
    setattr(model, _MARK, impl)

    @functools.wraps(type(model).forward)  # keeps the signature generate() validates its kwargs against
    def forward(self, *args, spa_logprobs=False, spa_token_stats=False, **kwargs):
        if not spa_logprobs:
            return self._spa_previous_forward(*args, **kwargs)
        labels = kwargs.pop("labels", None)
        if labels is None:
            raise ValueError("spa_logprobs=True needs labels [N, T] (token ids, -100 where not scored)")
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        # prompt-learning PEFT prepends virtual tokens and pads labels to match; either way align on the right
        T = min(hidden.shape[1], labels.shape[1])
        hidden, labels = hidden[:, -T:][:, :-1], labels[:, -T:][:, 1:]
        return sequence_logprobs_from_hidden(self, hidden, labels, impl=getattr(self, _MARK),
                                             token_stats_wanted=spa_token_stats)

    model.forward = types.MethodType(forward, model)

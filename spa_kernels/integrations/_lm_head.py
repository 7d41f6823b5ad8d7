"""A fused log-prob head for a transformers causal LM: `model(..., labels=labels, spa_logprobs=True)` runs the
backbone and scores the labels straight from the last hidden states with `linear_sequence_logprobs`, never
building [batch, seq, vocab] logits, and returns per-sequence log-probs.

Two choices make it work under the engines that shard or wrap parameters:
- The head is a patched `model.forward`, so whatever a wrapper arms around the model's forward still happens
  (DDP's reducer bookkeeping; FSDP's unsharding of the root unit; DeepSpeed's hooks).
- The fused computation runs *as the lm_head module's forward* (the module is called, with its forward swapped
  for the fused one), so the hooks that engines hang on that module fire around it exactly as for an ordinary
  lm_head call: FSDP2 unshards its weight and reduce-scatters its gradient, DeepSpeed ZeRO-3 gathers the
  partitioned weight for the forward and again before the backward, accelerate's device_map hooks move inputs
  and load offloaded weights. Reading `lm_head.weight` directly instead (as TRL 1.16 and Liger do) sees a
  sharded or empty weight when the lm_head is its own FSDP unit or is partitioned, and its gradient skips the
  engine's reduction.

Logit transforms between the lm_head and the softmax are read from the config the way TRL 1.16 reads them:
a positive logit scale (Cohere `logit_scale`, `output_multiplier`, Falcon-H1 `lm_head_multiplier`, Granite /
MiniCPM3 `logits_scaling` as a divisor, HyperCLOVA X `logits_scaling` as a multiplier) is applied exactly, as
temperature = 1 / scale, and final-logit softcapping (Gemma 2/3 `final_logit_softcapping`) after it, through the
kernels' `softcap=` (logit -> cap * tanh(logit / cap) before the softmax).

This module is the one place that reads a model's output head: the drop-ins (hf.py, trl.py) and the `spa` trainer
all score sequences through it (`add_logprob_head`, `sequence_logprobs`, `spa_sequence_logprobs`).
"""
from __future__ import annotations

import functools
import types
from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput

from .. import linear_sequence_logprobs, linear_spa_sequence_logprobs

_MARK = "_spa_logprob_head"
STATS_CHUNK_BYTES = 16 * 2**20  # float32 logits per chunk of the no-grad token-statistics pass (x2 live)


@dataclass
class SequenceLogprobsOutput(ModelOutput):
    """What `model(..., spa_logprobs=True)` returns; every field is a [N] vector over the rows of the batch.

    logps: summed log-probs of the scored tokens (labels != -100, after the causal shift), float32, with grad.
    num_tokens: scored tokens per row (int64).
    entropy_sum, mean_logit_sum, top1_count: only with `spa_token_stats=True`, no grad: per row, the sum over
        scored tokens of the next-token entropy, of the mean logit over the vocabulary, and the number of tokens
        whose label is the argmax (the first one on ties), all of the scaled logits (TRL's `entropy`,
        `logits/*` and `mean_token_accuracy` metrics).
    hidden_states: only with `spa_return_hidden=True`: the backbone's last hidden states [N, T, H], aligned with
        input_ids (unshifted), with grad.
    ref_logps, extrapolated_logps: only with `spa_reference=(ref_model, ref_hidden, lam)` (SPA's de-coupled noise
        detection): the reference model's log-probs and those of the extrapolated logits
        (1 + lam) z - lam z_ref, [N] float32, no grad.
    """

    logps: torch.Tensor | None = None
    num_tokens: torch.Tensor | None = None
    entropy_sum: torch.Tensor | None = None
    mean_logit_sum: torch.Tensor | None = None
    top1_count: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None
    extrapolated_logps: torch.Tensor | None = None


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


def head_transform(model) -> tuple[float, float | None]:
    """(scale, softcap) of `model`'s logits: scale 1.0 when none, softcap None when none; a ValueError if the
    fused head cannot reproduce its logits (non-positive scale or cap, no lm_head weight, a PEFT lm_head)."""
    scale, softcap = logit_scale_and_softcap(model.config)
    name = type(model).__name__
    if softcap is not None:
        softcap = float(softcap)
        if not softcap > 0:
            raise ValueError(f"{name} softcaps its logits at {softcap}; the fused head supports a positive cap only")
    if not scale > 0:
        raise ValueError(f"{name} scales its logits by {scale}; the fused head supports a positive logit scale only")
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"{name} has no output embedding (lm_head) with a weight to fuse the log-probs into")
    if hasattr(head, "base_layer"):  # a PEFT tuner layer: its adapter would be skipped by reading the weight
        raise ValueError(f"{name} has a PEFT adapter on its lm_head; the fused head reads lm_head.weight and "
                         "would never train it. Remove 'lm_head' from the adapter's target_modules.")
    return scale, softcap


def check_fusable(model) -> float:
    """The logit scale of `model` (1.0 when none), or a ValueError if the fused head cannot reproduce its logits."""
    return head_transform(model)[0]


def fused_logps(hidden, weight, bias, labels, dtype, options):
    """linear_sequence_logprobs with every input in `dtype` and autocast off: under autocast the kernels' chunked
    matmuls would run in the autocast dtype in the forward but not in the backward (autocast is not active there),
    and the log-sum-exp saved from one would not match the logits recomputed by the other."""
    with torch.autocast(hidden.device.type, enabled=False):
        cast = (lambda t: None if t is None else t.to(dtype))
        return linear_sequence_logprobs(cast(hidden), cast(weight), labels, bias=cast(bias), **options)


@torch.no_grad()
def token_stats(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                scale: float, softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(entropy, mean logit, label-is-argmax) per row of hidden [M, H] for logits scale * (hidden @ weight.T + bias)
    (then softcapped: cap * tanh(z / cap)), accumulated in float32, chunked over rows so no [M, V] tensor exists."""
    M, V = hidden.shape[0], weight.shape[0]
    entropy = hidden.new_empty(M, dtype=torch.float32)
    mean = hidden.new_empty(M, dtype=torch.float32)
    top1 = torch.empty(M, dtype=torch.bool, device=hidden.device)
    chunk = max(1, STATS_CHUNK_BYTES // (4 * V))
    for s in range(0, M, chunk):
        z = torch.nn.functional.linear(hidden[s:s + chunk], weight, bias).float().mul_(scale)
        if softcap is not None:
            z.div_(softcap).tanh_().mul_(softcap)
        mean[s:s + chunk] = z.mean(-1)
        top1[s:s + chunk] = z.argmax(-1) == labels[s:s + chunk]  # argmax returns the first maximum
        lse = torch.logsumexp(z, dim=-1)
        p = torch.sub(z, lse.unsqueeze(-1)).exp_()  # one more [chunk, V] buffer besides z
        entropy[s:s + chunk] = lse - torch.linalg.vecdot(p, z)  # H = lse - sum_v p_v z_v
    return entropy, mean, top1


def call_as_forward(module: torch.nn.Module, fn, *args):
    """fn(*args) run as `module`'s forward, so the hooks that engines hang on the module run around it."""
    target = getattr(module, "_fsdp_wrapped_module", module)  # FSDP1 wraps the module rather than hooking it
    # accelerate's device_map hooks replace `forward` with a wrapper that calls `_old_forward`
    attr = "_old_forward" if hasattr(target, "_hf_hook") and hasattr(target, "_old_forward") else "forward"
    previous = target.__dict__.get(attr)
    setattr(target, attr, fn)
    try:
        return module(*args)
    finally:
        if previous is None:
            delattr(target, attr)
        else:
            setattr(target, attr, previous)


def _head_weight(head):
    weight, bias = head.weight, getattr(head, "bias", None)
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        DTensor = ()
    if isinstance(weight, DTensor):
        raise ValueError("the lm_head weight is a sharded DTensor inside the lm_head's own forward (tensor "
                         "parallelism?); the fused head supports FSDP / ZeRO-3 sharding, not sharded matmuls")
    return weight, bias


def sequence_logprobs_from_hidden(model, hidden: torch.Tensor, labels: torch.Tensor, *, impl: str = "auto",
                                  token_stats_wanted: bool = False, scale: float | None = None,
                                  reference=None) -> SequenceLogprobsOutput:
    """Scores labels [N, T] (already aligned with hidden [N, T, H]: label t is predicted from hidden t) through the
    model's lm_head without building logits. `reference=(ref_model, ref_hidden, lam)` (ref_hidden aligned like
    hidden) adds the reference's and the extrapolated log-probs (SPA's de-coupled noise detection) from one pass
    of linear_spa_sequence_logprobs; the reference's lm_head runs as its module's forward too (inside the
    policy's)."""
    scale_, softcap = head_transform(model)
    scale = scale_ if scale is None else scale
    head = model.get_output_embeddings()
    mask = labels != -100
    options = dict(ignore_index=-100, temperature=1.0 / scale, softcap=softcap, impl=impl)
    if reference is not None:
        ref_model, ref_hidden, lam = reference
        ref_scale, ref_softcap = head_transform(ref_model)
        if softcap is not None or ref_softcap is not None:
            raise ValueError("the extrapolated log-probs of de-coupled noise detection are not implemented for "
                             "models with final-logit softcapping")
        ref_head = ref_model.get_output_embeddings()

    def fused_head(hidden, labels):
        weight, bias = _head_weight(head)
        # under autocast the lm_head runs in the autocast dtype, as the model's own lm_head would
        device = weight.device
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else weight.dtype
        hidden, labels = hidden.to(device), labels.to(device)  # the backbone may end elsewhere (device_map)
        if reference is not None:
            return call_as_forward(ref_head, functools.partial(extrapolated, hidden, weight, bias, dtype), ref_hidden,
                                   labels)
        logps = fused_logps(hidden, weight, bias, labels, dtype, options)
        if not token_stats_wanted:
            return (logps,)
        valid = labels != -100
        flat = valid.reshape(-1).nonzero().squeeze(1)
        with torch.autocast(device.type, enabled=False):
            stats = token_stats(hidden.detach().reshape(-1, hidden.shape[-1]).index_select(0, flat).to(dtype),
                                weight.detach().to(dtype), None if bias is None else bias.detach().to(dtype),
                                labels.reshape(-1).index_select(0, flat), scale, softcap)
        rows = valid.nonzero()[:, 0]
        zeros = torch.zeros(labels.shape[0], dtype=torch.float32, device=device)
        return (logps, *(zeros.index_add(0, rows, x.float()) for x in stats))

    def extrapolated(hidden, weight, bias, dtype, ref_hidden, labels):
        ref_weight, ref_bias = _head_weight(ref_head)
        ref_weight, ref_bias = ref_weight.detach(), None if ref_bias is None else ref_bias.detach()
        with torch.autocast(hidden.device.type, enabled=False):
            cast = (lambda t, s=1.0: None if t is None else (t.to(dtype) if s == 1.0 else t.to(dtype) * s))
            # the kernel has no temperature: a logit scale s is folded into the inputs, s (h W^T + b) = (s h) W^T + s b
            return linear_spa_sequence_logprobs(
                cast(hidden, scale), cast(weight), cast(ref_hidden.to(weight.device), ref_scale),
                cast(ref_weight), labels, lam=lam, bias=cast(bias, scale), ref_bias=cast(ref_bias, ref_scale),
                ignore_index=-100, impl=impl)

    outputs = call_as_forward(head, fused_head, hidden, labels)
    out = SequenceLogprobsOutput(logps=outputs[0], num_tokens=mask.sum(-1))
    if reference is not None:
        out.ref_logps, out.extrapolated_logps = outputs[1].detach(), outputs[2].detach()
    elif token_stats_wanted:
        out.entropy_sum, out.mean_logit_sum, out.top1_count = outputs[1:]
    return out


def add_logprob_head(model, *, impl: str = "auto") -> None:
    """Patches `model.forward` (a transformers causal LM; for PEFT, the base model inside) so that
    `model(input_ids, attention_mask=..., labels=labels, spa_logprobs=True, spa_token_stats=False,
    spa_return_hidden=False, spa_reference=None)` returns a SequenceLogprobsOutput: labels [N, T] are aligned with
    input_ids (-100 = not scored) and shifted inside, as for the model's own loss. Without `spa_logprobs=True` the
    forward is unchanged. Idempotent; `impl` picks the spa_kernels implementation ("auto" = fastest for the
    device)."""
    check_fusable(model)
    if getattr(model, _MARK, None) is not None:
        setattr(model, _MARK, impl)
        return
    # kept on the instance, not in the closure, so that copy.deepcopy(model) rebinds it to the copy
    model._spa_previous_forward = model.forward
    setattr(model, _MARK, impl)

    @functools.wraps(type(model).forward)  # keeps the signature generate() validates its kwargs against
    def forward(self, *args, spa_logprobs=False, spa_token_stats=False, spa_return_hidden=False,
                spa_reference=None, **kwargs):
        if not spa_logprobs:
            return self._spa_previous_forward(*args, **kwargs)
        labels = kwargs.pop("labels", None)
        if labels is None:
            raise ValueError("spa_logprobs=True needs labels [N, T] (token ids, -100 where not scored)")
        kwargs["use_cache"] = False
        full = self.base_model(*args, **kwargs).last_hidden_state
        # prompt-learning PEFT prepends virtual tokens and pads labels to match; either way align on the right
        T = min(full.shape[1], labels.shape[1])
        hidden, labels = full[:, -T:][:, :-1], labels[:, -T:][:, 1:]
        if spa_reference is not None:  # (ref_model, ref_hidden [N, T, H] unshifted, lam)
            ref_model, ref_hidden, lam = spa_reference
            spa_reference = (ref_model, ref_hidden[:, -T:][:, :-1], lam)
        out = sequence_logprobs_from_hidden(self, hidden, labels, impl=getattr(self, _MARK),
                                            token_stats_wanted=spa_token_stats, reference=spa_reference)
        if spa_return_hidden:
            out.hidden_states = full
        return out

    model.forward = types.MethodType(forward, model)

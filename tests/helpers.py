"""Ground truths and the comparison rule for kernel tests.

Oracle: float64 on the same (already rounded) inputs. Eager: the way TRL computes it in the input dtype
(log_softmax + gather). A kernel passes when, everywhere, |kernel - oracle| <= 2 max|eager - oracle| + atol +
rtol |oracle| (flash-attn's rule: no worse than the eager path's worst error); a failure names the worst index.
"""

from __future__ import annotations

import torch


def oracle_token_logprobs(logits, labels, ignore_index=-100, temperature=1.0):
    lp = torch.log_softmax(logits.double() / temperature, -1)
    mask = labels != ignore_index
    return lp.gather(-1, labels.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1).masked_fill(~mask, 0.0)


def eager_token_logprobs(logits, labels, ignore_index=-100, temperature=1.0):
    lp = torch.log_softmax(logits / temperature, -1)
    mask = labels != ignore_index
    return lp.gather(-1, labels.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1).masked_fill(~mask, 0.0)


def seq_reduce(token, labels, ignore_index=-100, average=False):
    s = token.sum(-1)
    if average:
        s = s / (labels != ignore_index).sum(-1).clamp(min=1).to(s.dtype)
    return s


def assert_no_worse(actual, oracle, eager=None, atol=1e-5, rtol=1e-5, name="value"):
    actual, oracle = actual.detach().double().cpu(), oracle.detach().double().cpu()
    assert actual.shape == oracle.shape, f"{name}: shape {list(actual.shape)} != {list(oracle.shape)}"
    err = (actual - oracle).abs()
    bound = atol + rtol * oracle.abs()
    if eager is not None:
        eager_err = torch.nan_to_num((eager.detach().double().cpu() - oracle).abs(), nan=0.0, posinf=0.0)
        bound = bound + 2 * (eager_err.max() if eager_err.numel() else 0.0)
    same_nonfinite = (~torch.isfinite(oracle)) & (actual == oracle)
    ok = (err <= bound) | same_nonfinite | (torch.isnan(actual) & torch.isnan(oracle))
    if not bool(ok.all()):
        excess = torch.where(ok, torch.zeros_like(err), torch.nan_to_num(err - bound, nan=float("inf")))
        idx = tuple(int(i) for i in torch.unravel_index(excess.argmax(), excess.shape))
        raise AssertionError(f"{name}: {int((~ok).sum())} of {ok.numel()} elements off; worst at {idx}: "
                             f"got {actual[idx].item():.8g}, want {oracle[idx].item():.8g} "
                             f"(bound {bound[idx].item():.3g})")


def make_logits(shape, dtype, device="cpu", scale=3.0, gen=None):
    return (torch.randn(shape, generator=gen, dtype=torch.float32) * scale).to(device=device, dtype=dtype)


def make_labels(shape, vocab, device="cpu", ignore_index=-100, ignore_frac=0.25):
    labels = torch.randint(0, vocab, shape)
    drop = torch.rand(shape) < ignore_frac
    return labels.masked_fill(drop, ignore_index).to(device)

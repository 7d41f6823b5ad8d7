"""Models and batched scoring: loading like any hub model, and per-sequence log-probs (with the last hidden states)
through spa_kernels' fused head (spa_kernels.integrations: the model's own forward, then its lm_head with logit
scaling, softcapping, bias and tied or gathered weights handled in one place; never [batch, seq, vocab] logits).
Every stage scores sequences here, with the kernel implementation from kernel_impl(cfg)."""

from __future__ import annotations

import os

import torch

IGNORE = -100


def kernel_impl(cfg) -> str:
    """The spa_kernels implementation every stage uses (train, judge, validate, eval): `train.kernel_impl`."""
    return cfg.train.kernel_impl


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:  # a multi-process launch: one GPU per process
            return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except (RuntimeError, ValueError) as e:
        from .config import ConfigError

        raise ConfigError(f"model.device {name!r} is not a device ({e})") from None


def _dtype(name: str):
    return "auto" if name == "auto" else getattr(torch, name)


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:  # many causal LMs ship without one; padding is always masked
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(path: str, mcfg, device: torch.device | None = None, train: bool = False):
    from transformers import AutoModelForCausalLM

    kw = {"dtype": _dtype(mcfg.dtype), "trust_remote_code": mcfg.trust_remote_code}
    if mcfg.attn_implementation:
        kw["attn_implementation"] = mcfg.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(path, **kw)
    if device is not None:
        model.to(device)
    model.train(train)
    if not train:
        model.requires_grad_(False)
    return model


def load_model(path: str, cfg, device: torch.device | None = None, merge: bool = False):
    """A model of the run, for inference: a full save_pretrained folder (load_causal_lm), or a LoRA adapter folder
    (model.peft runs: iter_<i>/model/) applied to pi_init's weights as a peft.PeftModel, or with merge=True merged
    into them (a plain model, faster to sample from)."""
    from .lora import is_adapter

    if not is_adapter(path):
        return load_causal_lm(path, cfg.model, device)
    from peft import PeftModel

    from .judges import init_model_path

    base = load_causal_lm(init_model_path(cfg), cfg.model, device)
    model = PeftModel.from_pretrained(base, path, is_trainable=False)
    if merge:
        return model.merge_and_unload().eval()
    if device is not None:
        model.to(device)
    return model.eval()


def pad_sequences(items: list[tuple[list[int], list[int]]], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask, labels aligned with input_ids (the response tokens, IGNORE on the
    prompt and the padding; shifted inside the model as for its own loss) and response_mask marking the response
    positions."""
    T = max(len(p) + len(r) for p, r in items)
    N = len(items)
    ids = torch.full((N, T), pad_id, dtype=torch.long)
    att = torch.zeros((N, T), dtype=torch.long)
    labels = torch.full((N, T), IGNORE, dtype=torch.long)
    resp = torch.zeros((N, T), dtype=torch.bool)
    for i, (p, r) in enumerate(items):
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor(p + r)
        att[i, :n] = 1
        labels[i, len(p):n] = torch.tensor(r)
        resp[i, len(p):n] = True
    return {"input_ids": ids.to(device), "attention_mask": att.to(device), "labels": labels.to(device),
            "response_mask": resp.to(device)}


def batch_logps(model, batch: dict, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(summed response log-probs [N] float32, last hidden states [N, T, H]) for a pad_sequences batch."""
    from spa_kernels.integrations.hf import sequence_logprobs

    out = sequence_logprobs(model, batch, return_hidden=True, impl=impl)
    return out.logps, out.hidden_states


def mean_response_embedding(hidden: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """REAL's embedding: the last hidden layer averaged over response tokens only (prompt excluded)."""
    m = response_mask.to(hidden.dtype).unsqueeze(-1)
    return ((hidden * m).sum(1) / m.sum(1).clamp(min=1)).float()


@torch.inference_mode()
def score_sequences(model, items: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int,
                    impl: str = "auto", embeddings: bool = False, progress: str | None = None):
    """Summed response log-probs [N] (float32, CPU) of (prompt_ids, response_ids) items under `model`, batched in
    length order; with embeddings=True also REAL's mean response embeddings [N, H]."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]) + len(items[i][1]))
    logps = torch.empty(len(items))
    embs = None
    starts = range(0, len(order), batch_size)
    for s in tqdm(starts, desc=progress, disable=progress is None, leave=False):
        idx = order[s:s + batch_size]
        batch = pad_sequences([items[i] for i in idx], pad_id, device)
        lp, hidden = batch_logps(model, batch, impl)
        logps[idx] = lp.float().cpu()
        if embeddings:
            e = mean_response_embedding(hidden, batch["response_mask"]).cpu()
            if embs is None:
                embs = torch.empty(len(items), e.shape[1])
            embs[idx] = e
    return (logps, embs) if embeddings else logps

"""Every model a run loads, in one place: tokenizers; pi_init and each iteration's model (a full save_pretrained
folder, or a LoRA adapter on pi_init's weights); the references next to a policy; the judge's reward model; a new
model for sft.from_scratch; and the merge of an adapter into a full model. Stages and judges ask here, so following
the config from a stage enters this module once.

LoRA (peft), with `model.peft` set: every DPO stage trains a LoRA adapter on pi_init's weights instead of the full
model:
  iteration 0      a new adapter (peft.get_peft_model with model.peft), reference pi_init = the adapter disabled
  iteration i >= 1 iteration i-1's adapter, trainable, continues (the paper trains pi_i from pi_{i-1}); the
                   reference pi_{i-1} is that adapter as it was: the precomputed reference log-probs are scored
                   before the first step, and with de-coupled noise detection (per-step reference hidden states)
                   the same adapter is loaded a second time, frozen, as the "ref" adapter (TRL's name for it)
So one copy of the base weights serves the policy, pi_init (adapter disabled) and pi_{i-1} (the frozen adapter);
the judge, validate and eval stages load pi_init + an iteration's adapter once and get their references the same
way (AdapterView, reference_model). iter_<i>/model/ holds the adapter (adapter_config.json,
adapter_model.safetensors) and the tokenizer; `spa merge` (merge_adapter) writes base + adapter as one full model.
Log-probs are always computed by spa_kernels.integrations (the fused head on the base model inside the PEFT
wrapper); this module only chooses which weights are active.
"""

from __future__ import annotations

import contextlib
import os

import torch

from .config import ConfigError
from .io import Layout, atomic_dir, commit_dir


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:  # a multi-process launch: one GPU per process
            return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except (RuntimeError, ValueError) as e:
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


def new_model(tok, spec: dict):
    """A freshly initialised causal LM from config kwargs (model_type defaults to llama), sized to the tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(spec)
    model_type = spec.pop("model_type", "llama")
    config = AutoConfig.for_model(model_type, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **spec)
    return AutoModelForCausalLM.from_config(config)


def init_model_path(cfg) -> str:
    """pi_init: the SFT stage's model when sft.enabled, else model.name_or_path."""
    if cfg.sft.enabled:
        return Layout(cfg.output_dir).sft_model
    if not cfg.model.name_or_path:
        raise ValueError("model.name_or_path is not set (and sft.enabled is false): pi_init is needed")
    return cfg.model.name_or_path


def judge_reference_path(cfg, iteration: int) -> str:
    """The implicit judge's reference model for iteration i: pi_init, or with judge.reference=previous the model
    pi_{i-1} was trained from (pi_{i-2}; pi_init for i = 1)."""
    if cfg.judge.reference == "previous" and iteration >= 2:
        return Layout(cfg.output_dir).model(iteration - 2)
    return init_model_path(cfg)


def load_model(path: str, cfg, device: torch.device | None = None, merge: bool = False):
    """A model of the run, for inference: a full save_pretrained folder (load_causal_lm), or a LoRA adapter folder
    (model.peft runs: iter_<i>/model/) applied to pi_init's weights as a peft.PeftModel, or with merge=True merged
    into them (a plain model, faster to sample from)."""
    if not is_adapter(path):
        return load_causal_lm(path, cfg.model, device)
    from peft import PeftModel

    base = load_causal_lm(init_model_path(cfg), cfg.model, device)
    model = PeftModel.from_pretrained(base, path, is_trainable=False)
    if merge:
        return model.merge_and_unload().eval()
    if device is not None:
        model.to(device)
    return model.eval()


def load_reward_model(path: str, device, trust_remote_code: bool = False):
    """(model, tokenizer) of a transformers sequence-classification reward model (judge.type=reward_model), in eval
    mode on `device`, its pad token set."""
    from transformers import AutoModelForSequenceClassification

    tok = load_tokenizer(path, trust_remote_code)
    model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=trust_remote_code)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    return model.to(device).eval(), tok


ADAPTER_CONFIG = "adapter_config.json"
POLICY_ADAPTER = "default"  # peft's name for the adapter a PeftModel is created or loaded with
REFERENCE_ADAPTER = "ref"  # a frozen earlier adapter on the same base (TRL's name)


def is_adapter(path: str) -> bool:
    """A PEFT adapter folder (adapter_config.json), as opposed to a full save_pretrained model."""
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def is_peft_model(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def lora_config(section: dict):
    """peft.LoraConfig from the model.peft section (already validated by spa.config)."""
    from peft import LoraConfig

    return LoraConfig(**{**section, "task_type": "CAUSAL_LM"})


class AdapterView(torch.nn.Module):
    """A PEFT model seen as another model: `adapter` active (None: every adapter disabled, i.e. the base weights),
    in eval mode (no dropout), for the duration of each call; the previous adapter, train/eval mode and
    requires_grad flags are restored afterwards. It shares the PEFT model's weights, so a reference costs no copy.
    Usable wherever spa scores sequences with a model (spa.scoring.score_sequences, the judges, validation, the
    trainer's ref_model): spa_kernels.integrations unwraps it with get_base_model()."""

    def __init__(self, model, adapter: str | None = None):
        if adapter is not None and adapter not in model.peft_config:
            raise ValueError(f"no adapter {adapter!r} on the model (has: {sorted(model.peft_config)})")
        super().__init__()
        self.model, self.adapter = model, adapter

    @contextlib.contextmanager
    def active(self):
        m = self.model
        training = m.training
        m.eval()
        try:
            if self.adapter is None:
                with m.disable_adapter():
                    yield
            elif self.adapter == m.active_adapter:
                yield
            else:
                previous = m.active_adapter
                grads = {n: p.requires_grad for n, p in m.named_parameters()}  # set_adapter changes them
                m.set_adapter(self.adapter, inference_mode=True)
                try:
                    yield
                finally:
                    m.set_adapter(previous)
                    for n, p in m.named_parameters():
                        p.requires_grad_(grads[n])
        finally:
            m.train(training)

    def forward(self, *args, **kwargs):
        with self.active():
            return self.model(*args, **kwargs)

    def get_base_model(self):
        return self.model.get_base_model()

    @property
    def config(self):
        return self.model.config

    def extra_repr(self) -> str:
        return "adapters disabled" if self.adapter is None else f"adapter {self.adapter!r}"


def training_policy(cfg, start_path: str, device, gradient_checkpointing: bool = False):
    """The train stage's policy: pi_init's weights (frozen) with a trainable adapter, iteration i-1's when
    start_path is an adapter folder (the run continues it), else a new one from model.peft."""
    from peft import PeftModel, get_peft_model

    base = load_causal_lm(init_model_path(cfg), cfg.model, device, train=True)
    if gradient_checkpointing:  # the frozen embeddings' output must carry grad into checkpointed blocks
        base.enable_input_require_grads()
    if is_adapter(start_path):
        model = PeftModel.from_pretrained(base, start_path, adapter_name=POLICY_ADAPTER, is_trainable=True)
    else:
        model = get_peft_model(base, lora_config(cfg.model.peft), adapter_name=POLICY_ADAPTER)
    model.to(device)
    model.train(True)
    return model


def training_reference(policy, start_path: str, per_step: bool) -> AdapterView:
    """The train stage's reference (the model the policy starts from) as a view of the policy: pi_init = adapters
    disabled; pi_{i-1} = the policy's own adapter before the first step (for the precomputed log-probs) or, when the
    reference is needed at every step (per_step: de-coupled noise detection), start_path's adapter loaded again as
    the frozen "ref" adapter."""
    if not is_adapter(start_path):
        return AdapterView(policy, None)
    if not per_step:
        return AdapterView(policy, POLICY_ADAPTER)
    training = policy.training
    policy.load_adapter(start_path, adapter_name=REFERENCE_ADAPTER, is_trainable=False)  # (sets eval mode)
    policy.train(training)
    return AdapterView(policy, REFERENCE_ADAPTER)


def drop_reference_adapter(model) -> None:
    """Removes the frozen "ref" adapter before the policy is saved (the saved model is the trained adapter only)."""
    if is_peft_model(model) and REFERENCE_ADAPTER in model.peft_config:
        model.delete_adapter(REFERENCE_ADAPTER)


def reference_model(cfg, policy, path: str, device):
    """The model at `path` for scoring next to `policy` (the judge's, validation's and eval's references): with a
    PEFT policy, a view of it (pi_init = adapters disabled; an iteration's adapter = loaded onto the policy's base as
    the frozen "ref" adapter) instead of a second copy of the weights; otherwise the model loaded from path."""
    if is_peft_model(policy):
        if os.path.realpath(path) == os.path.realpath(init_model_path(cfg)):
            return AdapterView(policy, None)
        if is_adapter(path):
            if REFERENCE_ADAPTER in policy.peft_config:
                policy.delete_adapter(REFERENCE_ADAPTER)
            policy.load_adapter(path, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
            policy.set_adapter(POLICY_ADAPTER, inference_mode=True)
            return AdapterView(policy, REFERENCE_ADAPTER)
    return load_model(path, cfg, device)


def merge_adapter(cfg, adapter_path: str, out: str, device=None) -> str:
    """pi_init + the adapter at adapter_path merged into one full model (peft's merge_and_unload), saved with the
    tokenizer to `out` (written atomically); returns out. The merge is done and saved in float32 whatever
    model.dtype is: adding a small LoRA update to bf16 / fp16 weights would round most of it away (cast when
    loading, e.g. torch_dtype=torch.bfloat16, knowing that this rounds too)."""
    import dataclasses

    if not is_adapter(adapter_path):
        raise ValueError(f"{adapter_path} is not a PEFT adapter folder (no {ADAPTER_CONFIG}): nothing to merge")
    device = resolve_device(cfg.model.device) if device is None else device
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype="float32"))
    model = load_model(adapter_path, cfg, device)
    merged = model.merge_and_unload()
    tmp = atomic_dir(out)
    merged.save_pretrained(tmp)
    load_tokenizer(adapter_path, cfg.model.trust_remote_code).save_pretrained(tmp)
    commit_dir(tmp, out)
    return out


__all__ = ["resolve_device", "load_tokenizer", "load_causal_lm", "new_model", "init_model_path",
           "judge_reference_path", "load_model", "load_reward_model", "ADAPTER_CONFIG", "POLICY_ADAPTER",
           "REFERENCE_ADAPTER", "AdapterView", "is_adapter", "is_peft_model", "lora_config", "training_policy",
           "training_reference", "drop_reference_adapter", "reference_model", "merge_adapter"]

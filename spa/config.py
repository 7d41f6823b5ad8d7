"""The run configuration: one YAML file <-> typed dataclasses, with `section.key=value` overrides.

    cfg = Config.load("config.yaml", overrides=["train.beta=0.2", "loop.iterations=2"])

Defaults are the SPA paper's settings (Kim et al., ICLR 2025: K=2 samples at temperature 0.7, beta 0.1, lr 5e-7
with cosine decay and 10% warm-up, seed DPO for 3 epochs, 1 epoch per iteration, lam 1/2, 1/4, 1/8, refinement
K=10%, alpha 0.1, 20% warm-up, a window of 50 margins, batch 32) with three exceptions chosen on measurements over
the built-in tasks and seeds (docs/trainer.md, benchmarks/judge_study.py): the judge scores a response by the
model's own per-token log-prob (judge.reference=none, judge.token_average=true; the paper's judge is
judge.reference=init, judge.token_average=false), a quarter of the seed is held out as validation
(data.validation_size), and the run returns the latest iteration that validates no worse than the best beyond the
noise (loop.select, loop.selection_metric, loop.selection_confidence), never stopping early by default
(loop.patience).
Unknown keys, wrong types and out-of-range values raise ConfigError naming the key (and the file).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

__all__ = ["Config", "ConfigError", "ModelConfig", "SFTConfig", "DataConfig", "GenerateConfig", "JudgeConfig",
           "SelectConfig", "RefineConfig", "TrainConfig", "LoopConfig", "EvalConfig"]


class ConfigError(ValueError):
    """A bad configuration: the message names the key (section.key) and, when loaded from a file, the file."""


def _f(default, help: str, **kw):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelConfig:
    name_or_path: str | None = _f(None, "the SFT model pi_init: a hub name or a local save_pretrained folder "
                                        "(with sft.enabled the SFT stage's output replaces it)")
    tokenizer: str | None = _f(None, "tokenizer name or folder (default: name_or_path)")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = _f("float32", "weights' dtype when loaded")
    device: str = _f("auto", "'auto' (cuda when available, else cpu), 'cpu', 'cuda', 'cuda:1', ...")
    attn_implementation: str | None = _f(None, "passed to from_pretrained (e.g. 'sdpa', 'flash_attention_2')")
    trust_remote_code: bool = _f(False, "passed to from_pretrained")
    peft: dict[str, Any] | None = _f(None, "LoRA instead of full fine-tuning in the DPO stages: peft.LoraConfig "
                                           "fields, e.g. {r: 16, lora_alpha: 32, lora_dropout: 0.05, "
                                           "target_modules: [q_proj, k_proj, v_proj, o_proj]} ({}: peft's "
                                           "defaults for the model type; null: full fine-tuning). Every iteration's "
                                           "model is then an adapter on pi_init's weights (iteration i continues "
                                           "iteration i-1's adapter); pi_init and pi_{i-1} are the same weights "
                                           "with the adapter disabled or an earlier adapter loaded, not extra "
                                           "copies; `spa merge` writes a full model. task_type is CAUSAL_LM; "
                                           "lm_head cannot be a target; the sft stage stays full-weight")


@dataclass
class SFTConfig:
    enabled: bool = _f(False, "run the SFT stage first in `spa run` (its model becomes pi_init)")
    data: str | None = _f(None, "demonstrations: JSONL/JSON path or datasets name (prompt + response/completion, "
                                "or messages ending with an assistant turn)")
    split: str = _f("train", "split for a datasets name")
    from_scratch: dict[str, Any] | None = _f(None, "initialise a new model instead of loading model.name_or_path: "
                                                  "config kwargs, e.g. {model_type: llama, hidden_size: 64, ...}")
    epochs: float = _f(1.0, "training epochs")
    max_steps: int = _f(-1, "stop after this many optimizer steps (-1: use epochs)")
    learning_rate: float = _f(2e-5, "peak learning rate")
    lr_scheduler_type: str = _f("cosine", "transformers scheduler name")
    warmup_ratio: float = _f(0.1, "fraction of steps with linear warm-up")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    batch_size: int = _f(32, "sequences per optimizer step (per device x gradient accumulation)")
    max_length: int = _f(1024, "tokens per demonstration (prompt + response); longer ones are truncated at the end")


@dataclass
class DataConfig:
    seed: str | None = _f(None, "gold-labelled seed preferences: JSONL/JSON path or datasets name")
    seed_split: str = _f("train_prefs", "split for a datasets name")
    seed_size: int | float = _f(0.033, "seed pairs taken (seeded shuffle): a fraction (<= 1) of data.seed or a "
                                       "count")
    validation_size: int | float = _f(0.25, "part of the seed held out of training as gold validation (the judge's and "
                                      "each iteration's check, and loop.select): a fraction (< 1) of the seed pairs "
                                      "or a count; 0 turns validation off")
    prompts: str | None = _f(None, "unlabelled prompt pool for the iterations (default: the prompts of data.seed "
                                   "not taken into the seed)")
    prompts_split: str = _f("train_prefs", "split for a datasets name")
    iteration_prompts: list[int | float] = _f([8000, 20000, 30000], "prompts per iteration, disjoint slices of the "
                                                               "shuffled pool: counts, or fractions (<= 1) of it "
                                                               "(the last size repeats for further iterations)")
    iteration_prompt_files: list[str] = _f([], "instead of slicing one pool: one prompt file (JSONL/JSON path or "
                                               "datasets name, split data.prompts_split) per iteration, used whole "
                                               "in file order (duplicates and the seed's prompts removed); needs "
                                               "at least loop.iterations files; excludes data.prompts")
    max_prompt_length: int = _f(512, "prompt tokens (chat template applied) allowed")
    long_prompts: Literal["skip", "truncate"] = _f("skip", "a longer prompt is skipped, or truncated keeping its "
                                                          "last max_prompt_length tokens; counted either way")
    skip_invalid: bool = _f(False, "skip and count malformed rows instead of stopping at the first one")
    chat_template: str | None = _f(None, "jinja chat template overriding the tokenizer's (null: the tokenizer's; "
                                         "'none': plain text prompts)")


@dataclass
class GenerateConfig:
    num_samples: int = _f(2, "responses per prompt (K)")
    temperature: float = _f(0.7, "sampling temperature")
    top_p: float = _f(1.0, "nucleus sampling")
    max_new_tokens: int = _f(300, "response length limit")
    batch_size: int = _f(64, "prompts per generate() call (each with num_samples sequences)")
    shard_size: int = _f(512, "prompts per resumable shard (also the unit of work split between processes)")
    backend: Literal["hf", "vllm"] = _f(
        "hf", "hf: transformers' generate (the default); vllm: vLLM's engine (pip install 'spa[vllm]'; untested, see "
              "docs/trainer.md); used by the generate and eval stages")
    use_cache: bool = _f(True, "hf backend: the KV cache during generation (off: every step recomputes the whole "
                               "sequence; for measurements)")
    compile: bool = _f(False, "hf backend: torch.compile the model's forward for generation (see docs/trainer.md "
                              "for when it pays)")


@dataclass
class JudgeConfig:
    type: Literal["implicit", "contrastive", "reward_model", "llm", "function"] = _f(
        "implicit", "implicit: the model's own implicit reward, beta * log pi_{i-1} with judge.reference none (the "
                    "default), SPA's beta*(log pi_{i-1} - log pi_init) with judge.reference init; contrastive: "
                    "DLMA's self-reward; reward_model: an HF sequence-classification model; llm: LLM-as-judge; "
                    "function: a programmatic scorer (judge.function)")
    beta: float = _f(0.1, "beta of the implicit reward")
    reference: Literal["init", "previous", "none"] = _f(
        "none", "implicit judge's reference: none = no reference (beta * log pi_{i-1}; the default, measured best "
                "over the built-in tasks, see docs/trainer.md), init = pi_init (the SPA paper's judge), previous = "
                "the previous iteration's model pi_{i-2} (pi_init for i = 1)")
    reference_weight: float = _f(1.0, "implicit judge: score = beta * (log pi_{i-1} - reference_weight * log "
                                       "pi_ref); 1 = the paper's ratio, 0 = the model's own log-prob, between = both")
    token_average: bool = _f(True, "implicit judge: log-probs averaged over response tokens instead of summed (the "
                                   "default; the SPA paper sums)")
    length_penalty: float = _f(0.0, "DICE-style length regularisation of every judge: score - length_penalty * "
                                    "response tokens")
    length_regress: bool = _f(False, "every judge: subtract the least-squares fit of score on response tokens "
                                     "(over each shard of prompts) from the scores, removing a linear length bias")
    batch_size: int = _f(32, "sequences per forward pass")
    model: str | None = _f(None, "reward_model / llm judges: the judging model (default for llm: pi_{i-1})")
    positive_prompt: str = _f("{prompt} (giving a helpful response)", "contrastive: the positive prompt p+")
    negative_prompt: str = _f("{prompt} (giving an unhelpful response)", "contrastive: the negative prompt p-")
    llm_template: str = _f(
        "Question: {prompt}\nResponse A: {a}\nResponse B: {b}\nWhich response is better, A or B? Answer:",
        "llm: the pairwise judging prompt (placeholders {prompt}, {a}, {b})")
    llm_choices: list[str] = _f([" A", " B"], "llm: the two answer strings whose log-probs are compared")
    function: str | None = _f(None, "function judge: 'module:function' called as function(prompt, response) -> float "
                                    "(a verifier or rule; with the task's gold oracle, the gold-label control run)")


@dataclass
class SelectConfig:
    strategy: Literal["minmax", "easy", "hard", "random", "centroid"] = _f(
        "minmax", "which pair of the K responses becomes the training pair: minmax (SPA: highest vs lowest "
                  "judge score), REAL's easy (least similar), hard (most similar), random, centroid (2-means)")


@dataclass
class RefineConfig:
    enabled: bool = _f(True, "SPA's self-refinement loss in the iterations")
    dnd: bool = _f(True, "de-coupled noise detection: judge noise from the extrapolated logits")
    lam: list[float] = _f([0.5, 0.25, 0.125], "extrapolation coefficient per iteration (the last one repeats)")
    percentile: float = _f(10.0, "a pair is noisy when its margin is at or below this percentile (K) of the window")
    window: int = _f(50, "recent margins kept for the running percentile")
    alpha: float = _f(0.1, "label-flip weight a of noisy pairs")
    warmup_ratio: float = _f(0.2, "a = 0 during this fraction of an iteration's steps")


@dataclass
class TrainConfig:
    beta: float = _f(0.1, "DPO beta")
    learning_rate: float = _f(5e-7, "peak learning rate")
    lr_scheduler_type: str = _f("cosine", "transformers scheduler name")
    warmup_ratio: float = _f(0.1, "fraction of steps with linear warm-up")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    seed_epochs: float = _f(3.0, "epochs of DPO on the seed (iteration 0)")
    epochs: float = _f(1.0, "epochs per SPA iteration")
    batch_size: int = _f(32, "pairs per optimizer step (per device x devices x gradient accumulation)")
    per_device_batch_size: int | None = _f(None, "pairs per forward pass (default: batch_size, i.e. no "
                                                 "accumulation)")
    max_length: int = _f(1024, "tokens per sequence (prompt + response); longer responses are truncated")
    iteration_loss: Literal["spa", "sigmoid", "dlma"] = _f(
        "spa", "loss in iterations >= 1: spa (with refine.enabled, else plain DPO), sigmoid (DPO), dlma (needs the "
               "contrastive judge's scores)")
    dlma_gamma: float = _f(0.2, "dlma: margin = gamma * clamp(R_chosen - R_rejected, -40, 40)")
    kernel_impl: str = _f("auto", "spa_kernels implementation: auto, torch, cpu, triton, cuda")
    bf16: bool = _f(False, "bf16 mixed precision (transformers)")
    gradient_checkpointing: bool = _f(False, "transformers gradient checkpointing")
    save_steps: int = _f(100, "checkpoint every this many steps (a killed run resumes from the last one)")
    logging_steps: int = _f(10, "log every this many steps")
    report_to: list[str] = _f(["none"], "transformers report_to: none, tensorboard, wandb, ...")
    deepspeed: str | None = _f(None, "DeepSpeed config file (transformers)")
    fsdp: str | None = _f(None, "FSDP options string (transformers), e.g. 'full_shard auto_wrap'")
    trainer_args: dict[str, Any] = _f({}, "any further transformers.TrainingArguments fields")


@dataclass
class LoopConfig:
    iterations: int = _f(3, "SPA iterations after the seed DPO")
    select: Literal["best", "last"] = _f(
        "best", "the model the run returns: best = the latest iteration (0 = DPO on the seed included) whose "
                "loop.selection_metric on the held-out gold validation pairs (data.validation_size) is not worse "
                "than the best iteration's beyond the noise (a paired bootstrap over the pairs, "
                "loop.selection_confidence); last = the last iteration")
    selection_metric: Literal["reward_accuracy", "reward_margin", "dpo_loss", "logp_accuracy",
                              "logp_per_token_accuracy", "chosen_logp_per_token", "logp_margin",
                              "logp_per_token_margin"] = _f(
        "reward_margin", "validation metric for loop.select=best and loop.patience, on the held-out seed pairs "
                         "(default chosen leaving one task out over the built-in tasks, benchmarks/"
                         "selection_study.py): reward_margin (mean implicit-reward margin, chosen minus rejected, "
                         "reference pi_init), reward_accuracy (that reward ranks chosen above rejected; ties 1/2), "
                         "dpo_loss (lower is better), logp_accuracy / logp_per_token_accuracy (the model's own "
                         "log-prob, summed / per token, ranks chosen above rejected), logp_margin / "
                         "logp_per_token_margin (the chosen minus the rejected log-prob, summed / per token), "
                         "chosen_logp_per_token (mean per-token log-likelihood of the chosen responses; DPO lowers "
                         "it as it trains, whatever the quality)")
    selection_confidence: float = _f(
        0.9, "how sure the paired bootstrap over the held-out pairs must be that an iteration validates worse than the "
             "best before loop.select=best passes it over (or loop.patience counts it); in (0.5, 1); 0.5 returns "
             "the best mean")
    patience: int = _f(0, "with loop.select=best: stop after this many iterations in a row that each validate worse "
                          "than the best iteration beyond the noise (loop.selection_confidence); 0 (default): never "
                          "stop early")


@dataclass
class EvalConfig:
    oracle: str | None = _f(None, "gold oracle 'module:function', called as function(prompt, response) -> float")
    prompts: str | None = _f(None, "held-out prompts (JSONL/JSON path or datasets name)")
    prompts_split: str = _f("test_prefs", "split for a datasets name")
    pairs: str | None = _f(None, "held-out gold pairs for the implicit-reward accuracy")
    pairs_split: str = _f("test_prefs", "split for a datasets name")
    max_prompts: int | None = _f(None, "use at most this many held-out prompts / pairs")
    num_samples: int = _f(1, "responses per held-out prompt and model")
    temperature: float = _f(0.7, "sampling temperature for evaluation (0: greedy)")
    max_new_tokens: int | None = _f(None, "default: generate.max_new_tokens")


@dataclass
class Config:
    output_dir: str = _f("runs/spa", "the run directory (see docs/trainer.md for its layout)")
    seed: int = _f(42, "seeds torch, random, numpy, sampling and data order")
    model: ModelConfig = field(default_factory=ModelConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        _validate(self)

    # --- loading ---------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict | None, overrides: list[str] | None = None, source: str | None = None) -> Config:
        data = {} if data is None else data
        where = f" in {source}" if source else ""
        if not isinstance(data, dict):
            raise ConfigError(f"the configuration{where} must be a mapping of sections, got {type(data).__name__}")
        data = json.loads(json.dumps(data))  # a deep copy of plain values
        origins = {}  # section.key -> the --set item that gave it, so an error names the override, not the file
        for item in overrides or []:
            _apply_override(data, item)
            if source:  # with a file, say which errors come from an override rather than from the file
                origins[item.split("=", 1)[0].strip()] = item
        try:
            return _build(cls, data, "", _Where(where, origins))
        except ConfigError:
            raise
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{e}{where}") from None

    @classmethod
    def load(cls, path: str, overrides: list[str] | None = None) -> Config:
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
        return cls.from_dict(data, overrides, source=path)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **overrides: Any) -> Config:
        """A copy with `section.key` (or top-level key) values replaced: cfg.replace(**{"train.beta": 0.2})."""
        return Config.from_dict(self.to_dict(), [f"{k}={json.dumps(v)}" for k, v in overrides.items()])

    def fingerprint(self) -> str:
        """Hash of the settings that determine a run's results (output_dir excluded: a moved run still resumes)."""
        d = Config.from_dict(self.to_dict()).to_dict()  # values coerced as a loaded file's are (8000.0 -> 8000)
        d.pop("output_dir")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def keys() -> list[tuple[str, Any, Any, str]]:
    """(section.key, type annotation, default, help) for every config key, in the order of the YAML file."""
    out = []

    def walk(cls, prefix: str):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}{f.name}.")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out.append((prefix + f.name, tp, default, f.metadata.get("help", "")))

    walk(Config, "")
    return out


def explain(cfg: Config | None = None, width: int = 100) -> str:
    """Every config key with its type, default and meaning (`spa config --explain`); with cfg, also the value it
    has there when that differs from the default."""
    import textwrap

    flat = {}
    if cfg is not None:
        def flatten(d, prefix=""):
            for k, v in d.items():
                if isinstance(v, dict) and prefix + k + "." in sections:
                    flatten(v, prefix + k + ".")
                else:
                    flat[prefix + k] = v
        sections = {k.rsplit(".", 1)[0] + "." for k, *_ in keys() if "." in k}
        flatten(cfg.to_dict())
    lines, section = [], None
    for key, tp, default, help in keys():
        sec = key.split(".")[0] if "." in key else ""
        if sec != section:
            section = sec
            lines.append(f"\n{sec}:" if sec else "(top level)")
        shown = json.dumps(default)
        here = f"; here: {json.dumps(flat[key])}" if key in flat and flat[key] != default else ""
        lines.append(f"  {key}  ({_type_name(tp)}; default {shown}{here})")
        lines += textwrap.wrap(help, width=width, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines).lstrip("\n") + "\n"


def diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """'key: old -> new' for every (dotted) key whose value differs between two config dicts."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return out


# --- parsing helpers ------------------------------------------------------------------------------------------

def _apply_override(data: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({e})") from None
    parts = key.split(".")
    node = data
    for i, p in enumerate(parts[:-1]):
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {item!r}: {'.'.join(parts[:i + 1])} is not a section")
        node = nxt
    node[parts[-1]] = value


def _suggest(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class _Where:
    """Where a key's value came from, for error messages: the file (" in run.yaml"), or the --set item that gave
    the key or one of its sections (" in --set train.beta=x")."""

    def __init__(self, source: str, origins: dict[str, str]):
        self.source, self.origins = source, origins

    def __call__(self, key: str) -> str:
        parts = key.split(".")
        for n in range(len(parts), 0, -1):
            item = self.origins.get(".".join(parts[:n]))
            if item is not None:
                return f" in --set {item}"
        return self.source


def _build(cls, data: dict, prefix: str, where: _Where):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'the configuration'} must be a mapping"
                          f"{where(prefix.rstrip('.'))}, got {type(data).__name__}: {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise ConfigError(f"unknown key {prefix}{key}{where(f'{prefix}{key}')}{_suggest(str(key), fields)}; "
                              f"valid keys: {', '.join(fields)}")
    kwargs = {}
    for key, value in data.items():
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value if value is not None else {}, f"{prefix}{key}.", where)
        else:
            kwargs[key] = _coerce(value, tp, f"{prefix}{key}", where(f"{prefix}{key}"))
    try:
        return cls(**kwargs)
    except ConfigError as e:  # the checks' messages start with the key they are about
        raise ConfigError(f"{e}{where(str(e).split(' ', 1)[0])}") from None


def _coerce(value, tp, key: str, where: str):
    """value checked (and converted where lossless: int -> float, '5e-7' -> float) against the annotation tp."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    bad = lambda: ConfigError(f"{key} must be {_type_name(tp)}{where}, got {type(value).__name__}: {value!r}")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key, where)
            except ConfigError as e:
                errors.append(e)
        finite = [e for e in errors if "must be a finite number" in str(e)]  # the right type, a wrong value
        raise finite[0] if finite else bad()
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key} must be one of {list(args)}{where}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise bad()
        return [_coerce(v, args[0], f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad()
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad()
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 5e-7 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise bad()
        if not math.isfinite(number):  # inf / nan would reach the model as NaN weights
            raise ConfigError(f"{key} must be a finite number{where}, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad()
    raise bad()


def _type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        real = [a for a in args if a is not type(None)]
        if set(real) == {int, float}:  # counts or fractions
            return "a number" + (" or null" if type(None) in args else "")
        names = [_type_name(a) for a in real]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin is list:
        one = _type_name(args[0])
        return "a list of " + {"a number": "numbers", "a string": "strings", "an integer": "integers"}.get(one, one)
    if origin is dict:
        return "a mapping"
    if origin is Literal:
        return f"one of {list(args)}"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string", Any: "any value"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _check(cond: bool, key: str, msg: str):
    if not cond:
        raise ConfigError(f"{key} {msg}")


def _is_function_spec(spec) -> bool:
    return isinstance(spec, str) and spec.count(":") == 1 and all(spec.split(":"))


def _validate_peft(section: dict[str, Any]) -> None:
    """model.peft: keys are peft.LoraConfig fields with sensible values, and LoraConfig accepts them (peft is
    imported only when the section is set)."""
    key = "model.peft"
    for name in section:
        _check(isinstance(name, str), key, f"keys must be LoraConfig field names, got {name!r}")
    r, alpha, dropout = section.get("r", 8), section.get("lora_alpha", 8), section.get("lora_dropout", 0.0)
    _check(isinstance(r, int) and not isinstance(r, bool) and r >= 1, f"{key}.r", f"must be an integer >= 1, got {r!r}")
    _check(isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and alpha > 0, f"{key}.lora_alpha",
           f"must be a number > 0, got {alpha!r}")
    _check(isinstance(dropout, (int, float)) and not isinstance(dropout, bool) and 0 <= dropout < 1,
           f"{key}.lora_dropout", f"must be a number in [0, 1), got {dropout!r}")
    for name in ("target_modules", "modules_to_save"):
        value = section.get(name)
        if value is None:
            continue
        names = [value] if isinstance(value, str) else value
        _check(isinstance(names, list) and bool(names) and all(isinstance(m, str) and m for m in names),
               f"{key}.{name}", f"must be a module name or a non-empty list of module names, got {value!r}")
        _check("lm_head" not in names, f"{key}.{name}", "must not name lm_head: the fused log-prob head reads "
               "lm_head.weight directly and would never train an adapter or copy there")
    task = section.get("task_type", "CAUSAL_LM")
    _check(str(task) == "CAUSAL_LM", f"{key}.task_type",
           f"must be CAUSAL_LM (the loop trains causal LMs), got {task!r}")
    try:
        from peft import LoraConfig
    except ImportError:
        raise ConfigError(f"{key} needs the peft package: pip install peft") from None
    fields = {f.name for f in dataclasses.fields(LoraConfig)}
    for name in section:
        _check(name in fields, f"{key}.{name}", f"is not a peft.LoraConfig field{_suggest(name, fields)}")
    try:
        LoraConfig(**{**section, "task_type": "CAUSAL_LM"})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{key}: peft.LoraConfig refuses these settings: {e}") from None


def _validate(c: Config) -> None:
    _check(bool(c.output_dir), "output_dir", "must not be empty")
    if c.model.peft is not None:
        _validate_peft(c.model.peft)
        _check(c.generate.backend == "hf", "generate.backend",
               "must be hf with model.peft: the saved models are LoRA adapters, which the vllm backend does not load "
               "(merge one with `spa merge` to sample from it elsewhere)")
        _check(not (c.train.deepspeed or c.train.fsdp), "train.deepspeed" if c.train.deepspeed else "train.fsdp",
               "is not supported with model.peft yet (the reference adapters and the adapter-only save are tested "
               "with data parallelism only); LoRA on a 7B model fits one GPU")
    _check(c.sft.epochs > 0 or c.sft.max_steps > 0, "sft.epochs", "must be > 0 (or set sft.max_steps)")
    _check(c.sft.batch_size >= 1, "sft.batch_size", "must be >= 1")
    _check(c.sft.learning_rate > 0, "sft.learning_rate", "must be > 0")
    _check(c.data.seed_size > 0, "data.seed_size", "must be > 0 (a fraction <= 1 or a count)")
    _check(c.data.seed_size <= 1 or float(c.data.seed_size).is_integer(), "data.seed_size",
           f"must be a fraction <= 1 or a whole count, got {c.data.seed_size}")
    _check(len(c.data.iteration_prompts) >= 1 and all(x > 0 for x in c.data.iteration_prompts),
           "data.iteration_prompts", "must be a non-empty list of positive counts or fractions")
    _check(not (c.data.iteration_prompt_files and c.data.prompts), "data.iteration_prompt_files",
           "and data.prompts are alternatives: set one of them")
    _check(not c.data.iteration_prompt_files or len(c.data.iteration_prompt_files) >= c.loop.iterations,
           "data.iteration_prompt_files", f"has {len(c.data.iteration_prompt_files)} file(s) but loop.iterations is "
           f"{c.loop.iterations}: give one prompt file per iteration")
    _check(all(isinstance(f, str) and f for f in c.data.iteration_prompt_files), "data.iteration_prompt_files",
           "must hold non-empty paths")
    _check(c.data.max_prompt_length >= 1, "data.max_prompt_length", "must be >= 1")
    _check(c.data.validation_size >= 0 and (c.data.validation_size < 1 or float(c.data.validation_size).is_integer()),
           "data.validation_size", f"must be 0, a fraction < 1 or a whole count, got {c.data.validation_size}")
    g = c.generate
    _check(g.num_samples >= 2, "generate.num_samples", "must be >= 2 (a pair needs two responses)")
    _check(g.temperature > 0, "generate.temperature", "must be > 0 (sampling)")
    _check(0 < g.top_p <= 1, "generate.top_p", "must be in (0, 1]")
    _check(g.max_new_tokens >= 1, "generate.max_new_tokens", "must be >= 1")
    _check(g.batch_size >= 1, "generate.batch_size", "must be >= 1")
    _check(g.shard_size >= 1, "generate.shard_size", "must be >= 1")
    _check(c.judge.beta > 0, "judge.beta", "must be > 0")
    _check(c.judge.length_penalty >= 0, "judge.length_penalty", "must be >= 0")
    _check(0 <= c.judge.reference_weight <= 1, "judge.reference_weight", "must be in [0, 1]")
    _check(c.judge.batch_size >= 1, "judge.batch_size", "must be >= 1")
    _check(len(c.judge.llm_choices) == 2, "judge.llm_choices", "must hold exactly two answer strings")
    _check(c.judge.type != "reward_model" or bool(c.judge.model), "judge.model",
           "must name the reward model when judge.type is reward_model")
    _check(c.judge.type != "function" or _is_function_spec(c.judge.function), "judge.function",
           f"must look like 'package.module:function' when judge.type is function, got {c.judge.function!r}")
    r = c.refine
    _check(len(r.lam) >= 1 and all(x >= 0 for x in r.lam), "refine.lam", "must be a non-empty list of values >= 0")
    _check(0 <= r.percentile <= 100, "refine.percentile", "must be in [0, 100]")
    _check(r.window >= 1, "refine.window", "must be >= 1")
    _check(0 <= r.alpha < 0.5, "refine.alpha", "must be in [0, 0.5)")
    _check(0 <= r.warmup_ratio <= 1, "refine.warmup_ratio", "must be in [0, 1]")
    t = c.train
    _check(t.beta > 0, "train.beta", "must be > 0")
    _check(t.learning_rate > 0, "train.learning_rate", "must be > 0")
    _check(0 <= t.warmup_ratio < 1, "train.warmup_ratio", "must be in [0, 1)")
    _check(t.seed_epochs > 0 and t.epochs > 0, "train.epochs", "and train.seed_epochs must be > 0")
    _check(t.batch_size >= 1, "train.batch_size", "must be >= 1")
    pd = t.per_device_batch_size
    _check(pd is None or (pd >= 1 and t.batch_size % pd == 0), "train.per_device_batch_size",
           f"must divide train.batch_size ({t.batch_size})")
    _check(t.max_length >= 2, "train.max_length", "must be >= 2")
    _check(t.save_steps >= 1 and t.logging_steps >= 1, "train.save_steps", "and train.logging_steps must be >= 1")
    _check(t.iteration_loss != "dlma" or c.judge.type == "contrastive", "train.iteration_loss",
           "dlma needs judge.type: contrastive (the margin is DLMA's self-reward)")
    _check(c.loop.iterations >= 0, "loop.iterations", "must be >= 0")
    _check(c.loop.patience >= 0, "loop.patience", "must be >= 0 (0: never stop early)")
    _check(0.5 <= c.loop.selection_confidence < 1, "loop.selection_confidence",
           f"must be in [0.5, 1), got {c.loop.selection_confidence}")
    e = c.eval
    _check(e.oracle is None or _is_function_spec(e.oracle), "eval.oracle",
           f"must look like 'package.module:function', got {e.oracle!r}")
    _check(e.num_samples >= 1, "eval.num_samples", "must be >= 1")
    _check(e.temperature >= 0, "eval.temperature", "must be >= 0")

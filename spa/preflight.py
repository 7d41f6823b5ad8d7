"""Checks made before a run or a stage starts, so that a setting which would fail only after hours of compute (a bad
oracle import, kernel implementation, TrainingArguments field, scheduler name or data path) fails at once.

Config() already checks types and ranges without importing anything; `preflight(cfg)` adds the checks that need
imports or the file system, and raises ConfigError with the usual one-line message naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import os

from .config import Config, ConfigError


def _suggest(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _local_looking(source: str) -> bool:
    """A data source that can only be a local path (datasets hub names are 'owner/name' or 'name')."""
    return source.endswith((".jsonl", ".json")) or source.startswith(("/", "./", "../", "~")) or os.path.exists(source)


def _misspelt_file(source: str) -> str | None:
    """Why `source`, which is not there, looks like a data file name with a misspelt extension rather than a hub
    dataset name ('prefs.jsnol'; hub names are 'owner/name', or a bare name without a file extension), else None."""
    base, ext = os.path.splitext(os.path.basename(source))
    if not ext or os.path.exists(source) or "/" in source:
        return None
    folder = os.path.dirname(source) or "."
    try:
        files = [f for f in os.listdir(folder) if f.endswith((".jsonl", ".json"))]
    except OSError:
        files = []
    close = difflib.get_close_matches(os.path.basename(source), files, n=1, cutoff=0.6)
    hint = f"did you mean {os.path.join(os.path.dirname(source), close[0])!r}? " if close else ""
    if ext.lower() in (".jsonl", ".json") or close or ext.lower().startswith(".j"):
        return (f"{source} does not exist and is not a hub dataset name ('owner/name'); {hint}data files are .jsonl "
                "(one JSON object per line) or .json (a list of objects)")
    return None


def check_data_sources(cfg: Config, stages: list[str] | None = None) -> None:
    """Every configured data file exists; the data a planned stage needs is configured."""
    train_or_generate = stages is None or any(s.endswith(("/train", "/generate")) for s in stages)
    needs_sft = (stages is None and cfg.sft.enabled) or (stages is not None and "sft" in stages)
    if train_or_generate and not cfg.data.seed:
        raise ConfigError("data.seed is not set: the gold-labelled seed preferences are required (seed DPO, and the "
                          "iterations' prompts)")
    if needs_sft and not cfg.sft.data:
        raise ConfigError("sft.data is not set: the SFT stage needs demonstrations")
    sources = {"data.seed": cfg.data.seed, "data.prompts": cfg.data.prompts, "eval.prompts": cfg.eval.prompts,
               "eval.pairs": cfg.eval.pairs, "sft.data": cfg.sft.data if cfg.sft.enabled or needs_sft else None}
    sources = list(sources.items()) + [(f"data.iteration_prompt_files[{i}]", f)
                                       for i, f in enumerate(cfg.data.iteration_prompt_files)]
    for key, source in sources:
        why = source and _misspelt_file(source)
        if why:
            raise ConfigError(f"{key}: {why}")
        if source and _local_looking(source):  # read as given, like the loaders do (no ~ expansion)
            if not os.path.exists(source):
                raise ConfigError(f"{key}: {source} does not exist")
            if source.endswith((".jsonl", ".json")) and not os.path.isfile(source):
                raise ConfigError(f"{key}: {source} is not a file")


def _planned(stages: list[str] | None, test) -> bool:
    return stages is None or any(test(s) for s in stages)


def check_data_rows(cfg: Config, stages: list[str] | None = None) -> None:
    """Every row of the data the planned stages read parses (the loaders' own checks: JSON, fields, types), and the
    seed and the iterations' prompt pools can be formed (enough pairs and prompts), so a malformed line fails here,
    naming the key, file, line and field, instead of after the stages before it have run. Hub datasets and dataset
    folders are loaded here too (datasets caches them for the stage)."""
    from . import data as data_mod

    def named(e: Exception, sources: dict[str, str | None]) -> ConfigError:
        """The loader's message (it starts with the file) prefixed with the key that names that file."""
        keys = [k for k, src in sources.items() if src and str(e).startswith(src)]
        key = max(keys, key=lambda k: len(sources[k]), default=None)
        return ConfigError(f"{key}: {e}" if key else str(e))

    checks = []  # (key, source, split, loader)
    if cfg.sft.data and (cfg.sft.enabled or stages is not None) and _planned(stages, lambda s: s == "sft"):
        checks.append(("sft.data", cfg.sft.data, cfg.sft.split, data_mod.load_demos))
    if _planned(stages, lambda s: s.endswith("/eval")):
        evaluation = [("eval.prompts", cfg.eval.prompts, cfg.eval.prompts_split, data_mod.load_prompts),
                      ("eval.pairs", cfg.eval.pairs, cfg.eval.pairs_split, data_mod.load_pairs)]
        checks += [check for check in evaluation if check[1]]
    for key, source, split, loader in checks:
        try:
            loader(source, split, cfg.data.skip_invalid)
        except data_mod.DataError as e:
            raise named(e, {key: source}) from None
    # the iterations' data, read once, exactly as the stages read it (the seed, then the pool or the prompt files)
    if cfg.data.seed and _planned(stages, lambda s: s.startswith("iter_") and not s.endswith("/eval")):
        sources = {"data.seed": cfg.data.seed, "data.prompts": cfg.data.prompts,
                   **{f"data.iteration_prompt_files[{i}]": f for i, f in enumerate(cfg.data.iteration_prompt_files)}}
        try:
            data_mod.seed_and_pools(cfg)
        except data_mod.DataError as e:
            raise named(e, sources) from None


def check_model(cfg: Config, stages: list[str] | None = None):
    """pi_init (or the SFT stage's start) is configured, local paths exist, model.device exists here; returns the
    device."""
    m = cfg.model
    if cfg.sft.enabled or (stages is not None and "sft" in stages):
        if not (m.tokenizer or m.name_or_path):
            raise ConfigError("model.tokenizer (or model.name_or_path) is needed for the SFT stage")
        if cfg.sft.from_scratch is None and not m.name_or_path:
            raise ConfigError("model.name_or_path is needed for the SFT stage (or sft.from_scratch)")
    elif not m.name_or_path:
        raise ConfigError("model.name_or_path is not set (and sft.enabled is false): pi_init is needed")
    for key, path in (("model.name_or_path", m.name_or_path), ("model.tokenizer", m.tokenizer)):
        if path and path.startswith(("/", "./", "../", "~")) and not os.path.exists(path):
            raise ConfigError(f"{key}: {path} does not exist")
    import torch

    try:
        device = torch.device("cuda" if m.device == "auto" and torch.cuda.is_available() else
                              "cpu" if m.device == "auto" else m.device)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"model.device {m.device!r} is not a device ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"model.device is {m.device!r} but no CUDA device is visible to torch")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"model.device is {m.device!r} but torch sees {torch.cuda.device_count()} CUDA device(s)")
    if m.dtype == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("model.dtype is bfloat16 but this GPU does not support it")
    return device


def check_kernel_impl(cfg: Config, device) -> None:
    """train.kernel_impl (and SPA_KERNELS_IMPL, which replaces auto) names an implementation that runs here, on the
    model's device."""
    from spa_kernels import _dispatch

    impl, key = cfg.train.kernel_impl, "train.kernel_impl"
    if impl == "auto":
        impl = os.environ.get("SPA_KERNELS_IMPL", "auto").strip() or "auto"
        key = "SPA_KERNELS_IMPL (which replaces train.kernel_impl=auto)"
    if impl == "auto":
        return
    usable = sorted(_dispatch.available_impls())
    if impl not in _dispatch.IMPLS:
        raise ConfigError(f"{key} must be 'auto' or one of {list(_dispatch.IMPLS)}, got {impl!r}"
                          f"{_suggest(impl, _dispatch.IMPLS)}; usable here: {', '.join(usable)}")
    reason = _dispatch.impl_unavailable_reason(impl)
    if reason is None:
        dev = device.type
        if impl == "cpu" and dev != "cpu":
            reason = f"the cpu implementation needs CPU tensors, the model is on {device}"
        elif impl == "cuda" and dev != "cuda":
            reason = f"the cuda implementation needs CUDA tensors, the model is on {device}"
        elif impl == "triton" and dev != "cuda" and not _dispatch._triton_interpret():
            reason = f"the triton implementation needs CUDA tensors (or TRITON_INTERPRET=1), the model is on {device}"
    if reason:
        raise ConfigError(f"{key} {impl!r} cannot run here: {reason}; usable here: {', '.join(['auto'] + usable)}")


def check_training_arguments(cfg: Config) -> None:
    """train.trainer_args names TrainingArguments fields; scheduler names exist; report_to names integrations."""
    from transformers import SchedulerType, TrainingArguments

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    for name in cfg.train.trainer_args:
        if name not in fields:
            raise ConfigError(f"train.trainer_args: {name!r} is not a transformers.TrainingArguments field"
                              f"{_suggest(str(name), fields)}")
    schedulers = [s.value for s in SchedulerType]
    for key, value in (("sft.lr_scheduler_type", cfg.sft.lr_scheduler_type),
                       ("train.lr_scheduler_type", cfg.train.lr_scheduler_type)):
        if value not in schedulers:
            raise ConfigError(f"{key} must be a transformers scheduler name{_suggest(value, schedulers)}, got "
                              f"{value!r}; one of: {', '.join(schedulers)}")
    try:
        from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK
    except ImportError:  # moved in some transformers version: TrainingArguments checks it later
        return
    known = ["none", "all", *INTEGRATION_TO_CALLBACK]
    for name in cfg.train.report_to:
        if name not in known:
            raise ConfigError(f"train.report_to: {name!r} is not a transformers integration"
                              f"{_suggest(name, known)}; one of: {', '.join(known)}")


def check_functions(cfg: Config) -> None:
    """eval.oracle and judge.function import and are callable."""
    from .oracle import load_oracle

    for key, spec in (("eval.oracle", cfg.eval.oracle), ("judge.function", cfg.judge.function)):
        if spec:
            try:
                load_oracle(spec, key)
            except ValueError as e:
                raise ConfigError(str(e)) from None


def preflight(cfg: Config, stages: list[str] | None = None) -> None:
    """Every check that needs imports or the file system, before any compute: data files, model paths and device,
    train.kernel_impl, TrainingArguments fields, scheduler and report_to names, the oracle and judge functions, the
    generation backend's library, and every row of the data the planned stages read.
    `stages`: the stage names about to run (None: the whole loop). Raises ConfigError naming the key."""
    check_data_sources(cfg, stages)
    device = check_model(cfg, stages)
    check_kernel_impl(cfg, device)
    check_training_arguments(cfg)
    check_functions(cfg)
    check_generation_backend(cfg, stages)
    check_data_rows(cfg, stages)  # last: it reads all the data


def check_generation_backend(cfg: Config, stages: list[str] | None = None) -> None:
    """generate.backend's library imports (vllm: an optional extra) when a stage that generates will run."""
    generates = stages is None or any(s.endswith(("/generate", "/eval")) for s in stages)
    if not generates:
        return
    from . import distributed as dist
    from .generation import check_backend

    if cfg.generate.backend == "vllm" and dist.is_distributed():
        raise ConfigError("generate.backend vllm runs in one process (its engine sets up its own parallelism): "
                          "start spa without accelerate launch / torchrun, or use generate.backend hf")
    try:
        check_backend(cfg.generate)
    except ImportError as e:
        raise ConfigError(str(e)) from None

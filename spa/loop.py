"""The SPA loop: [sft] -> seed DPO -> for each iteration: generate -> judge -> train -> validate -> eval.

Every stage's output appears atomically when the stage is done, so `run` (and `spa run`) restarts after a crash,
Ctrl-C or SIGKILL at the first stage whose output is missing; inside a stage, finished shards and the last trainer
checkpoint are reused. The config is stored in output_dir/config.yaml on the first run; a rerun with different
settings is refused (ConfigMismatch names the keys). metrics.json collects per-stage wall time, throughput and
the stages' own metrics, and the evaluation of every model.

Under `accelerate launch` (or torchrun) every process runs this loop: the stages split their work between the
processes and the main process alone writes the shared files (spa.distributed); the outputs are those of a single
process.

The run returns a model chosen on held-out gold validation (spa.validation): with loop.select=best (the default) the
latest iteration, DPO on the seed included, whose model validates no worse than the best one beyond the noise of the
held-out pairs; with loop.patience > 0 the loop stops once that many iterations in a row validate worse than the
best beyond the noise. output_dir/selected.json and metrics.json["selected"] say which model and why, with the
uncertainty behind the choice. The selection keys (SELECTION_KEYS) may change on a rerun: the choice is made again.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import yaml

from . import distributed as dist
from .config import Config, ConfigError, diff
from .io import Layout, atomic_write_json, atomic_write_text, eval_name, output_dir_lock, read_json
from .models import resolve_device
from .preflight import preflight
from .report import format_table, results_table, stage_line
from .stages.eval import run_eval
from .stages.generate import run_generate
from .stages.judge import run_judge
from .stages.sft import run_sft
from .stages.train import run_train
from .stages.validate import run_validate
from .validation import Selection, select_iteration

logger = logging.getLogger("spa")


class ConfigMismatch(RuntimeError):
    """The output directory holds a run made with different settings."""


@dataclass
class Stage:
    name: str  # e.g. "iter_1/generate"
    output: str  # exists <=> the stage is done
    fn: Callable[[], str]
    metrics: str | None  # the stage's own metrics file
    iteration: int | None = None  # None for sft stages


def plan(cfg: Config) -> list[Stage]:
    lay = Layout(cfg.output_dir)
    stages = []
    evaluate = bool(cfg.eval.prompts or cfg.eval.pairs)
    if cfg.sft.enabled:
        stages.append(Stage("sft", lay.sft_model, lambda: run_sft(cfg), lay.stage_metrics("sft", "sft")))
    if evaluate and cfg.eval.prompts:
        stages.append(Stage("sft/eval", lay.eval("sft"), lambda: run_eval(cfg, None), None))
    for i in range(cfg.loop.iterations + 1):
        it = f"iter_{i}"
        if i > 0:
            stages.append(Stage(f"{it}/generate", lay.samples(i), lambda i=i: run_generate(cfg, i),
                                lay.stage_metrics(it, "generate"), i))
            stages.append(Stage(f"{it}/judge", lay.pairs(i), lambda i=i: run_judge(cfg, i),
                                lay.stage_metrics(it, "judge"), i))
        stages.append(Stage(f"{it}/train", lay.model(i), lambda i=i: run_train(cfg, i), lay.stage_metrics(it, "train"),
                            i))
        if cfg.data.validation_size:
            stages.append(Stage(f"{it}/validate", lay.validation_pairs(i), lambda i=i: run_validate(cfg, i),
                                lay.validation(i), i))
        if evaluate:
            stages.append(Stage(f"{it}/eval", lay.eval(eval_name(i)), lambda i=i: run_eval(cfg, i), None, i))
    return stages


# Keys added to spa since a run may have been stored, whose default changes what a run does: a stored config that
# lacks them ran with these values (so a resume with the new defaults is refused, naming the key).
LEGACY_VALUES = {("data", "validation_size"): 0.0, ("judge", "reference"): "init", ("judge", "token_average"): False}
# Keys that only choose the model a run returns (and whether it stops early): a rerun may change them.
SELECTION_KEYS = ("loop.select", "loop.selection_metric", "loop.selection_confidence", "loop.patience")


def check_config(cfg: Config) -> None:
    """Stores the config on the first use of output_dir; refuses a different one afterwards."""
    lay = Layout(cfg.output_dir)
    mine = cfg.to_dict()
    mine.pop("output_dir")
    if os.path.exists(lay.config):
        with open(lay.config) as f:
            stored = yaml.safe_load(f) or {}
        for (section, key), value in LEGACY_VALUES.items():
            if isinstance(stored.get(section), dict) and key not in stored[section]:
                stored[section][key] = value
        try:  # a key added to spa since the run was made counts as its default (defaults keep old behaviour)
            stored = Config.from_dict(stored, source=lay.config).to_dict()
        except ConfigError:  # a key since removed or renamed: compare as stored, so the diff names it
            pass
        stored.pop("output_dir", None)
        changes = diff(stored, mine)
        # the choice of the returned model reads the stages' outputs and writes none: it may change on a rerun
        selection = [c for c in changes if c.split(":")[0] in SELECTION_KEYS]
        changes = [c for c in changes if c not in selection]
        old_n, new_n = stored.get("loop", {}).get("iterations"), mine["loop"]["iterations"]
        more = (changes == [f"loop.iterations: {old_n!r} -> {new_n!r}"] and isinstance(old_n, int) and new_n > old_n)
        if more:
            # more iterations: nothing done so far depends on their number (each iteration's prompts are its own
            # slice of the pool, or its own file), so the run goes on from where it ended
            logger.info("%s: extending the run from %d to %d iterations (loop.iterations)", cfg.output_dir, old_n,
                        new_n)
        if selection and (more or not changes):
            logger.info("%s: the returned model is chosen again with %s", cfg.output_dir, "; ".join(selection))
        if more or (selection and not changes):
            atomic_write_text(lay.config, cfg.to_yaml())
            return
        if changes:
            raise ConfigMismatch(
                f"{cfg.output_dir} holds a run made with a different config ({lay.config}); changed: "
                + "; ".join(changes) + ". Rerun with the stored config to resume (a larger loop.iterations, and "
                "nothing else changed, extends the run), or use a new output_dir.")
        return
    os.makedirs(cfg.output_dir, exist_ok=True)
    atomic_write_text(lay.config, cfg.to_yaml())


def _record(cfg: Config, stage: Stage, seconds: float | None) -> None:
    lay = Layout(cfg.output_dir)
    metrics = read_json(lay.metrics) if os.path.exists(lay.metrics) else {"stages": {}, "eval": {}}
    entry = {"seconds": seconds}
    if stage.metrics and os.path.exists(stage.metrics):
        entry.update(read_json(stage.metrics))
    metrics["stages"][stage.name] = entry
    if stage.name.endswith("/eval"):
        metrics["eval"][stage.name.split("/")[0]] = read_json(stage.output)
    atomic_write_json(lay.metrics, metrics)


def run_stage(cfg: Config, stage: Stage) -> bool:
    """Runs one stage unless its output exists; returns whether it ran. Under a multi-process launch every process
    calls it: the main process decides whether the stage is done, every process runs it (the stage splits its
    work), and a failure on any process stops them all (spa.distributed.agree)."""
    lay = Layout(cfg.output_dir)
    if dist.broadcast(os.path.exists(stage.output)):
        if dist.is_main():
            recorded = os.path.exists(lay.metrics) and stage.name in read_json(lay.metrics)["stages"]
            if not recorded:  # done, but the run stopped before recording it
                _record(cfg, stage, None)
        logger.info("%s: done already (%s)", stage.name, stage.output)
        return False
    logger.info("%s: running", stage.name)
    t0 = time.perf_counter()
    dist.agree(stage.fn, stage.name)
    if dist.is_main():
        _record(cfg, stage, time.perf_counter() - t0)
        logger.info(stage_line(stage.name, _stage_numbers(cfg, stage), time.perf_counter() - t0))
    return True


@contextlib.contextmanager
def run_lock(output_dir: str):
    """output_dir's lock (spa.io.output_dir_lock) for the block; under a multi-process launch the main process holds
    it for all of them, and every process fails together when it is taken."""
    if not dist.is_distributed():
        with output_dir_lock(output_dir):
            yield
        return
    with contextlib.ExitStack() as stack:
        dist.agree(lambda: stack.enter_context(output_dir_lock(output_dir)) if dist.is_main() else None,
                   "the output_dir lock")
        yield


def _stage_numbers(cfg: Config, stage: Stage) -> dict:
    """The recorded metrics of a finished stage (an eval stage's: its eval.json)."""
    if stage.name.endswith("/eval"):
        return read_json(stage.output)
    return read_json(Layout(cfg.output_dir).metrics)["stages"].get(stage.name, {})


def run(cfg: Config, until: str | None = None) -> dict:
    """The whole loop (resumable); returns metrics.json's content, whose "selected" entry names the model the run
    returns and why. `until`: stop after the stage of that name.

    Before anything runs: the --until name and preflight (data files, imports, kernel implementation,
    TrainingArguments fields) are checked; then output_dir's lock is held for the whole run (a second process on
    the same output_dir fails at once)."""
    dist.init(cpu=resolve_device(cfg.model.device).type == "cpu")
    stages = plan(cfg)
    check_until(stages, until)
    preflight(cfg)
    with run_lock(cfg.output_dir):
        return _run_locked(cfg, stages, until)


def _run_locked(cfg: Config, stages: list[Stage], until: str | None) -> dict:
    dist.agree(lambda: check_config(cfg) if dist.is_main() else None, "the config check")
    last_of = {s.iteration: s.name for s in stages if s.iteration is not None}  # an iteration's final stage
    selection = None
    for stage in stages:
        run_stage(cfg, stage)
        if stage.iteration is not None and last_of[stage.iteration] == stage.name:
            # the main process's choice, so that every process stops at the same iteration
            selection = dist.broadcast(dist.agree(
                lambda i=stage.iteration: select_iteration(cfg, i) if dist.is_main() else None, "the selection"))
            if selection.rule == "best" and selection.iteration != stage.iteration:
                i = str(stage.iteration)
                logger.warning("iter_%s validates worse than iter_%d beyond the noise (%s %.3f ± %.3f vs %.3f ± %.3f "
                               "on %d held-out gold pairs; P(worse) %.2f >= %s)", i, selection.best,
                               selection.metric, selection.values[i], selection.standard_errors[i],
                               selection.values[str(selection.best)], selection.standard_errors[str(selection.best)],
                               selection.pairs, selection.worse_probability[i], selection.confidence)
            if selection.stopped_early:
                break
        if stage.name == until:
            break
    lay = Layout(cfg.output_dir)
    if not dist.is_main():
        return {}
    if selection is not None and selection_is_current(cfg, selection):
        record_selection(cfg, selection)
    table = results_table(cfg.output_dir, cfg.loop.iterations)
    if table:
        logger.debug("results\n%s", format_table(table))
    return read_json(lay.metrics) if os.path.exists(lay.metrics) else {}


def selection_is_current(cfg: Config, selection: Selection) -> bool:
    """False when a later iteration than the selection considered is already done (a rerun with --until that
    stopped early must not replace the choice made over more iterations)."""
    lay = Layout(cfg.output_dir)
    considered = max([int(i) for i in selection.values] or [selection.iteration])
    return not any(os.path.exists(lay.model(i)) for i in range(considered + 1, cfg.loop.iterations + 1))


def record_selection(cfg: Config, selection: Selection) -> None:
    """selected.json and metrics.json["selected"]: the model the run returns and the reason, in one line."""
    lay = Layout(cfg.output_dir)
    atomic_write_json(lay.selected, selection.to_dict())
    metrics = read_json(lay.metrics) if os.path.exists(lay.metrics) else {"stages": {}, "eval": {}}
    metrics["selected"] = selection.to_dict()
    atomic_write_json(lay.metrics, metrics)
    logger.info("selected: %s", selection.reason)


def check_until(stages: list[Stage], until: str | None) -> None:
    """ConfigError unless `until` is None or the name of a stage in the plan."""
    names = [s.name for s in stages]
    if until is not None and until not in names:
        close = difflib.get_close_matches(until, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"--until {until!r} is not a stage of this config's plan{hint}; stages: {', '.join(names)}")


def _stage_command(name: str) -> str:
    """The single-stage command that runs stage `name` (e.g. iter_0/train -> spa train CONFIG --iteration 0)."""
    if name == "sft":
        return "spa sft CONFIG"
    if name == "sft/eval":
        return "spa eval CONFIG --sft"
    it, kind = name.split("/")
    return f"spa {kind} CONFIG --iteration {it.split('_')[1]}"


def prerequisites(cfg: Config, name: str) -> list[str]:
    """The stages whose outputs stage `name` reads (a stage run alone needs them done first)."""
    needs = ["sft"] if cfg.sft.enabled and name != "sft" else []
    if name in ("sft", "sft/eval"):
        return needs
    it, kind = name.split("/")
    i = int(it.split("_")[1])
    if kind == "generate":
        needs.append(f"iter_{i - 1}/train")
    elif kind == "judge":
        needs += [f"iter_{i}/generate", f"iter_{i - 1}/train"]
        if cfg.judge.type == "implicit" and cfg.judge.reference == "previous" and i >= 2:
            needs.append(f"iter_{i - 2}/train")
    elif kind == "train" and i > 0:
        needs += [f"iter_{i}/judge", f"iter_{i - 1}/train"]
    elif kind in ("validate", "eval"):
        needs.append(f"iter_{i}/train")
    return needs


def check_prerequisites(cfg: Config, stage: Stage) -> None:
    """A one-line error naming the first earlier stage whose output `stage` needs and does not find (nothing to check
    when the stage itself is done)."""
    if os.path.exists(stage.output):
        return
    for need in prerequisites(cfg, stage.name):
        dep = stage_by_name(cfg, need)
        if not os.path.exists(dep.output):
            raise ConfigError(f"{stage.name} needs the output of {need} ({dep.output}), which is not there yet: run "
                              f"`{_stage_command(need)}` first, or `spa run CONFIG --until {stage.name}` for every "
                              "stage up to this one")


def stage_by_name(cfg: Config, name: str) -> Stage:
    for s in plan(cfg):
        if s.name == name:
            return s
    raise ConfigError(f"no stage {name!r} in this config's plan; stages: {', '.join(s.name for s in plan(cfg))}")

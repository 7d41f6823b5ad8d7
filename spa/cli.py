"""The `spa` command.

    spa demo [--quick] [--task NAME|all] [--seeds 0 1 2]     a built-in offline task, whole loop, results table
    spa run CONFIG.yaml [--set section.key=value ...]        the SPA loop; rerun to resume after an interruption
    spa sft CONFIG.yaml                                      single stages, same config keys
    spa generate | judge | train | validate CONFIG.yaml --iteration I
    spa eval CONFIG.yaml (--iteration I | --sft)
    spa config [CONFIG.yaml] [--explain]                     print the resolved config (defaults + file + --set);
                                                             --explain: every key's type, default and meaning
    spa merge RUN_DIR --out DIR [--iteration I]              a LoRA run's adapter (model.peft) merged into pi_init:
                                                             one full model folder (default: the returned model;
                                                             --overwrite replaces what DIR holds)
    spa --version

Multi-process: `accelerate launch --num_processes N -m spa.cli run CONFIG.yaml` (spa.distributed).

Only argument parsing happens before a command runs: torch and transformers are imported by the commands that
need them, so `spa --help` and `spa config` answer at once.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys

from . import __version__
from .config import Config, ConfigError
from .data import DataError
from .tasks import TASK_NAMES

THREADS_ENV = "SPA_NUM_THREADS"
logger = logging.getLogger("spa")


def _cgroup_cpu_limit(root: str = "/sys/fs/cgroup") -> float | None:
    """The CPU quota of this process's cgroup in CPUs (docker --cpus, Kubernetes limits), or None when unlimited."""
    try:
        with open(os.path.join(root, "cpu.max")) as f:  # cgroup v2: "<quota> <period>" or "max <period>"
            quota, period = f.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    for sub in ("cpu", "cpu,cpuacct"):  # cgroup v1
        try:
            with open(os.path.join(root, sub, "cpu.cfs_quota_us")) as f:
                quota = int(f.read())
            with open(os.path.join(root, sub, "cpu.cfs_period_us")) as f:
                period = int(f.read())
            return None if quota <= 0 else quota / period
        except (OSError, ValueError):
            continue
    return None


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask (taskset, cpusets), capped by its cgroup's CPU quota."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    limit = _cgroup_cpu_limit()
    return max(1, min(n, math.ceil(limit))) if limit else n


def set_threads() -> int:
    """torch's intra-op threads: SPA_NUM_THREADS if set, else what OMP_NUM_THREADS says if set, else torch's default
    capped by available_cpus() (torch counts the machine's cores, not a container's CPU quota); one inter-op
    thread. The count depends only on the machine and the environment, never on its current load, so a rerun gets
    the same numbers; results differ between thread counts, so pin one to compare runs across machines."""
    import torch

    pinned = os.environ.get(THREADS_ENV, "").strip()
    if pinned:
        if not pinned.isdigit() or int(pinned) < 1:
            raise ConfigError(f"{THREADS_ENV} must be a positive integer, got {pinned!r}")
        torch.set_num_threads(int(pinned))
    elif not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(min(torch.get_num_threads(), available_cpus()))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # the inter-op pool has already started (spa used as a library): leave it
        pass
    n = torch.get_num_threads()
    load, cpus = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0, available_cpus()
    logger.info("%d CPU thread(s) (%s)", n, f"{THREADS_ENV}" if pinned else "OMP_NUM_THREADS"
                if os.environ.get("OMP_NUM_THREADS") else f"default: {cpus} CPUs available; {THREADS_ENV} pins it")
    if n > 1 and not pinned and load >= cpus:
        logger.warning("the machine is busy (load %.1f on %d CPUs): %d threads per process then wait on each other; "
                       "%s=1 is usually much faster on a busy machine (results depend on the thread count)",
                       load, cpus, n, THREADS_ENV)
    return n


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spa", description="Self-annotated preference alignment (SPA).")
    p.add_argument("--version", action="version", version=f"spa {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(name, help, config_required=True):
        sp = sub.add_parser(name, help=help)
        sp.add_argument("config", nargs=None if config_required else "?", help="YAML config file")
        sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value (repeatable), e.g. --set train.beta=0.2")
        return sp

    sp = with_config("run", "the whole loop: [sft] -> seed DPO -> iterations (generate, judge, train, validate, "
                            "eval); returns the best iteration on the held-out seed pairs")
    sp.add_argument("--until", metavar="STAGE", help="stop after this stage, e.g. iter_1/judge")
    with_config("sft", "supervised fine-tuning (sft.data) into output_dir/sft/model")
    for name, help in (("generate", "K samples per prompt from the previous iteration's model"),
                       ("judge", "self-judgment: pairs from the iteration's samples"),
                       ("train", "DPO (iteration 0: on the seed) / SPA training of an iteration"),
                       ("validate", "the iteration's model on the held-out gold seed pairs")):
        sp = with_config(name, help)
        sp.add_argument("--iteration", type=int, required=True, help="0 = seed DPO (train only), 1.. = SPA")
    sp = with_config("eval", "oracle win rate vs SFT, score, length, implicit-reward accuracy")
    g = sp.add_mutually_exclusive_group(required=True)
    g.add_argument("--iteration", type=int)
    g.add_argument("--sft", action="store_true", help="evaluate pi_init (the baseline)")
    sp = with_config("config", "print the resolved config", config_required=False)
    sp.add_argument("--explain", action="store_true",
                    help="list every key (section.key) with its type, default and meaning")
    sp = sub.add_parser("merge", help="a model.peft run's adapter merged into pi_init's weights (peft's "
                                      "merge_and_unload), saved as one full model folder with the tokenizer")
    sp.add_argument("run_dir", help="the run's output_dir (holds config.yaml)")
    sp.add_argument("--iteration", type=int, help="which iteration's adapter (default: the model the run returns, "
                                                  "selected.json)")
    sp.add_argument("--out", required=True, help="folder to write the merged model to (must not exist, or be "
                                                 "empty, unless --overwrite)")
    sp.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    sp = sub.add_parser("demo", help="the built-in offline task end to end (3 seeds; --quick: 1 seed, shorter)")
    sp.add_argument("--quick", action="store_true", help="one seed, two SPA iterations (a few minutes on a CPU)")
    sp.add_argument("--seeds", type=int, nargs="+", help="seeds to run (default: 0 1 2, or 0 with --quick)")
    sp.add_argument("--dir", help="demo folder (default ~/.cache/spa/demo or $SPA_CACHE/demo)")
    sp.add_argument("--task", default="reverse", choices=[*TASK_NAMES, "all"],
                    help="built-in task (default reverse; all: each in turn)")
    sp.add_argument("--no-paper-judge", dest="paper_judge", action="store_false",
                    help="skip the side-by-side runs with the SPA paper's judge")
    sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a value of the demo config")
    return p


def merge_run(run_dir: str, iteration: int | None, out: str, overwrite: bool = False) -> str:
    """`spa merge`: iteration's adapter of the run in run_dir (default: the selected one) merged into pi_init and
    saved to out; returns out. An out folder that holds anything is refused unless overwrite."""
    import json

    from .io import Layout, read_json
    from .models import is_adapter, merge_adapter

    if os.path.exists(out) and not overwrite and (not os.path.isdir(out) or os.listdir(out)):
        raise ConfigError(f"--out {out} exists and is not empty: choose another folder, or pass --overwrite to "
                          "replace it")
    lay = Layout(run_dir)
    if not os.path.exists(lay.config):
        raise ConfigError(f"{run_dir} is not a spa run directory: {lay.config} does not exist")
    cfg = Config.load(lay.config, [f"output_dir={json.dumps(run_dir)}"])
    if iteration is None:
        if not os.path.exists(lay.selected):
            raise ConfigError(f"{lay.selected} does not exist (the run has not selected a model yet): pass --iteration")
        iteration = read_json(lay.selected)["iteration"]
    path = lay.model(iteration)
    if not os.path.isdir(path):
        raise ConfigError(f"{path} does not exist: iteration {iteration} of this run has not been trained")
    if not is_adapter(path):
        raise ConfigError(f"{path} is a full model already (the run has no model.peft): nothing to merge")
    logger.info("merging %s into %s", path, out)
    return merge_adapter(cfg, path, out)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s spa %(levelname)s %(message)s", datefmt="%H:%M:%S")
    if args.command == "config":  # no torch needed
        try:
            cfg = Config.load(args.config, args.overrides) if args.config else Config.from_dict({}, args.overrides)
        except ConfigError as e:
            print(f"spa: error: {e}", file=sys.stderr)
            return 2
        if args.explain:
            from .config import explain

            print(explain(cfg if (args.config or args.overrides) else None), end="")
        else:
            print(cfg.to_yaml(), end="")
        return 0
    if args.command not in ("demo", "merge"):  # a config error answers before the heavy imports
        try:
            cfg = Config.load(args.config, args.overrides) if args.config else Config.from_dict({}, args.overrides)
        except ConfigError as e:
            print(f"spa: error: {e}", file=sys.stderr)
            return 2
    from . import distributed as dist
    from . import loop  # heavy imports (torch, transformers) after argument parsing
    from .io import OutputDirLocked
    from .preflight import preflight
    from .report import quiet_transformers
    from .trainer import NonFiniteError

    quiet_transformers()
    try:
        set_threads()
        if dist.is_distributed() and int(os.environ.get("RANK", "0")) != 0:
            # one process reports (the others' errors still reach stderr)
            logging.getLogger("spa").setLevel(logging.WARNING)
        if args.command == "demo":
            from .tasks.demo import run_demo

            run_demo(quick=args.quick, seeds=args.seeds, folder=args.dir, overrides=args.overrides, task=args.task,
                     paper_judge=args.paper_judge)
            return 0
        if args.command == "merge":
            if dist.is_distributed():
                raise ConfigError("spa merge runs in one process: start it without accelerate launch / torchrun")
            print(merge_run(args.run_dir, args.iteration, args.out, args.overwrite))
            return 0
        if args.command == "run":
            from .plots import plot_run
            from .report import run_summary

            metrics = loop.run(cfg, until=args.until)
            main_process = dist.is_main()
            dist.shutdown()
            if not main_process:
                return 0
            print("\n" + run_summary(cfg.output_dir, cfg.loop.iterations, metrics,
                                     plot_run(cfg.output_dir, cfg.loop.iterations)))
            return 0
        if args.command == "sft":
            name = "sft"
        elif args.command == "eval":
            name = "sft/eval" if args.sft else f"iter_{args.iteration}/eval"
        else:
            name = f"iter_{args.iteration}/{args.command}"
        stage = loop.stage_by_name(cfg, name)
        from .models import resolve_device

        dist.init(cpu=resolve_device(cfg.model.device).type == "cpu")
        preflight(cfg, [name])
        with loop.run_lock(cfg.output_dir):
            dist.agree(lambda: loop.check_config(cfg) if dist.is_main() else None, "the config check")
            dist.agree(lambda: loop.check_prerequisites(cfg, stage) if dist.is_main() else None, "the inputs check")
            loop.run_stage(cfg, stage)
        dist.shutdown()
        return 0
    except (ConfigError, DataError, loop.ConfigMismatch, OutputDirLocked) as e:
        print(f"spa: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:  # the stage stopped; nothing non-finite was saved
        print(f"spa: error: {e}", file=sys.stderr)
        return 1
    except dist.RankFailed as e:  # another process failed and reported it; its own traceback says why
        print(f"spa: error (process {dist.rank()}): {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # finished stages and shards are kept (atomic writes)
        print("spa: interrupted; rerun the same command to continue where it stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

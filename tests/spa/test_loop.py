"""The whole loop on the tiny task: end to end, single stages from the CLI, refusal of a changed config, and
resume after SIGKILL in the middle of every kind of stage giving the same pairs and metrics as an uninterrupted run.
"""

import os
import signal
import subprocess
import sys

import pytest

import spa
from spa import Config, ConfigMismatch
from spa.cli import main
from spa.io import CRASH_ENV, Layout, read_json, read_jsonl

from .conftest import tiny_settings

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Measured, not results: they differ between an interrupted and an uninterrupted run.
TIMING = ("seconds", "tokens_per_s", "_computed", "train_runtime", "samples_per_second", "steps_per_second", "model")


def _results(output_dir: str) -> dict:
    """Everything a run produced that must not depend on interruptions: pairs, samples, evaluations and the stages'
    metrics without timings."""
    lay = Layout(output_dir)
    out = {"samples": read_jsonl(lay.samples(1)), "pairs": read_jsonl(lay.pairs(1))}
    metrics = read_json(lay.metrics)
    for name, entry in metrics["stages"].items():
        out[name] = {k: v for k, v in entry.items() if not any(t in k for t in TIMING)}
    for name, entry in metrics["eval"].items():
        out[f"eval {name}"] = {k: v for k, v in entry.items() if k != "model"}
    return out


@pytest.fixture(scope="module")
def uninterrupted(task, tmp_path_factory):
    cfg = Config.from_dict(tiny_settings(task, str(tmp_path_factory.mktemp("loop") / "run")))
    metrics = spa.run(cfg)
    return cfg, metrics


def test_loop_end_to_end(uninterrupted, capsys):
    cfg, metrics = uninterrupted
    lay = Layout(cfg.output_dir)
    names = ["sft", "sft/eval", "iter_0/train", "iter_0/eval", "iter_1/generate", "iter_1/judge", "iter_1/train",
             "iter_1/eval"]
    assert list(metrics["stages"]) == names
    assert all(metrics["stages"][n]["seconds"] > 0 for n in names)  # per-stage time
    assert metrics["stages"]["iter_1/generate"]["generate/tokens_per_s"] > 0  # throughput
    assert set(metrics["eval"]) == {"sft", "iter_0", "iter_1"}
    assert 0 <= metrics["eval"]["iter_1"]["eval/win_rate_vs_sft"] <= 1
    assert Config.load(lay.config) == cfg  # the run's config is stored with it
    assert not os.path.exists(lay.path(".partial"))  # work folders are removed once their stage is done
    # a rerun of a finished run redoes nothing
    before = os.stat(lay.pairs(1)).st_mtime_ns
    assert spa.run(cfg)["stages"] == metrics["stages"]
    assert os.stat(lay.pairs(1)).st_mtime_ns == before


def test_single_stages_from_the_cli(uninterrupted, tmp_path):
    cfg, _ = uninterrupted
    lay = Layout(cfg.output_dir)
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    pairs = read_jsonl(lay.pairs(1))
    os.remove(lay.pairs(1))
    assert main(["judge", str(path), "--iteration", "1"]) == 0
    assert read_jsonl(lay.pairs(1)) == pairs  # the same pairs again: the judge is deterministic
    assert main(["eval", str(path), "--sft"]) == 0  # done already: nothing to do
    assert main(["judge", str(path), "--iteration", "5"]) == 2  # no such stage in the plan


def test_changed_config_is_refused(uninterrupted, tmp_path, capsys):
    cfg, _ = uninterrupted
    changed = cfg.replace(**{"train.beta": 0.2, "generate.temperature": 0.9})
    with pytest.raises(ConfigMismatch, match=r"different config.*generate\.temperature: 0\.7 -> 0\.9; "
                                             r"train\.beta: 0\.1 -> 0\.2"):
        spa.run(changed)
    path = tmp_path / "c.yaml"
    path.write_text(changed.to_yaml())
    assert main(["run", str(path)]) == 2
    assert "use a new output_dir" in capsys.readouterr().err


def test_config_stored_by_an_older_spa(uninterrupted, tmp_path):
    """A key added to spa since a run was made counts as its default on resume; a stored key that spa no longer
    knows is named in the refusal."""
    import yaml

    from spa.loop import check_config

    cfg, _ = uninterrupted
    cfg = cfg.replace(output_dir=str(tmp_path / "old"))
    stored = cfg.to_dict()
    del stored["judge"]["reference"]  # as written before judge.reference existed
    os.makedirs(cfg.output_dir)
    with open(Layout(cfg.output_dir).config, "w") as f:
        yaml.safe_dump(stored, f)
    check_config(cfg)  # same defaults: accepted
    with pytest.raises(ConfigMismatch, match=r"judge\.reference: 'init' -> 'none'"):
        check_config(cfg.replace(**{"judge.reference": "none"}))
    stored["judge"]["retired_key"] = 1
    with open(Layout(cfg.output_dir).config, "w") as f:
        yaml.safe_dump(stored, f)
    with pytest.raises(ConfigMismatch, match=r"judge\.retired_key: 1 -> None"):
        check_config(cfg)


def test_resume_after_sigkill_in_every_stage(uninterrupted, task, tmp_path):
    """The run is SIGKILLed in sft (after a checkpoint), the SFT model's eval (after a shard), the seed DPO (after a
    checkpoint), generate and judge (after a shard); each rerun continues, and the end equals the uninterrupted run."""
    cfg, _ = uninterrupted
    killed = Config.from_dict(tiny_settings(task, str(tmp_path / "run")))
    path = tmp_path / "c.yaml"
    path.write_text(killed.to_yaml())
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    lay = Layout(killed.output_dir)
    for crash in ("sft:1", "eval:1", "train:1", "generate:1", "judge:1", None):
        env.pop(CRASH_ENV, None)
        if crash:
            env[CRASH_ENV] = crash
        proc = subprocess.run([sys.executable, "-m", "spa.cli", "run", str(path)], env=env, capture_output=True,
                              text=True, timeout=600)
        expect = -signal.SIGKILL if crash else 0
        assert proc.returncode == expect, f"{crash}: {proc.stderr[-3000:]}"
        if crash == "sft:1":
            assert os.path.isdir(os.path.join(lay.partial("sft", "train"), "checkpoint-2"))
            assert not os.path.exists(lay.sft_model)
    stages = read_json(lay.metrics)["stages"]
    assert stages["iter_1/generate"]["generate/shards_computed"] == 1  # shard 0 was kept, not redone
    assert stages["iter_1/judge"]["judge/prompts"] == 8
    got, want = _results(killed.output_dir), _results(cfg.output_dir)
    assert got.keys() == want.keys()
    for k in want:
        if k == "iter_1/generate":
            continue  # shards_computed differs by design (checked above)
        assert got[k] == want[k], k
    assert not [f for f in os.listdir(killed.output_dir) if ".tmp" in f]


def test_ctrl_c_then_rerun(uninterrupted, task, tmp_path, monkeypatch, capsys):
    """Ctrl-C (KeyboardInterrupt) in the middle of the judge stage: `spa run` says how to continue and exits 130;
    the rerun ends with the same pairs as the uninterrupted run."""
    import spa.io

    cfg, _ = uninterrupted
    run = Config.from_dict(tiny_settings(task, str(tmp_path / "run")))
    path = tmp_path / "c.yaml"
    path.write_text(run.to_yaml())

    def interrupt(unit):
        if unit == "judge":
            raise KeyboardInterrupt

    monkeypatch.setattr(spa.io, "crash_point", interrupt)
    assert main(["run", str(path)]) == 130
    assert "rerun the same command" in capsys.readouterr().err
    lay = Layout(run.output_dir)
    assert os.path.exists(lay.samples(1)) and not os.path.exists(lay.pairs(1))
    monkeypatch.undo()
    assert main(["run", str(path)]) == 0
    assert read_jsonl(lay.pairs(1)) == read_jsonl(Layout(cfg.output_dir).pairs(1))
    assert read_json(lay.eval("iter_1")) | {"model": None} == read_json(Layout(cfg.output_dir).eval("iter_1")) | \
        {"model": None}


def test_demo_ablations_judge_study(uninterrupted):
    """benchmarks/demo_ablations.py's judge study and response kinds on a finished run: the study's SPA row agrees
    with spa.judges.ImplicitRewardJudge on the same responses, and the kinds are fractions that add up."""
    import importlib.util

    import torch

    from spa.data import PromptEncoder, prompt_text
    from spa.judges import ImplicitRewardJudge
    from spa.modeling import load_causal_lm, load_tokenizer
    from spa.tasks.reverse import ERROR_KINDS, oracle

    spec = importlib.util.spec_from_file_location("demo_ablations", os.path.join(ROOT, "benchmarks",
                                                                                 "demo_ablations.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg, _ = uninterrupted
    lay = Layout(cfg.output_dir)
    study = {r["score"]: r for r in mod.judge_study(cfg.output_dir, lay.sft_model)}
    spa_row = study["implicit reward, summed (SPA)"]
    assert len(study) == 6 and all(0 <= r["accuracy"] <= 1 and r["pairs"] == spa_row["pairs"] for r in study.values())

    tok = load_tokenizer(lay.model(0))
    judge = ImplicitRewardJudge(load_causal_lm(lay.model(0), cfg.model, torch.device("cpu")),
                                load_causal_lm(lay.sft_model, cfg.model, torch.device("cpu")),
                                PromptEncoder(tok, cfg.data.max_prompt_length), beta=cfg.judge.beta)
    rows = [r for r in read_jsonl(lay.samples(1)) if r["responses"][0] != r["responses"][1]
            and oracle(prompt_text(r["prompt"]), r["responses"][0]) != oracle(prompt_text(r["prompt"]),
                                                                               r["responses"][1])]
    hits = []
    for r, (a, b) in zip(rows, judge.score(rows)):
        oa, ob = (oracle(prompt_text(r["prompt"]), x) for x in r["responses"])
        hits.append(0.5 if a == b else float((a > b) == (oa > ob)))
    assert spa_row["pairs"] == len(rows) > 0
    assert spa_row["accuracy"] == pytest.approx(sum(hits) / len(hits))

    kinds = mod.response_kinds(cfg.output_dir, 1)
    assert [k["model"] for k in kinds] == ["SFT", "DPO on seed", "SPA iter 1"]
    assert all(sum(k[e] for e in ERROR_KINDS) == pytest.approx(1.0) for k in kinds)

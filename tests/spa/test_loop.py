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
from spa.report import results_table

from .conftest import tiny_settings

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Measured, not results: they differ between an interrupted and an uninterrupted run.
TIMING = ("seconds", "tokens_per_s", "_computed", "train_runtime", "samples_per_second", "steps_per_second", "model")


def _results(output_dir: str) -> dict:
    """Everything a run produced that must not depend on interruptions: pairs, samples, evaluations and the stages'
    metrics without timings and without where a resumed training started (train/resumed_from_step)."""
    lay = Layout(output_dir)
    out = {"samples": read_jsonl(lay.samples(1)), "pairs": read_jsonl(lay.pairs(1))}
    metrics = read_json(lay.metrics)
    for name, entry in metrics["stages"].items():
        out[name] = {k: v for k, v in entry.items()
                     if not any(t in k for t in TIMING) and k != "train/resumed_from_step"}
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
    names = ["sft", "sft/eval", "iter_0/train", "iter_0/validate", "iter_0/eval", "iter_1/generate", "iter_1/judge",
             "iter_1/train", "iter_1/validate", "iter_1/eval"]
    assert list(metrics["stages"]) == names
    assert all(metrics["stages"][n]["seconds"] > 0 for n in names)  # per-stage time
    assert metrics["stages"]["iter_1/generate"]["generate/tokens_per_s"] > 0  # throughput
    assert set(metrics["eval"]) == {"sft", "iter_0", "iter_1"}
    assert 0 <= metrics["eval"]["iter_1"]["eval/win_rate_vs_sft"] <= 1
    # the returned model and why: in metrics.json, in selected.json, and marked in the results table
    sel = metrics["selected"]
    assert sel == read_json(lay.selected) and sel["rule"] == "best" and sel["stopped_early"] is False
    metric = f"val/{cfg.loop.selection_metric}"
    values = {str(i): read_json(lay.validation(i))[metric] for i in (0, 1)}
    assert sel["values"] == pytest.approx(values) and set(sel["worse_probability"]) == {"0", "1"}
    best = max((0, 1), key=lambda i: (values[str(i)], -i))
    pick = 1 if sel["worse_probability"]["1"] < cfg.loop.selection_confidence else 0  # the latest within the noise
    assert sel["best"] == best and sel["iteration"] == pick and sel["model"] == lay.model(pick)
    table = results_table(cfg.output_dir, 1)
    assert [r["model"] for r in table if r["selected"]] == [["DPO on seed", "SPA iter 1"][pick]]
    # a rerun that stops early (--until) keeps the choice made over every iteration
    spa.run(cfg, until="iter_0/eval")  # iteration 0 complete: a choice among iteration 0 alone would be stale
    assert read_json(lay.selected) == sel
    assert Config.load(lay.config) == cfg  # the run's config is stored with it
    assert not os.path.exists(lay.path(".partial"))  # work folders are removed once their stage is done
    # a rerun of a finished run redoes nothing
    before = os.stat(lay.pairs(1)).st_mtime_ns
    assert spa.run(cfg)["stages"] == metrics["stages"]
    assert os.stat(lay.pairs(1)).st_mtime_ns == before


def test_validation_values(uninterrupted):
    """iter_<i>/validation.json and the judge's judge/validation_accuracy equal a recomputation on the held-out seed
    pairs with ImplicitRewardJudge (the model's reward vs pi_init; the judge: pi_0 vs pi_init)."""
    import torch

    from spa.data import PromptEncoder, seed_and_pools
    from spa.judges import ImplicitRewardJudge
    from spa.models import load_causal_lm, load_tokenizer
    from spa.oracle import pairwise_win
    from spa.validation import wilson_interval

    cfg, _ = uninterrupted
    lay = Layout(cfg.output_dir)
    _, val, _, _ = seed_and_pools(cfg)
    assert len(val) == 4  # 25% of the 16 seed pairs
    rows = [{"prompt": p["prompt"], "responses": [p["chosen"], p["rejected"]]} for p in val]
    tok = load_tokenizer(lay.model(0))
    enc = PromptEncoder(tok, cfg.data.max_prompt_length)
    init = load_causal_lm(lay.sft_model, cfg.model, torch.device("cpu"))
    for i in (0, 1):
        model = load_causal_lm(lay.model(i), cfg.model, torch.device("cpu"))
        scores = ImplicitRewardJudge(model, init, enc, beta=cfg.train.beta).score(rows)
        wins = [pairwise_win(c, r) for c, r in scores]
        got = read_json(lay.validation(i))
        assert got["val/reward_accuracy"] == pytest.approx(sum(wins) / 4)
        assert (got["val/reward_accuracy_ci_low"], got["val/reward_accuracy_ci_high"]) == \
            pytest.approx(wilson_interval(sum(wins), 4))
        assert got["val/reward_margin"] == pytest.approx(sum(c - r for c, r in scores) / 4, abs=1e-5)
        own = ImplicitRewardJudge(model, None, enc, beta=1.0).score(rows)  # the model's own summed log-probs
        n_tok = [[len(enc.encode_response(y)) for y in r["responses"]] for r in rows]
        assert got["val/logp_accuracy"] == pytest.approx(sum(pairwise_win(c, r) for c, r in own) / 4)
        per_tok = [(c / nc, r / nr) for (c, r), (nc, nr) in zip(own, n_tok)]
        assert got["val/logp_per_token_accuracy"] == pytest.approx(sum(pairwise_win(c, r) for c, r in per_tok) / 4)
        assert got["val/chosen_logp_per_token"] == pytest.approx(sum(c for c, _ in per_tok) / 4, abs=1e-5)
        if i == 0:  # the judge of iteration 1 is pi_0's implicit reward: judged on the same pairs
            judge = read_json(lay.stage_metrics("iter_1", "judge"))
            j = cfg.judge  # the configured judge (default: the model's own per-token log-prob)
            judge_of_1 = ImplicitRewardJudge(model, None if j.reference == "none" else init, enc, beta=j.beta,
                                             reference_weight=j.reference_weight, token_average=j.token_average)
            same = sum(pairwise_win(c, r) for c, r in judge_of_1.score(rows)) / 4
            assert judge["judge/validation_accuracy"] == pytest.approx(same)
            assert judge["judge/validation_accuracy_pairs"] == 4


def test_early_stop_returns_the_best_iteration(task, tmp_path, monkeypatch):
    """With iteration 1 validating worse than iteration 0 beyond the noise (every held-out pair flips), the loop stops
    after iteration 1 (loop.patience 1) and returns DPO on the seed; with loop.select=last it runs every iteration
    and returns the last."""
    import spa.loop
    from spa.io import atomic_write_json

    def fake_validate(cfg, i):  # iteration 0 ranks all 4 pairs right, iteration 1 all wrong
        lay = Layout(cfg.output_dir)
        good, bad = [-1.0] * 4, [-3.0] * 4
        scores = {"id": list("abcd"), "logp_chosen": bad if i else good, "logp_rejected": good if i else bad,
                  "ref_logp_chosen": [-2.0] * 4, "ref_logp_rejected": [-2.0] * 4, "tokens_chosen": [2] * 4,
                  "tokens_rejected": [2] * 4}
        atomic_write_json(lay.validation(i), {"val/reward_accuracy": 0.0 if i else 1.0})
        atomic_write_json(lay.validation_pairs(i), scores)
        return lay.validation_pairs(i)

    monkeypatch.setattr(spa.loop, "run_validate", fake_validate)
    settings = tiny_settings(task, str(tmp_path / "best"))
    settings["loop"] = {"iterations": 2, "selection_metric": "reward_accuracy", "patience": 1}
    settings["eval"] = {}  # no eval stages: faster
    metrics = spa.run(Config.from_dict(settings))
    assert list(metrics["stages"]) == ["sft", "iter_0/train", "iter_0/validate", "iter_1/generate", "iter_1/judge",
                                       "iter_1/train", "iter_1/validate"]  # iteration 2 never ran
    assert metrics["selected"]["iteration"] == 0 and metrics["selected"]["stopped_early"] is True
    assert metrics["selected"]["reason"].startswith("returns iter_0/model (DPO on seed): the best validation "
                                                    "reward_accuracy, 1.000 ± 0.000; iter_1 is worse with P 1.00")
    assert "stopped after iteration 1: the last 1 iteration(s) validate worse than iter_0" in \
        metrics["selected"]["reason"]
    # a rerun replays the decision without running anything
    assert spa.run(Config.from_dict(settings))["selected"] == metrics["selected"]
    settings["output_dir"] = str(tmp_path / "last")
    settings["loop"] = {"iterations": 2, "select": "last"}
    metrics = spa.run(Config.from_dict(settings))
    assert "iter_2/train" in metrics["stages"] and metrics["selected"]["iteration"] == 2


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
    val, per_pair = read_json(lay.validation(1)), read_json(lay.validation_pairs(1))
    os.remove(lay.validation_pairs(1))  # the stage's done mark: without it the stage runs again
    assert main(["validate", str(path), "--iteration", "1"]) == 0
    assert read_json(lay.validation(1)) == val and read_json(lay.validation_pairs(1)) == per_pair


def test_a_stage_alone_before_its_inputs_is_a_one_line_error(run_with_sft, task, tmp_path, capsys):
    """A single-stage command whose earlier stage has not run names that stage and the command that runs it, before
    any compute (it used to end in a transformers traceback about a repo id)."""
    fresh = tmp_path / "fresh.yaml"
    fresh.write_text(Config.from_dict(tiny_settings(task, str(tmp_path / "fresh"))).to_yaml())
    assert main(["generate", str(fresh), "--iteration", "1"]) == 2
    assert "iter_1/generate needs the output of sft" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "fresh" / "iter_1")
    path = tmp_path / "c.yaml"
    path.write_text(run_with_sft.to_yaml())  # sft done, nothing else
    for argv, need, command in (
            (["generate", "--iteration", "1"], "iter_0/train", "spa train CONFIG --iteration 0"),
            (["eval", "--iteration", "0"], "iter_0/train", "spa train CONFIG --iteration 0"),
            (["validate", "--iteration", "0"], "iter_0/train", "spa train CONFIG --iteration 0"),
            (["judge", "--iteration", "1"], "iter_1/generate", "spa generate CONFIG --iteration 1"),
            (["train", "--iteration", "1"], "iter_1/judge", "spa judge CONFIG --iteration 1")):
        assert main([argv[0], str(path), *argv[1:]]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("spa: error: ") and len(err.splitlines()) == 1, err
        assert f"needs the output of {need}" in err and f"`{command}`" in err
    assert not os.path.exists(os.path.join(run_with_sft.output_dir, "iter_0"))


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
    del stored["judge"]["reference"]  # as written before judge.reference existed: the judge was the paper's
    del stored["judge"]["token_average"]
    os.makedirs(cfg.output_dir)
    with open(Layout(cfg.output_dir).config, "w") as f:
        yaml.safe_dump(stored, f)
    paper = cfg.replace(**{"judge.reference": "init", "judge.token_average": False})
    check_config(paper)  # the values it ran with: accepted
    with pytest.raises(ConfigMismatch, match=r"judge\.reference: 'init' -> 'none'; judge\.token_average: False -> "
                                             r"True"):
        check_config(cfg)  # today's defaults would change how it judges: refused, naming the keys
    cfg = paper
    stored["judge"].update(reference="init", token_average=False)
    # a run made before held-out validation existed trained on the whole seed: resuming it with validation would
    # change its data, so the refusal names the key
    del stored["data"]["validation_size"]
    for key in ("select", "selection_metric", "selection_confidence", "patience"):
        del stored["loop"][key]
    with open(Layout(cfg.output_dir).config, "w") as f:
        yaml.safe_dump(stored, f)
    with pytest.raises(ConfigMismatch, match=r"data\.validation_size: 0 -> 0\.25"):
        check_config(cfg)
    check_config(cfg.replace(**{"data.validation_size": 0}))  # one override resumes it as it was made
    stored["data"]["validation_size"] = 0.25
    stored["judge"]["retired_key"] = 1
    with open(Layout(cfg.output_dir).config, "w") as f:
        yaml.safe_dump(stored, f)
    with pytest.raises(ConfigMismatch, match=r"judge\.retired_key: 1 -> None"):
        check_config(cfg)


def test_a_finished_run_extends_to_more_iterations(run_with_sft, caplog):
    """A larger loop.iterations, and nothing else changed, continues a finished run: the done iterations are kept
    byte for byte, the new one runs, the stored config and the selection follow; fewer iterations are refused."""
    import logging

    cfg = run_with_sft
    lay = Layout(cfg.output_dir)
    spa.run(cfg)
    before = {p: open(p, "rb").read() for p in (lay.pairs(1), os.path.join(lay.model(1), "model.safetensors"),
                                                lay.validation(1))}
    assert not os.path.exists(lay.model(2))
    more = cfg.replace(**{"loop.iterations": 2})
    with caplog.at_level(logging.INFO, logger="spa"):
        metrics = spa.run(more)
    assert f"{cfg.output_dir}: extending the run from 1 to 2 iterations (loop.iterations)" in caplog.text
    assert all(open(p, "rb").read() == b for p, b in before.items())
    assert os.path.exists(lay.model(2)) and "iter_2/eval" in metrics["stages"]
    assert Config.load(lay.config).loop.iterations == 2
    assert set(read_json(lay.selected)["values"]) == {"0", "1", "2"}
    with pytest.raises(ConfigMismatch, match=r"loop\.iterations: 2 -> 1\. Rerun .*\(a larger loop\.iterations, "
                                             r"and nothing else changed, extends the run"):
        spa.run(cfg)
    with pytest.raises(ConfigMismatch, match=r"loop\.iterations: 2 -> 3; train\.beta: 0\.1 -> 0\.2"):
        spa.run(more.replace(**{"loop.iterations": 3, "train.beta": 0.2}))


def test_resume_after_sigkill_in_every_stage(uninterrupted, task, tmp_path):
    """The run is SIGKILLed in sft (after a checkpoint), the SFT model's eval (after a shard), the seed DPO (after a
    checkpoint), generate and judge (after a shard); each rerun continues, and the end equals the uninterrupted run."""
    cfg, _ = uninterrupted
    killed = Config.from_dict(tiny_settings(task, str(tmp_path / "run")))
    path = tmp_path / "c.yaml"
    path.write_text(killed.to_yaml())
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    lay = Layout(killed.output_dir)
    said = {}  # what the run after each kill said on the console
    previous = None
    for crash in ("sft:1", "eval:1", "train:1", "generate:1", "judge:1", None):
        env.pop(CRASH_ENV, None)
        if crash:
            env[CRASH_ENV] = crash
        proc = subprocess.run([sys.executable, "-m", "spa.cli", "run", str(path)], env=env, capture_output=True,
                              text=True, timeout=600)
        expect = -signal.SIGKILL if crash else 0
        assert proc.returncode == expect, f"{crash}: {proc.stderr[-3000:]}"
        said[previous] = proc.stderr
        previous = crash
        if crash == "sft:1":
            assert os.path.isdir(os.path.join(lay.partial("sft", "train"), "checkpoint-2"))
            assert not os.path.exists(lay.sft_model)
    assert f"sft: resuming from {lay.partial('sft', 'train')}/checkpoint-2 (step 2)" in said["sft:1"]
    assert "eval: resuming: 1 of 2 shards are done already" in said["eval:1"]
    assert "iter_0/train: resuming from " in said["train:1"] and "(step 2)" in said["train:1"]
    assert "generate: resuming: 1 of 2 shards are done already" in said["generate:1"]
    stages = read_json(lay.metrics)["stages"]
    assert stages["iter_1/generate"]["generate/shards_computed"] == 1  # shard 0 was kept, not redone
    assert stages["iter_1/judge"]["judge/prompts"] == 8
    assert stages["iter_0/train"].pop("train/resumed_from_step") == 2
    assert read_json(Layout(cfg.output_dir).metrics)["stages"]["iter_0/train"]["train/resumed_from_step"] == 0
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
    from spa.models import load_causal_lm, load_tokenizer
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

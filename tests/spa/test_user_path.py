"""The path of a new user: a task of one's own defined in a directory (data files, an oracle module, a tokenizer
built the documented way), the `spa` command run from there as a subprocess, and what it prints and writes; plus
the pieces that path relies on (config explanation, integer counts, per-iteration prompt files, warnings)."""

import json
import logging
import os
import subprocess
import sys

import pytest
import yaml

from spa.cli import main
from spa.config import Config, ConfigError, keys
from spa.data import PromptEncoder, seed_and_pools
from spa.tasks.chartok import char_tokenizer, data_chars

from .conftest import TINY_MODEL

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ORACLE = '''
def score(prompt, response):
    """1 for the right sum, less the further off (prompt "Add: 12+7")."""
    a, b = prompt.split(": ", 1)[1].split("+")
    try:
        return 1.0 / (1 + abs(int(response.strip()) - (int(a) + int(b))))
    except ValueError:
        return 0.0
'''


def _write(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def make_task(root) -> None:
    """What a user writes: an 'Add: a+b' task (upper case and '+', outside the built-in alphabet)."""
    import random

    rng = random.Random(0)
    xs = [(a, b) for a in range(10, 60) for b in range(1, 20)]
    rng.shuffle(xs)
    p = lambda a, b: f"Add: {a}+{b}"
    _write(root / "sft.jsonl", [{"prompt": p(a, b), "response": str(a + b + rng.choice([0, 0, 1]))}
                                for a, b in xs[:150]])
    _write(root / "prefs.jsonl", [{"prompt": p(a, b), "chosen": str(a + b), "rejected": str(a + b + 1)}
                                  for a, b in xs[150:270]])
    _write(root / "eval_prompts.jsonl", [{"prompt": p(a, b)} for a, b in xs[270:290]])
    _write(root / "eval_pairs.jsonl", [{"prompt": p(a, b), "chosen": str(a + b), "rejected": str(a + b + 2)}
                                       for a, b in xs[290:310]])
    _write(root / "iter1.jsonl", [{"prompt": p(a, b)} for a, b in xs[310:330]])
    (root / "myoracle.py").write_text(ORACLE)


def spa_cmd(args, cwd, timeout=600):
    env = {**os.environ, "PYTHONPATH": REPO, "SPA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "spa.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_own_task_from_a_directory(tmp_path):
    """docs/trainer.md "Your own task": tokenizer from the data's characters, `spa sft` once, then `spa run` with
    model.name_or_path = that SFT model, per-iteration prompt files and an oracle module in the directory."""
    make_task(tmp_path)
    files = [str(tmp_path / f) for f in ("sft.jsonl", "prefs.jsonl", "eval_prompts.jsonl", "iter1.jsonl")]
    char_tokenizer(data_chars(*files)).save_pretrained(tmp_path / "tokenizer")
    sft = {"output_dir": "sft_run", "model": {"tokenizer": "tokenizer", "device": "cpu"},
           "sft": {"enabled": True, "data": "sft.jsonl", "from_scratch": dict(TINY_MODEL), "max_steps": 4,
                   "learning_rate": 3e-3, "batch_size": 16, "max_length": 32},
           "data": {"max_prompt_length": 24}, "train": {"logging_steps": 1}}
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(sft))
    r = spa_cmd(["sft", "sft.yaml"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    n = json.loads((tmp_path / "sft_run" / "sft" / "sft_metrics.json").read_text())["sft/parameters"]
    assert f"sft: a new llama, {n / 1e3:.1f}K parameters (1 layers, hidden 16, intermediate 32), 150 examples" \
        in r.stderr, r.stderr
    run = {"output_dir": "run", "seed": 1, "model": {"name_or_path": "sft_run/sft/model", "device": "cpu"},
           "sft": {"enabled": False},
           "data": {"seed": "prefs.jsonl", "seed_size": 24, "iteration_prompt_files": ["iter1.jsonl"],
                    "max_prompt_length": 24},
           "generate": {"max_new_tokens": 6, "batch_size": 8, "shard_size": 16}, "judge": {"batch_size": 8},
           "train": {"learning_rate": 1e-3, "seed_epochs": 1, "batch_size": 4, "max_length": 32, "save_steps": 2,
                     "logging_steps": 1},
           "loop": {"iterations": 1},
           "eval": {"oracle": "myoracle:score", "prompts": "eval_prompts.jsonl", "pairs": "eval_pairs.jsonl",
                    "max_new_tokens": 6}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    r = spa_cmd(["run", "run.yaml"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out, err = r.stdout, r.stderr
    # quiet: no Trainer log dicts anywhere, labelled bars, one line per stage, a closing summary on stdout
    for noise in ("{'loss'", "'train_runtime'", "{'eval/", "Writing model shards", "Loading weights", "missing keys",
                  "real_accelerator"):
        assert noise not in out + err, noise
    assert "train iter_0" in err and "train iter_1" in err
    for stage in ("iter_0/train: done in", "iter_1/judge: done in", "iter_1/eval: done in"):
        assert stage in err
    assert "win rate vs SFT" in out and "SPA iter 1" in out and "returned model: run/iter_" in out
    assert "(returns iter_" not in out  # the path is not said twice
    assert "plot: run/results.png" in out
    with open(tmp_path / "run" / "results.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["stages"]["iter_0/train"]["data/unknown_tokens"] == 0  # the tokenizer covers the data
    gen = metrics["stages"]["iter_1/generate"]
    assert gen["generate/prompts"] == 20 and gen["data/prompts_iter_1_dropped"] == 0  # the iteration's own file
    assert metrics["stages"]["iter_1/judge"]["judge/oracle_accuracy"] is not None  # myoracle from the directory
    assert not os.path.exists(tmp_path / "run" / "sft" / "model")  # the SFT model was reused, not retrained
    stored = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert stored["data"]["seed_size"] == 24 and isinstance(stored["data"]["seed_size"], int)


def test_deepspeed_is_told_there_is_no_gpu(monkeypatch):
    """Where DeepSpeed is installed, every Trainer imports it, and without a GPU it prints a warning on stdout unless
    its CPU accelerator is named; a user's own DS_ACCELERATOR is kept, and nothing is set where a GPU is visible."""
    import importlib.util

    import torch

    from spa.report import quiet_deepspeed_on_cpu

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "deepspeed"
                        else real_find_spec(name, *a))
    for gpu, preset, expected in ((False, None, "cpu"), (False, "xpu", "xpu"), (True, None, None)):
        monkeypatch.setattr(torch.cuda, "is_available", lambda gpu=gpu: gpu)
        if preset is None:
            monkeypatch.delenv("DS_ACCELERATOR", raising=False)
        else:
            monkeypatch.setenv("DS_ACCELERATOR", preset)
        quiet_deepspeed_on_cpu()
        assert os.environ.get("DS_ACCELERATOR") == expected


def test_data_chars_refuses_a_missing_data_file(tmp_path):
    """A misspelt file name is an error, not a string whose characters join the alphabet."""
    _write(tmp_path / "a.jsonl", [{"prompt": "Shift: ab", "response": "bc"}])
    assert data_chars(str(tmp_path / "a.jsonl"), "xyz") == " :Sabcfhitxyz"
    with pytest.raises(FileNotFoundError, match=r"data_chars: .*b\.jsonl does not exist"):
        data_chars(str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"))


def test_help_and_version_do_not_import_torch(tmp_path):
    code = ("import sys\nfrom spa.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('HEAVY', sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": REPO}, capture_output=True,
                       text=True, timeout=120)
    assert "HEAVY []" in r.stdout and "usage: spa" in r.stdout and "demo" in r.stdout
    # a config error answers at once too, before torch and transformers are imported
    (tmp_path / "c.yaml").write_text("output_dir: run\n")
    code = (f"import sys\nfrom spa.cli import main\nrc = main(['run', {str(tmp_path / 'c.yaml')!r}, '--set', "
            "'train.bta=1'])\nprint('RC', rc, 'HEAVY', sorted(m for m in ('torch', 'transformers') "
            "if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": REPO}, capture_output=True,
                       text=True, timeout=120)
    assert "RC 2 HEAVY []" in r.stdout and "spa: error: unknown key train.bta in --set train.bta=1" in r.stderr, \
        r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-m", "spa.cli", "--version"], env={**os.environ, "PYTHONPATH": REPO},
                       capture_output=True, text=True, timeout=120)
    import spa

    assert r.returncode == 0 and r.stdout.strip() == f"spa {spa.__version__}"


def test_config_explain_lists_every_key(capsys):
    assert main(["config", "--explain"]) == 0
    out = capsys.readouterr().out
    for key, _, _, help in keys():
        assert f"  {key}  (" in out and help.split()[0] in out
    assert "data.iteration_prompts  (a list of numbers; default [8000, 20000, 30000])" in out
    assert main(["config", "--explain", "--set", "train.beta=0.3"]) == 0
    assert "train.beta  (a number; default 0.1; here: 0.3)" in capsys.readouterr().out


def test_counts_print_as_integers_and_old_stored_configs_resume(tmp_path, capsys):
    assert main(["config", "--set", "data.seed_size=100.0", "--set", "data.iteration_prompts=[400.0, 0.5]"]) == 0
    data = yaml.safe_load(capsys.readouterr().out)["data"]
    assert data["seed_size"] == 100 and type(data["seed_size"]) is int
    assert data["iteration_prompts"] == [400, 0.5] and type(data["iteration_prompts"][0]) is int
    assert Config.from_dict({}).data.iteration_prompts == [8000, 20000, 30000]
    # a run stored by a version that wrote these counts as floats resumes with the same settings
    from spa.loop import ConfigMismatch, check_config

    cfg = Config.from_dict({"output_dir": str(tmp_path), "data": {"seed_size": 16, "iteration_prompts": [8, 8]}})
    old = cfg.to_dict()
    old["data"].update(seed_size=16.0, iteration_prompts=[8.0, 8.0], validation_size=0.25)
    os.makedirs(tmp_path, exist_ok=True)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    check_config(cfg)
    assert Config.from_dict(old).fingerprint() == cfg.fingerprint()
    with pytest.raises(ConfigMismatch, match="data.iteration_prompts"):
        check_config(cfg.replace(**{"data.iteration_prompts": [8, 9]}))


def test_iteration_prompt_files(task, tiny_cfg, tmp_path):
    seed_prompts = [json.loads(line) for line in open(task["prefs"])]
    a = [{"prompt": f"reverse: word{c}"} for c in "abcdef"] + [{"prompt": "reverse: worda"}]  # one duplicate
    b = [{"prompt": "reverse: wordb"}, {"prompt": "reverse: xyz"}, {"prompt": seed_prompts[0]["prompt"]}]
    _write(tmp_path / "a.jsonl", a)
    _write(tmp_path / "b.jsonl", b)
    files = [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    cfg = tiny_cfg.replace(**{"data.iteration_prompt_files": files, "loop.iterations": 2})
    seed, val, pools, info = seed_and_pools(cfg)
    texts = [[p["prompt"][-1]["content"] for p in pool] for pool in pools]
    taken = {p["prompt"][-1]["content"] for p in seed + val}
    assert texts[0] == [f"reverse: word{c}" for c in "abcdef"]  # whole file, in order, duplicate dropped
    expect_b = ["reverse: xyz"] + ([seed_prompts[0]["prompt"]] if seed_prompts[0]["prompt"] not in taken else [])
    assert texts[1] == expect_b  # wordb was iteration 1's; a seed prompt is never an iteration prompt
    assert info["data/prompts_iter_1_dropped"] == 1 and info["data/pool_prompts"] == len(texts[0]) + len(texts[1])
    with pytest.raises(ConfigError, match="data.iteration_prompt_files has 1 file.* loop.iterations is 2"):
        tiny_cfg.replace(**{"data.iteration_prompt_files": files[:1], "loop.iterations": 2})
    with pytest.raises(ConfigError, match="data.iteration_prompt_files and data.prompts are alternatives"):
        tiny_cfg.replace(**{"data.iteration_prompt_files": files, "data.prompts": files[0]})


def test_pool_error_names_the_keys(tiny_cfg):
    from spa.data import DataError

    with pytest.raises(DataError, match=r"data.iteration_prompts asks for 500 prompts .* the prompt pool holds .*"
                                        r"the prompts of data.seed outside the seed .*set data.prompts"):
        seed_and_pools(tiny_cfg.replace(**{"data.iteration_prompts": [500]}))


def test_held_out_overlap_warning(task, tiny_cfg, tmp_path, caplog):
    seed, val, pools, _ = seed_and_pools(tiny_cfg)
    rows = [{"prompt": p["prompt"]} for p in (seed[:2] + pools[0][:1])] + \
        [json.loads(line) for line in open(task["eval_prompts"])]
    _write(tmp_path / "ev.jsonl", rows)
    cfg = tiny_cfg.replace(**{"eval.prompts": str(tmp_path / "ev.jsonl"), "eval.max_prompts": None})
    with caplog.at_level(logging.WARNING, logger="spa"):
        info = seed_and_pools(cfg).info
    assert info["data/eval_prompts_overlap"] == 3 and info["data/eval_pairs_overlap"] == 0
    assert "eval.prompts: 3 of the 11 held-out prompts used" in caplog.text
    assert seed_and_pools(tiny_cfg).info["data/eval_prompts_overlap"] == 0


def test_unknown_characters_are_counted_and_named(caplog):
    enc = PromptEncoder(char_tokenizer(), 64)  # the built-in alphabet: no upper case, no '+'
    enc.encode([{"role": "user", "content": "Add: 347+58"}])
    enc.encode_response("405")
    with caplog.at_level(logging.WARNING, logger="spa"):
        m = enc.metrics()
    assert m["data/unknown_tokens"] == 2 and m["data/texts_with_unknown_tokens"] == 1
    assert "2 token(s) in 1 text(s) became the tokenizer's unknown token <unk>" in caplog.text
    assert "'A' x1" in caplog.text and "'+' x1" in caplog.text
    covered = PromptEncoder(char_tokenizer(data_chars("Add: 347+58", ["405"])), 64)
    covered.encode([{"role": "user", "content": "Add: 347+58"}])
    assert covered.metrics()["data/unknown_tokens"] == 0


def test_data_chars_reads_jsonl_values_not_keys_or_roles(tmp_path):
    _write(tmp_path / "d.jsonl", [{"prompt": "Ab", "chosen": [{"role": "user", "content": "c+"}]}, {"x": "é"}])
    assert data_chars(str(tmp_path / "d.jsonl")) == "+Abcé"


def test_resume_of_a_tied_model_does_not_warn_missing_keys(tmp_path):
    """A checkpoint of a tied model stores lm_head.weight once (as the embedding): resuming it is complete."""
    import torch
    from transformers.utils import logging as hf_logging

    from spa.trainer import ListDataset, SFTCollator, SFTTrainer, tied_parameter_names
    from tests.toy import tiny_llama

    tok = char_tokenizer()
    model = tiny_llama(len(tok), hidden_size=16, layers=1, heads=2, tie_word_embeddings=True)
    assert tied_parameter_names(model) == {"model.embed_tokens.weight", "lm_head.weight"}
    assert tied_parameter_names(tiny_llama(len(tok), hidden_size=16, layers=1, heads=2)) == set()
    feats = [{"prompt_ids": [1, 5, 6], "response_ids": [7, 8, 2]}] * 8

    def trainer(steps):
        from transformers import TrainingArguments

        args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4,
                                 save_steps=2, save_strategy="steps", report_to="none", use_cpu=True,
                                 disable_tqdm=True, logging_steps=1, remove_unused_columns=False)
        return SFTTrainer(model=model, args=args, train_dataset=ListDataset(feats), data_collator=SFTCollator(0))

    trainer(2).train()
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    hf_logger = hf_logging.get_logger("transformers.trainer")
    hf_logger.addHandler(handler)
    try:
        trainer(3).train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    finally:
        hf_logger.removeHandler(handler)
    assert not [r for r in records if "missing keys" in r.getMessage()]
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.isfinite(model.lm_head.weight).all()


def test_plot_results(tmp_path, monkeypatch, caplog):
    from spa.plots import plot_results

    rows = [{"model": "SFT", "score": 0.8}, {"model": "DPO on seed", "win_rate": 0.6, "score": 0.85,
                                            "val_acc": 0.7, "selected": True},
            {"model": "SPA iter 1", "win_rate": 0.55, "win_rate_std": 0.02, "score": 0.82, "judge_acc": 0.5},
            {"model": "returned", "win_rate": 0.6}]
    path = plot_results(rows, str(tmp_path / "p" / "results.png"))
    with open(path, "rb") as f:
        assert f.read(4) == b"\x89PNG"
    assert plot_results([{"model": "SFT"}], str(tmp_path / "none.png")) is None  # nothing measured: no file
    assert not os.path.exists(tmp_path / "none.png")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with caplog.at_level(logging.WARNING, logger="spa"):
        assert plot_results(rows, str(tmp_path / "x.png")) is None
    assert "matplotlib is not installed" in caplog.text and "pip install matplotlib" in caplog.text


def test_stage_line():
    from spa.report import stage_line

    line = stage_line("iter_1/train", {"train/final_loss": 0.61234, "train/rewards/accuracies": 0.75,
                                       "train/pairs": 40, "train/steps": 5.0}, 12.3)
    assert line == "iter_1/train: done in 12 s: loss 0.612, reward acc 0.75, pairs 40, steps 5"
    assert stage_line("iter_1/eval", {"eval/win_rate_vs_sft": 0.5}) == \
        "iter_1/eval: done: win rate vs SFT (ties 1/2) 0.500"

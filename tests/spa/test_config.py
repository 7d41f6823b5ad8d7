"""spa.Config: YAML <-> typed dataclasses, overrides, errors naming the key, the paper's defaults."""

import pytest

from spa import Config, ConfigError
from spa.cli import main
from spa.tasks.demo import demo_config


def test_defaults_are_the_papers():
    c = Config()
    assert (c.generate.num_samples, c.generate.temperature, c.generate.top_p, c.generate.max_new_tokens) == \
        (2, 0.7, 1.0, 300)
    assert (c.train.beta, c.train.learning_rate, c.train.lr_scheduler_type, c.train.warmup_ratio) == \
        (0.1, 5e-7, "cosine", 0.1)
    assert (c.train.seed_epochs, c.train.epochs, c.train.batch_size) == (3.0, 1.0, 32)
    assert c.refine.lam == [0.5, 0.25, 0.125]
    assert (c.refine.percentile, c.refine.alpha, c.refine.warmup_ratio, c.refine.window) == (10.0, 0.1, 0.2, 50)
    assert c.judge.type == "implicit" and c.select.strategy == "minmax" and c.loop.iterations == 3
    assert c.data.seed_size == 0.033


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("output_dir: out\ntrain:\n  beta: 0.2\n  learning_rate: 5e-7\nrefine:\n  lam: [1, 0.5]\n")
    c = Config.load(str(path), overrides=["train.beta=0.3", "loop.iterations=2", "judge.type=contrastive",
                                          "eval.oracle=pkg.mod:fn", "train.report_to=[tensorboard]"])
    assert c.train.beta == 0.3 and c.loop.iterations == 2 and c.judge.type == "contrastive"
    assert c.train.learning_rate == 5e-7 and isinstance(c.train.learning_rate, float)  # YAML 1.1 reads a string
    assert c.refine.lam == [1.0, 0.5] and all(isinstance(x, float) for x in c.refine.lam)
    assert c.train.report_to == ["tensorboard"]
    # the round trip through YAML gives the same config and fingerprint
    again = Config.from_dict(__import__("yaml").safe_load(c.to_yaml()))
    assert again == c and again.fingerprint() == c.fingerprint()
    assert c.replace(**{"train.beta": 0.5}).train.beta == 0.5
    assert c.replace(output_dir="elsewhere").fingerprint() == c.fingerprint()  # a moved run still resumes
    assert c.replace(**{"train.beta": 0.5}).fingerprint() != c.fingerprint()


@pytest.mark.parametrize("text, overrides, match", [
    ("train:\n  betta: 0.1\n", [], r"unknown key train\.betta in .*c\.yaml.*did you mean 'beta'"),
    ("trian:\n  beta: 0.1\n", [], r"unknown key trian in .*did you mean 'train'"),
    ("train:\n  beta: high\n", [], r"train\.beta must be a number in .*c\.yaml, got str: 'high'"),
    ("generate:\n  num_samples: 2.5\n", [], r"generate\.num_samples must be an integer"),
    ("refine:\n  enabled: 'yes'\n", [], r"refine\.enabled must be true/false"),
    ("judge:\n  type: pairrm\n", [], r"judge\.type must be one of \['implicit'"),
    ("refine:\n  lam: [0.5, x]\n", [], r"refine\.lam\[1\] must be a number"),
    ("train: 3\n", [], r"train must be a mapping"),
    ("- a\n", [], r"must be a mapping of sections"),
    ("", ["train.beta"], r"override 'train.beta' must look like section.key=value"),
    ("", ["train.nope=1"], r"unknown key train\.nope"),
    ("", ["train.beta.x=1"], r"train\.beta must be a number.*got dict"),
    ("train:\n  beta: 0.1\n", ["train.beta.x=1"], r"train\.beta is not a section"),
    ("", ["generate.num_samples=1"], r"generate\.num_samples must be >= 2"),
    ("", ["refine.alpha=0.7"], r"refine\.alpha must be in \[0, 0\.5\)"),
    ("", ["train.batch_size=32", "train.per_device_batch_size=5"], r"train\.per_device_batch_size must divide"),
    ("", ["eval.oracle=no_colon"], r"eval\.oracle must look like 'package\.module:function'"),
    ("", ["train.iteration_loss=dlma"], r"dlma needs judge\.type: contrastive"),
    ("", ["judge.type=reward_model"], r"judge\.model must name the reward model"),
    ("", ["judge.type=function"], r"judge\.function must look like 'package\.module:function'.*got None"),
    ("", ["judge.type=function", "judge.function=spa.tasks.reverse"], r"judge\.function must look like"),
    ("", ["data.seed_size=2.5"], r"data\.seed_size must be a fraction <= 1 or a whole count"),
])
def test_errors_name_the_key(tmp_path, text, overrides, match):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        Config.load(str(path), overrides)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        Config.load(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1,\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        Config.load(str(bad))


def test_demo_config_is_valid(tmp_path):
    c = demo_config({k: str(tmp_path / k) for k in ("tokenizer", "sft", "prefs", "eval_prompts", "eval_pairs")},
                    str(tmp_path / "run"), seed=1, quick=True)
    assert c.sft.enabled and c.sft.from_scratch["model_type"] == "llama"
    assert c.data.seed_size == 0.033 and c.eval.oracle == "spa.tasks.reverse:oracle" and c.loop.iterations == 2


def test_cli_config_prints_and_errors(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  beta: 0.25\n")
    assert main(["config", str(path), "--set", "loop.iterations=1"]) == 0
    out = capsys.readouterr().out
    assert "beta: 0.25" in out and "iterations: 1" in out
    assert main(["config", str(path), "--set", "train.bta=1"]) == 2
    assert "unknown key train.bta in --set train.bta=1 (did you mean 'beta'?)" in capsys.readouterr().err


@pytest.mark.parametrize("overrides, match", [
    (["train.bta=1"], r"unknown key train\.bta in --set train\.bta=1 \(did you mean 'beta'\?\)"),
    (["train.batch_size=abc"], r"train\.batch_size must be an integer in --set train\.batch_size=abc, got str"),
    (["refine.lam=[0.5, x]"], r"refine\.lam\[1\] must be a number in --set refine\.lam=\[0\.5, x\]"),
    (["refine.alpha=0.7"], r"refine\.alpha must be in \[0, 0\.5\) in --set refine\.alpha=0\.7"),
    (["model.peft={rr: 4}"], r"model\.peft\.rr is not a peft\.LoraConfig field.* in --set model\.peft=\{rr: 4\}"),
    (["loop.iterations=1"], r"train\.beta must be a number in .*c\.yaml, got str"),  # the file's own error
])
def test_errors_name_the_override_that_caused_them(tmp_path, overrides, match):
    """A bad value given with --set is reported as coming from that --set item, not from the config file."""
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  beta: high\n" if overrides == ["loop.iterations=1"] else "train:\n  beta: 0.2\n")
    with pytest.raises(ConfigError, match=match) as e:
        Config.load(str(path), overrides)
    if overrides != ["loop.iterations=1"]:
        assert "c.yaml" not in str(e.value)

"""Failures that must stop a run at once with a one-line error naming the key, file, line or stage (and before any
compute), and states that must never be committed: an unknown --until stage, non-finite settings and training
values, a damaged checkpoint, undecodable data, two processes on one output_dir, and the checks made before a run
starts."""

import json
import math
import os

import pytest

from spa import Config, ConfigError
from spa.cli import main
from spa.data import DataError, load_pairs, load_prompts
from spa.io import Layout

from .conftest import tiny_settings

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _write_config(tmp_path, cfg: Config) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    return str(path)


# --- 1. --until names a stage of the plan ---------------------------------------------------------------------

def test_until_unknown_stage_fails_before_any_compute(tiny_cfg, tmp_path, capsys, monkeypatch):
    import spa.loop

    ran = []
    monkeypatch.setattr(spa.loop, "run_stage", lambda cfg, stage: ran.append(stage.name))
    with pytest.raises(ConfigError, match=r"--until 'iter_1/jugde'.*did you mean 'iter_1/judge'.*sft, sft/eval, "
                                          r"iter_0/train"):
        spa.loop.run(tiny_cfg, until="iter_1/jugde")
    assert ran == []
    assert main(["run", _write_config(tmp_path, tiny_cfg), "--until", "iter_9/train"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spa: error: --until 'iter_9/train'") and "iter_1/eval" in err
    assert ran == [] and not os.path.exists(tiny_cfg.output_dir)


# --- 2a. non-finite numbers in the config ---------------------------------------------------------------------

@pytest.mark.parametrize("override, key", [
    ("train.beta=inf", "train.beta"), ("train.beta=.inf", "train.beta"), ("train.learning_rate=nan", "train.learning_rate"),
    ("judge.beta=-inf", "judge.beta"), ("refine.lam=[0.5, .nan]", r"refine.lam\[1\]"),
    ("data.iteration_prompts=[inf]", r"data.iteration_prompts\[0\]"), ("generate.top_p=NaN", "generate.top_p"),
    ("eval.temperature=inf", "eval.temperature"), ("judge.length_penalty=inf", "judge.length_penalty"),
])
def test_non_finite_config_values_are_refused(override, key):
    with pytest.raises(ConfigError, match=rf"^{key} must be a finite number, got"):
        Config.from_dict({}, [override])


def test_every_float_key_refuses_inf():
    import dataclasses
    import typing

    cfg = Config()
    n = 0
    for section in dataclasses.fields(cfg):
        sub = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(sub):
            continue
        for f, tp in typing.get_type_hints(type(sub)).items():
            if float in (tp, *typing.get_args(tp)):
                n += 1
                listed = typing.get_origin(tp) is list
                with pytest.raises(ConfigError, match=rf"{section.name}\.{f}{'.0.' if listed else ''} must be a "
                                                      rf"finite number"):
                    Config.from_dict({}, [f"{section.name}.{f}={'[inf]' if listed else 'inf'}"])
    assert n >= 20


# --- 5. undecodable bytes in a JSONL file ---------------------------------------------------------------------

def test_invalid_utf8_line_is_a_data_error_with_file_and_line(tmp_path):
    src = tmp_path / "p.jsonl"
    good = json.dumps({"prompt": "r\u00e9verse: abc", "chosen": "cba", "rejected": "abc"}, ensure_ascii=False)
    src.write_bytes(good.encode() + b"\n" + b'{"prompt": "a\xff\xfe", "chosen": "b", "rejected": "c"}\n'
                    + good.encode() + b"\n")
    with pytest.raises(DataError, match=r"p\.jsonl:2: not valid UTF-8 \(byte 0xff at column 14\).*skip_invalid"):
        load_pairs(str(src), "train")
    pairs, stats = load_pairs(str(src), "train", skip_invalid=True)
    assert (stats.rows, stats.invalid) == (3, 1) and pairs[0]["prompt"][0]["content"] == "r\u00e9verse: abc"


def test_utf8_with_a_byte_order_mark(tmp_path):
    src = tmp_path / "p.jsonl"
    src.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "\u00e9t\u00e9"}, ensure_ascii=False).encode() + b"\n")
    prompts, _ = load_prompts(str(src), "train")
    assert prompts[0]["prompt"][0]["content"] == "\u00e9t\u00e9"
    bad = tmp_path / "p.json"
    bad.write_bytes(b'[{"prompt": "a"},\n {"prompt": "\xc3"}]')
    with pytest.raises(DataError, match=r"p\.json:2: not valid UTF-8"):
        load_prompts(str(bad), "train")

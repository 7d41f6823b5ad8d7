"""Every ```python block of README.md runs as written, in order, in one namespace (the README's first trainer
block builds the tiny offline `model`, `ref_model`, `tokenizer` and `dataset` the later ones use). CPU, no
download, seconds."""

import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_python_blocks_are_found():
    blocks = python_blocks(open(README, encoding="utf-8").read())
    assert len(blocks) >= 6  # kernels, tiny-model preamble, TRL, TRL patch, HF Trainer, plain loop
    assert any("patch_dpo_trainer" in b for b in blocks) and any("PreferenceCollator" in b for b in blocks)


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    pytest.importorskip("trl")
    monkeypatch.chdir(tmp_path)  # the trainers' output_dir
    monkeypatch.setenv("WANDB_DISABLED", "true")
    namespace: dict = {"__name__": "readme"}
    for i, block in enumerate(python_blocks(open(README, encoding="utf-8").read())):
        try:
            exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"README.md python block {i + 1} fails: {type(e).__name__}: {e}\n{block}") from e
    assert namespace["hidden"].grad is not None  # the kernels block ran forward and backward
    out = namespace["out"]  # the plain loop's last step
    assert {"rewards/chosen", "rewards/margins"} <= set(out.metrics())

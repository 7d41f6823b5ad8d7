"""The built-in offline task (spa.tasks) and the `spa demo` command on tiny settings."""

import json
import os
from collections import Counter

import pytest
from transformers import AutoTokenizer

from spa import Config
from spa.cli import main
from spa.config import LoopConfig
from spa.tasks import reverse
from spa.tasks.chartok import char_tokenizer

from .conftest import TINY_MODEL


def test_oracle_gives_partial_credit():
    p = "reverse: planet"
    assert reverse.oracle(p, "tenalp") == 1.0
    assert reverse.oracle(p, " tenalp ") == 1.0
    scores = [reverse.oracle(p, r) for r in ("tenalp", "tenalpp", "tenapl", "tena", "planet", "", "zzzzzzzzzzzz")]
    assert scores[:4] == pytest.approx([1.0, 6 / 7, 4 / 6, 4 / 6])  # every error costs part of the credit
    assert scores[4:] == [0.0, 0.0, 0.0]  # a copy of "planet" shares no aligned letter with "tenalp"
    assert reverse.oracle("reverse: abca", "abca") == 0.5  # a copy of a word with repeats gets some credit
    assert reverse.levenshtein("kitten", "sitting") == 3


def test_error_kind():
    p = "reverse: planet"
    got = [reverse.error_kind(p, r) for r in ("tenalp", "tena", "tenalppp", "planet", "tenapl", "tenalpx y", "")]
    assert got == ["exact", "truncated", "padded", "copy", "same_length", "padded", "truncated"]
    assert reverse.error_kind(p, "xyz") == "other" and reverse.error_kind("reverse: abba", "abba") == "exact"
    assert set(got) < set(reverse.ERROR_KINDS)


def test_task_is_deterministic_with_mixed_quality_demonstrations():
    a = reverse.build(n_sft=400, n_prefs=50, n_eval_prompts=10, n_eval_pairs=10, seed=0)
    assert a == reverse.build(n_sft=400, n_prefs=50, n_eval_prompts=10, n_eval_pairs=10, seed=0)
    words = [reverse.word_of(r["prompt"]) for rows in a.values() for r in rows]
    assert len(words) == len(set(words)) == 470  # no word is shared between the files
    exact = Counter(r["response"] == reverse.target(reverse.word_of(r["prompt"])) for r in a["sft"])
    assert 0.3 < exact[True] / 400 < 0.55  # 40% careful annotators: the SFT model has headroom
    for pair in a["prefs"]:
        assert pair["score_chosen"] > pair["score_rejected"]
        assert pair["score_chosen"] == reverse.oracle(pair["prompt"], pair["chosen"][-1]["content"])


def test_char_tokenizer_round_trip(tmp_path):
    char_tokenizer().save_pretrained(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    ids = tok("hello world", add_special_tokens=False).input_ids
    assert len(ids) == 11 and tok.decode(ids) == "hello world"
    msgs = [{"role": "user", "content": "reverse: ab"}, {"role": "assistant", "content": "ba"}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == "<s><|user|>reverse: ab<|assistant|>ba</s>"
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text
    assert tok.eos_token == "</s>" and tok.pad_token == "<pad>"


def test_demo_summary_over_seeds_that_stopped_at_different_iterations():
    from spa.tasks.demo import summarise_seeds

    row = lambda model, win, selected=False: {"model": model, "win_rate": win, "selected": selected}
    per_seed = {0: [row("SFT", None), row("DPO on seed", 0.5), row("SPA iter 1", 0.7, True), row("SPA iter 2", 0.6)],
                1: [row("SFT", None), row("DPO on seed", 0.4, True), row("SPA iter 1", 0.3)]}  # stopped earlier
    got = {r["model"]: r for r in summarise_seeds(per_seed)}
    assert list(got) == ["SFT", "DPO on seed", "SPA iter 1", "SPA iter 2", "returned"]
    assert got["SPA iter 2"]["seeds"] == 1 and got["SPA iter 2"]["win_rate"] == 0.6
    assert got["SPA iter 1"]["win_rate"] == pytest.approx(0.5) and got["SPA iter 1"]["seeds"] == 2
    assert got["returned"]["win_rate"] == pytest.approx((0.7 + 0.4) / 2)  # each seed's own returned model
    assert got["returned"]["win_rate_std"] == pytest.approx(0.2121, abs=1e-4)


def test_spa_demo_command(tmp_path, capsys):
    """`spa demo --quick` end to end on tiny settings (the real demo differs only in sizes), two seeds, resumable."""
    tiny = [f"sft.from_scratch={json.dumps(TINY_MODEL)}", "sft.max_steps=3", "train.seed_epochs=0.3",
            "data.iteration_prompts=[6]", "loop.iterations=1", "eval.max_prompts=6", "generate.max_new_tokens=6",
            "model.device=cpu"]
    argv = ["demo", "--quick", "--dir", str(tmp_path), "--seeds", "0", "1"] + [a for s in tiny for a in ("--set", s)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for row in ("SFT", "DPO on seed", "SPA iter 1", "mean ± std over seeds [0, 1]", "win rate vs SFT",
                "judge acc"):
        assert row in out
    runs = [d for d in os.listdir(tmp_path / "reverse-v1") if d.startswith("quick")]
    assert len(runs) == 1 and runs[0].startswith("quick-")  # --set overrides: runs of their own, keyed by them
    run_dir = tmp_path / "reverse-v1" / runs[0]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["overrides"] == tiny and summary["mode"] == runs[0] and summary["task"] == "reverse"
    assert summary["seeds"] == [0, 1] and [r["model"] for r in summary["mean_std"]] == \
        ["SFT", "DPO on seed", "SPA iter 1", "returned"]
    for s in ("0", "1"):  # which model each run returns, and why, machine-readable
        sel = summary["selected"][s]
        assert sel["rule"] == "best" and sel["metric"] == LoopConfig().selection_metric
        assert "held-out gold pairs" in sel["reason"]
        picked = [r for r in summary["per_seed"][s] if r["selected"]]
        assert [r["model"] for r in picked] == [["DPO on seed", "SPA iter 1"][sel["iteration"]]]
    returned = [next(r for r in summary["per_seed"][s] if r["selected"])["win_rate"] for s in ("0", "1")]
    assert summary["mean_std"][-1]["win_rate"] == pytest.approx(sum(returned) / 2)
    win = [summary["per_seed"][s][1]["win_rate"] for s in ("0", "1")]
    assert summary["mean_std"][1]["win_rate"] == pytest.approx(sum(win) / 2)
    assert os.path.exists(run_dir / "seed_1" / "iter_1" / "pairs.jsonl")
    # the paper's judge side by side: the same seed DPO (shared, not retrained), its own iterations
    paper = summary["paper_judge"]
    assert [r["model"] for r in paper["mean_std"]] == ["SFT", "DPO on seed", "SPA iter 1", "returned"]
    assert paper["per_seed"]["0"][1] == summary["per_seed"]["0"][1]  # DPO on seed: one model
    paper_cfg = Config.load(str(run_dir / "paper_judge" / "seed_0" / "config.yaml"))
    assert paper_cfg.judge.reference == "init" and paper_cfg.judge.reference_weight == 1.0
    assert "with the paper's judge" in out
    sft = [d for d in os.listdir(tmp_path) if d.startswith("sft-")]  # one SFT model, shared by the seeds
    assert len(sft) == 1 and summary["sft_model"] == str(tmp_path / sft[0] / "sft" / "model")
    assert not os.path.exists(run_dir / "seed_0" / "sft" / "model")
    for noise in ("{'loss'", "'train_runtime'"):  # the Trainer's log dicts go to files, not to the screen
        assert noise not in out
    with open(run_dir / "results.png", "rb") as f:  # the plot beside summary.json
        assert f.read(4) == b"\x89PNG"
    # rerunning re-reads the finished runs
    assert main(argv) == 0
    assert "SPA iter 1" in capsys.readouterr().out

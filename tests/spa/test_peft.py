"""LoRA in the loop (model.peft): config errors, a whole `spa run` on the tiny task whose models are adapters, the
references as views of one set of base weights (pi_init = adapter disabled, pi_{i-1} = the frozen earlier adapter),
`spa merge`, and resume after SIGKILL giving the same run as an uninterrupted one."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from spa import Config, ConfigError
from spa.cli import main
from spa.io import CRASH_ENV, Layout, read_json, read_jsonl
from spa.models import (
    REFERENCE_ADAPTER,
    AdapterView,
    init_model_path,
    is_adapter,
    load_causal_lm,
    load_model,
    load_tokenizer,
    reference_model,
    training_policy,
    training_reference,
)
from spa.scoring import score_sequences

from .conftest import tiny_settings
from .test_loop import ROOT, _results

# no dropout: the first step of a continued adapter then has exactly zero rewards (test_each_iteration_continues...)
LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj", "o_proj"]}


def peft_settings(task, output_dir: str) -> dict:
    """The tiny loop with LoRA, two iterations (no early stop), the paper's judge with the previous iteration as
    reference in iteration 2 (so the judge loads an earlier adapter), a learning rate at which the adapters
    visibly move the model."""
    s = tiny_settings(task, output_dir)
    s["model"]["peft"] = dict(LORA)
    s["train"]["learning_rate"] = 2e-2
    s["loop"].update(iterations=2, patience=0)
    s["judge"].update(reference="previous", token_average=False)
    return s


@pytest.fixture(scope="module")
def peft_run(task, tmp_path_factory):
    """`spa run` through the CLI with model.peft, uninterrupted."""
    cfg = Config.from_dict(peft_settings(task, str(tmp_path_factory.mktemp("peft") / "run")))
    path = os.path.join(os.path.dirname(cfg.output_dir), "c.yaml")
    with open(path, "w") as f:
        f.write(cfg.to_yaml())
    assert main(["run", path]) == 0
    return cfg


def _items(cfg, n: int = 12):
    """(prompt_ids, response_ids) of the first held-out eval pairs, chosen and rejected."""
    tok = load_tokenizer(init_model_path(cfg))
    from spa import data as data_mod

    enc = data_mod.PromptEncoder(tok, cfg.data.max_prompt_length, cfg.data.long_prompts, cfg.data.chat_template)
    pairs = data_mod.load_pairs(cfg.eval.pairs, cfg.eval.pairs_split)[0][:n]
    return [(enc.encode(p["prompt"]), enc.encode_response(p[k])) for p in pairs for k in ("chosen", "rejected")]


def _scores(model, items):
    return score_sequences(model, items, pad_id=0, batch_size=8, impl="torch").double()


# --- config -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("peft, message", [
    ({"rr": 4}, r"model\.peft\.rr is not a peft\.LoraConfig field \(did you mean 'r'\?\)"),
    ({"r": 0}, r"model\.peft\.r must be an integer >= 1, got 0"),
    ({"r": 2.5}, r"model\.peft\.r must be an integer >= 1"),
    ({"lora_alpha": 0}, r"model\.peft\.lora_alpha must be a number > 0"),
    ({"lora_dropout": 1.0}, r"model\.peft\.lora_dropout must be a number in \[0, 1\)"),
    ({"target_modules": ["q_proj", "lm_head"]}, r"model\.peft\.target_modules must not name lm_head"),
    ({"modules_to_save": "lm_head"}, r"model\.peft\.modules_to_save must not name lm_head"),
    ({"target_modules": []}, r"model\.peft\.target_modules must be a module name or a non-empty list"),
    ({"task_type": "SEQ_CLS"}, r"model\.peft\.task_type must be CAUSAL_LM"),
    ({"target_modules": ".*q_proj", "layers_to_transform": [0]},
     r"model\.peft: peft\.LoraConfig refuses these settings: `layers_to_transform` cannot be used"),
    (3, r"model\.peft must be a mapping or null"),
])
def test_config_errors_name_the_key(peft, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        Config.from_dict({"model": {"peft": peft}})
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps({"model": {"peft": peft}}))
    with pytest.raises(ConfigError, match=f"{message}.* in {path}"):
        Config.load(str(path))


@pytest.mark.parametrize("override, message", [
    ("generate.backend=vllm", r"generate\.backend must be hf with model\.peft"),
    ("train.deepspeed=ds.json", r"train\.deepspeed is not supported with model\.peft"),
    ("train.fsdp=full_shard", r"train\.fsdp is not supported with model\.peft"),
])
def test_config_refuses_what_lora_runs_do_not_support(override, message):
    with pytest.raises(ConfigError, match=message):
        Config.from_dict({"model": {"peft": {}}}, [override])


def test_config_accepts_lora_and_explains_it(capsys):
    cfg = Config.from_dict({}, ["model.peft.r=16", "model.peft.lora_alpha=32", "model.peft.target_modules=[q_proj]"])
    assert cfg.model.peft == {"r": 16, "lora_alpha": 32, "target_modules": ["q_proj"]}
    assert Config.from_dict({"model": {"peft": {}}}).model.peft == {}  # peft's defaults
    assert Config.from_dict({}).model.peft is None  # full fine-tuning by default
    assert main(["config", "--explain"]) == 0
    out = capsys.readouterr().out
    assert "model.peft  (a mapping or null; default null)" in out and "spa merge" in out


# --- the loop -----------------------------------------------------------------------------------------------------

def test_run_saves_an_adapter_per_iteration(peft_run):
    lay = Layout(peft_run.output_dir)
    metrics = read_json(lay.metrics)
    assert [s for s in metrics["stages"] if s.endswith("/train")] == ["iter_0/train", "iter_1/train", "iter_2/train"]
    for i in range(3):
        folder = lay.model(i)
        files = set(os.listdir(folder))
        assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= files, files
        assert not files & {"model.safetensors", "pytorch_model.bin", REFERENCE_ADAPTER}, files  # no full weights
        with open(os.path.join(folder, "adapter_config.json")) as f:
            conf = json.load(f)
        assert conf["r"] == 4 and conf["lora_alpha"] == 8 and set(conf["target_modules"]) == {"q_proj", "v_proj",
                                                                                                  "o_proj"}
        assert conf["base_model_name_or_path"] == lay.sft_model  # pi_init
        weights = load_file(os.path.join(folder, "adapter_model.safetensors"))
        assert weights and all("lora_" in k for k in weights)
        assert max(v.abs().max().item() for k, v in weights.items() if "lora_B" in k) > 0  # trained
    assert metrics["stages"]["iter_2/train"]["train/lam"] == 0.25  # DND: the per-step "ref" adapter
    assert os.path.isdir(read_json(lay.selected)["model"])


def test_each_iteration_continues_the_previous_adapter(peft_run):
    """iteration i starts from pi_{i-1}'s adapter (with reference pi_{i-1}), so its first step's rewards are exactly
    0; a fresh adapter against that reference would start with non-zero rewards, since the adapters change the
    model's log-probs."""
    lay = Layout(peft_run.output_dir)
    items = _items(peft_run)
    base = _scores(load_causal_lm(lay.sft_model, peft_run.model), items)
    previous = base
    for i in range(3):
        model_i = _scores(load_model(lay.model(i), peft_run), items)
        assert (model_i - previous).abs().max() > 1e-3, i  # each iteration changed the model
        previous = model_i
        first = read_jsonl(lay.path(f"iter_{i}", "train_log.jsonl"))[0]
        assert first["rewards/chosen"] == 0 and first["rewards/rejected"] == 0, (i, first)
    a0 = load_file(os.path.join(lay.model(0), "adapter_model.safetensors"))
    a1 = load_file(os.path.join(lay.model(1), "adapter_model.safetensors"))
    # lora_A starts random: continuing keeps it close to iteration 0's, a new adapter would draw a new one
    for k, v in a0.items():
        if "lora_A" in k:
            assert (a1[k] - v).norm() < 0.5 * v.norm(), k


def test_reference_views_equal_the_models_they_stand_for(peft_run):
    """pi_init = the adapter disabled equals the base model loaded alone; an earlier iteration loaded as the "ref"
    adapter equals that iteration's model; the policy is unchanged afterwards (active adapter, mode, grads)."""
    lay = Layout(peft_run.output_dir)
    items = _items(peft_run)
    policy = load_model(lay.model(2), peft_run)
    own = _scores(policy, items)
    init = reference_model(peft_run, policy, init_model_path(peft_run), "cpu")
    assert isinstance(init, AdapterView) and init.adapter is None
    base = _scores(load_causal_lm(lay.sft_model, peft_run.model), items)
    torch.testing.assert_close(_scores(init, items), base, rtol=0, atol=1e-5)
    assert (own - base).abs().max() > 1e-3
    earlier = reference_model(peft_run, policy, lay.model(0), "cpu")
    assert earlier.adapter == REFERENCE_ADAPTER
    torch.testing.assert_close(_scores(earlier, items), _scores(load_model(lay.model(0), peft_run), items), rtol=0,
                               atol=1e-5)
    torch.testing.assert_close(_scores(policy, items), own, rtol=0, atol=0)
    assert policy.active_adapter == "default" and not policy.training
    assert not any(p.requires_grad for p in policy.parameters())


def test_training_reference_is_the_starting_model(peft_run):
    """The train stage's reference for iteration 1 is pi_0: the policy's adapter before the first step (precomputed
    log-probs) or a frozen copy of it (per step, DND), which stays put while the policy's adapter trains; only the
    policy's adapter is trainable."""
    lay = Layout(peft_run.output_dir)
    items = _items(peft_run, 4)
    pi_0 = _scores(load_model(lay.model(0), peft_run), items)
    policy = training_policy(peft_run, lay.model(0), "cpu")
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and ".default." in n for n in trainable)
    before_step = training_reference(policy, lay.model(0), per_step=False)
    torch.testing.assert_close(_scores(before_step, items), pi_0, rtol=0, atol=1e-5)
    per_step = training_reference(policy, lay.model(0), per_step=True)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if n in trainable and "lora_B" in n:
                p.add_(0.05)
    torch.testing.assert_close(_scores(per_step, items), pi_0, rtol=0, atol=1e-5)
    assert (_scores(policy, items) - pi_0).abs().max() > 1e-3
    assert {n for n, p in policy.named_parameters() if p.requires_grad} == trainable
    assert policy.training  # the view's eval mode does not leak into training
    modes = []
    hook = policy.get_base_model().register_forward_pre_hook(lambda module, args: modes.append(module.training))
    _scores(per_step, items[:1])
    _scores(policy, items[:1])
    hook.remove()
    assert modes == [False, True]  # the reference runs without dropout, the policy as it was
    fresh = training_policy(peft_run, lay.sft_model, "cpu")  # iteration 0: a new adapter, reference = disabled
    assert training_reference(fresh, lay.sft_model, per_step=True).adapter is None


def test_validation_uses_pi_init_as_reference(peft_run):
    """validation.json (reference: the adapter disabled) equals the metrics computed with pi_init loaded alone."""
    from spa import data as data_mod
    from spa.validation import model_validation, validation_rows

    lay = Layout(peft_run.output_dir)
    tok = load_tokenizer(lay.model(1))
    enc = data_mod.PromptEncoder(tok, peft_run.data.max_prompt_length, peft_run.data.long_prompts,
                                 peft_run.data.chat_template)
    rows = validation_rows(peft_run, enc)
    want = model_validation(load_model(lay.model(1), peft_run), load_causal_lm(lay.sft_model, peft_run.model), enc,
                            rows, peft_run.train.beta, peft_run.judge.batch_size, "auto")
    got = read_json(lay.validation(1))
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-6), k


def test_merge_gives_the_same_log_probs(peft_run, tmp_path, capsys):
    lay = Layout(peft_run.output_dir)
    out = str(tmp_path / "merged")
    assert main(["merge", peft_run.output_dir, "--iteration", "1", "--out", out]) == 0
    assert capsys.readouterr().out.strip() == out
    assert not is_adapter(out) and os.path.exists(os.path.join(out, "model.safetensors"))
    assert os.path.exists(os.path.join(out, "tokenizer.json"))
    items = _items(peft_run)
    merged = _scores(load_causal_lm(out, peft_run.model), items)
    torch.testing.assert_close(merged, _scores(load_model(lay.model(1), peft_run), items), rtol=0, atol=1e-4)
    assert (merged - _scores(load_causal_lm(lay.sft_model, peft_run.model), items)).abs().max() > 1e-3
    # default: the model the run returns
    out2 = str(tmp_path / "selected")
    assert main(["merge", peft_run.output_dir, "--out", out2]) == 0
    assert os.path.exists(os.path.join(out2, "model.safetensors"))
    # an existing model is never replaced silently
    capsys.readouterr()
    assert main(["merge", peft_run.output_dir, "--iteration", "0", "--out", out2]) == 2
    assert f"--out {out2} exists and is not empty" in capsys.readouterr().err
    assert main(["merge", peft_run.output_dir, "--iteration", "0", "--out", out2, "--overwrite"]) == 0


def test_merge_is_float32_and_one_process(peft_run, tmp_path, capsys, monkeypatch):
    """The merge is done in float32 whatever model.dtype says (bf16 weights would round a small update away)."""
    import dataclasses

    from spa.models import merge_adapter

    lay = Layout(peft_run.output_dir)
    cfg = dataclasses.replace(peft_run, model=dataclasses.replace(peft_run.model, dtype="bfloat16"))
    out = merge_adapter(cfg, lay.model(1), str(tmp_path / "m32"))
    merged = load_causal_lm(out, dataclasses.replace(peft_run.model, dtype="auto"))
    assert {p.dtype for p in merged.parameters()} == {torch.float32}
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["merge", peft_run.output_dir, "--out", str(tmp_path / "m2")]) == 2
    assert "spa merge runs in one process" in capsys.readouterr().err


def test_merge_errors(peft_run, tmp_path, capsys):
    assert main(["merge", str(tmp_path), "--out", str(tmp_path / "m")]) == 2
    assert "is not a spa run directory" in capsys.readouterr().err
    assert main(["merge", peft_run.output_dir, "--iteration", "7", "--out", str(tmp_path / "m")]) == 2
    assert "iter_7/model does not exist" in capsys.readouterr().err


def test_resume_after_sigkill(peft_run, task, tmp_path):
    """Killed after a checkpoint of the seed DPO, after a judge shard, and after the checkpoint of iteration 1's
    training (whose reference is the frozen "ref" adapter); each rerun continues, and the run ends as the
    uninterrupted one did."""
    run = Config.from_dict(peft_settings(task, str(tmp_path / "run")))
    path = tmp_path / "c.yaml"
    path.write_text(run.to_yaml())
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    lay = Layout(run.output_dir)
    for crash in ("train:1", "judge:1", "train:1", None):
        env.pop(CRASH_ENV, None)
        if crash:
            env[CRASH_ENV] = crash
        proc = subprocess.run([sys.executable, "-m", "spa.cli", "run", str(path)], env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == (-signal.SIGKILL if crash else 0), f"{crash}: {proc.stderr[-3000:]}"
    assert os.path.exists(lay.model(2)) and is_adapter(lay.model(2))
    got, want = _results(run.output_dir), _results(peft_run.output_dir)
    assert got.keys() == want.keys()
    for k in want:
        if k == "iter_1/generate":
            continue
        assert got[k] == want[k], k
    for i in range(3):
        a = load_file(os.path.join(lay.model(i), "adapter_model.safetensors"))
        b = load_file(os.path.join(Layout(peft_run.output_dir).model(i), "adapter_model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), i

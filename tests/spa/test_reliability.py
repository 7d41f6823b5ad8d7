"""Failures that must stop a run at once with a one-line error naming the key, file, line or stage (and before any
compute), and states that must never be committed: an unknown --until stage, non-finite settings and training
values, a damaged checkpoint, undecodable data, two processes on one output_dir, and the checks made before a run
starts."""

import json
import os
import shutil

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
    ("train.beta=inf", "train.beta"), ("train.beta=.inf", "train.beta"),
    ("train.learning_rate=nan", "train.learning_rate"),
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


# --- 2b. non-finite training values stop the stage; nothing non-finite is committed ---------------------------

def _all_finite(folder: str) -> bool:
    import torch
    from safetensors.torch import load_file

    return all(bool(torch.isfinite(t).all()) for t in load_file(os.path.join(folder, "model.safetensors")).values())



@pytest.fixture
def whole_seed(run_with_sft):
    """run_with_sft training on all 16 seed pairs (no validation hold-out): 4 optimizer steps of batch 4."""
    return run_with_sft.replace(**{"data.validation_size": 0})

def test_exploding_seed_dpo_stops_without_committing(whole_seed, tmp_path, capsys):
    from spa.stages.train import run_train
    from spa.trainer import NonFiniteError

    cfg = whole_seed.replace(**{"train.learning_rate": 1e30})  # one Adam step of 1e30 overflows the next forward
    lay = Layout(cfg.output_dir)
    with pytest.raises(NonFiniteError, match=r"^iter_0/train: non-finite (loss|grad norm|weights) \(.*\) at step "
                                             r"\d of 4"):
        run_train(cfg, 0)
    assert not os.path.exists(lay.model(0)) and not os.path.exists(lay.model(0) + ".tmp")
    assert not os.path.exists(lay.stage_metrics("iter_0", "train"))
    partial = lay.partial("iter_0", "train")
    checkpoints = [d for d in os.listdir(partial) if d.startswith("checkpoint-")] if os.path.isdir(partial) else []
    assert all(_all_finite(os.path.join(partial, d)) for d in checkpoints)  # no NaN checkpoint to resume from
    # the CLI says it in one line
    path = _write_config(tmp_path, cfg)
    assert main(["train", path, "--iteration", "0"]) == 1
    err = capsys.readouterr().err
    assert "spa: error: iter_0/train: non-finite" in err  # (after the progress bars' carriage returns)
    assert "Traceback" not in err


def test_nan_loss_names_the_step(whole_seed, monkeypatch):
    from spa.stages.train import run_train
    from spa.trainer import NonFiniteError, SPATrainer

    compute_loss = SPATrainer.compute_loss

    def nan_at_step_3(self, model, inputs, *args, **kwargs):
        loss = compute_loss(self, model, inputs, *args, **kwargs)
        return loss * float("nan") if self.state.global_step == 2 else loss

    monkeypatch.setattr(SPATrainer, "compute_loss", nan_at_step_3)
    with pytest.raises(NonFiniteError, match=r"^iter_0/train: non-finite loss \(nan\) at step 3 of 4"):
        run_train(whole_seed, 0)
    assert not os.path.exists(Layout(whole_seed.output_dir).model(0))


def test_exploding_sft_stops_without_committing(tiny_cfg):
    from spa.stages.sft import run_sft
    from spa.trainer import NonFiniteError

    cfg = tiny_cfg.replace(**{"sft.learning_rate": 1e30})
    with pytest.raises(NonFiniteError, match=r"^sft: non-finite .* at step \d of 4"):
        run_sft(cfg)
    assert not os.path.exists(Layout(cfg.output_dir).sft_model)


def test_non_finite_weights_are_never_committed(whole_seed, monkeypatch):
    """Weights that turn NaN without a non-finite loss (here: after the last step) are caught before the commit."""
    import torch

    from spa.stages.train import run_train
    from spa.trainer import NonFiniteError, SPATrainer

    train = SPATrainer.train

    def poison_after_training(self, *args, **kwargs):
        out = train(self, *args, **kwargs)
        with torch.no_grad():
            next(self.model.parameters()).view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(SPATrainer, "train", poison_after_training)
    with pytest.raises(NonFiniteError, match=r"^iter_0/train: non-finite weights \(model\.embed_tokens\.weight\) "
                                             r"at step 4 of 4"):
        run_train(whole_seed, 0)
    assert not os.path.exists(Layout(whole_seed.output_dir).model(0))


# --- 4. a damaged newest checkpoint -------------------------------------------------------------------------

def test_damaged_newest_checkpoint_is_skipped(whole_seed, monkeypatch, caplog):
    """An interrupted seed DPO leaves checkpoint-2 and checkpoint-4; checkpoint-4's trainer_state.json is then
    emptied (as a crash while writing it leaves it): the rerun warns and resumes from checkpoint-2."""
    import spa.trainer
    from spa.stages.train import run_train

    saves = []

    def interrupt_at_second_save(unit):
        saves.append(unit)
        if len(saves) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(spa.trainer, "crash_point", interrupt_at_second_save)
    with pytest.raises(KeyboardInterrupt):
        run_train(whole_seed, 0)
    monkeypatch.undo()
    lay = Layout(whole_seed.output_dir)
    partial = lay.partial("iter_0", "train")
    assert sorted(os.listdir(partial)) >= ["checkpoint-2", "checkpoint-4"]
    open(os.path.join(partial, "checkpoint-4", "trainer_state.json"), "w").close()
    with caplog.at_level("WARNING", logger="spa"):
        run_train(whole_seed, 0)
    assert os.path.isdir(lay.model(0))
    assert any("checkpoint-4" in r.message and "trainer_state.json" in r.message for r in caplog.records)


def test_last_checkpoint_choice(tmp_path, caplog):
    from spa.trainer import last_checkpoint

    def checkpoint(step, state='{"global_step": 1}', weights=True):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        if state is not None:
            (d / "trainer_state.json").write_text(state)
        if weights:
            (d / "model.safetensors").write_bytes(b"x")
        return str(d)

    assert last_checkpoint(str(tmp_path)) is None
    good = checkpoint(2)
    checkpoint(10)
    checkpoint(4, state=None)  # being written when the run stopped: skipped silently
    checkpoint(6, weights=False)
    checkpoint(8, state='{"global_st')
    (tmp_path / "checkpoint-10" / "trainer_state.json").write_text("[]")
    (tmp_path / "checkpoint-12.tmp").mkdir()
    with caplog.at_level("WARNING", logger="spa"):
        assert last_checkpoint(str(tmp_path)) == good
    text = " ".join(r.message for r in caplog.records)
    assert "checkpoint-10" in text and "checkpoint-8" in text and "checkpoint-6" in text and "model weights" in text
    assert "checkpoint-4" not in text


# --- 3. one process per output directory --------------------------------------------------------------------

HOLD_LOCK = """
import sys, time
from spa.io import output_dir_lock
with output_dir_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def test_second_process_on_one_output_dir_fails_at_once(tiny_cfg, tmp_path, capsys, monkeypatch):
    import socket
    import subprocess
    import sys

    import spa.loop
    from spa.io import OutputDirLocked, output_dir_lock

    ran = []
    monkeypatch.setattr(spa.loop, "run_stage", lambda cfg, stage: ran.append(stage.name))
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, tiny_cfg.output_dir], env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        path = _write_config(tmp_path, tiny_cfg)
        for argv in (["run", path], ["sft", path], ["train", path, "--iteration", "0"]):
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert f"spa: error: {tiny_cfg.output_dir} is in use by another spa process (pid {holder.pid} on host " \
                   f"{socket.gethostname()}" in err
        with pytest.raises(OutputDirLocked, match=rf"pid {holder.pid}"):
            spa.loop.run(tiny_cfg)
        assert ran == [] and not os.path.exists(Layout(tiny_cfg.output_dir).config)
    finally:
        holder.kill()
        holder.wait()
    # the kernel released the killed holder's lock: the next process gets it (and may nest it)
    with output_dir_lock(tiny_cfg.output_dir):
        with output_dir_lock(tiny_cfg.output_dir):
            with open(os.path.join(tiny_cfg.output_dir, ".lock")) as f:
                assert f.read() == f"pid {os.getpid()} on host {socket.gethostname()}\n"
    spa.loop.run(tiny_cfg)
    assert ran[:2] == ["sft", "sft/eval"]


# --- 6. everything checked before any compute ---------------------------------------------------------------

@pytest.mark.parametrize("override, match", [
    ("train.kernel_impl=cuda", r"train\.kernel_impl 'cuda' cannot run here: .*; usable here: auto, "),
    ("train.kernel_impl=cpp", r"train\.kernel_impl must be 'auto' or one of \['torch', 'cpu', 'triton', 'cuda'\], "
                              r"got 'cpp' \(did you mean 'cpu'\?\)"),
    ("train.trainer_args={max_grad_nrom: 1.0}", r"train\.trainer_args: 'max_grad_nrom' is not a transformers\."
                                                r"TrainingArguments field \(did you mean 'max_grad_norm'\?\)"),
    ("eval.oracle=no_such_module_xyz:score", r"eval\.oracle 'no_such_module_xyz:score': cannot import"),
    ("eval.oracle=spa.tasks.reverse:nope", r"eval\.oracle 'spa\.tasks\.reverse:nope': spa\.tasks\.reverse has no "
                                           r"callable 'nope'$"),
    ("eval.oracle=spa.tasks.reverse:oracel", r"spa\.tasks\.reverse has no callable 'oracel' \(did you mean "
                                             r"spa\.tasks\.reverse:oracle\?\)"),
    ("judge.function=spa.tasks.reverse:nope", r"judge\.function 'spa\.tasks\.reverse:nope'"),
    ("data.seed=/nonexistent/prefs.jsonl", r"data\.seed: /nonexistent/prefs\.jsonl does not exist"),
    ("eval.pairs=missing_pairs.jsonl", r"eval\.pairs: missing_pairs\.jsonl does not exist"),
    ("sft.data=./missing_folder", r"sft\.data: \./missing_folder does not exist"),
    ("data.iteration_prompt_files=[missing_iter1.jsonl]",
     r"data\.iteration_prompt_files\[0\]: missing_iter1\.jsonl does not exist"),
    ("data.seed=null", r"data\.seed is not set"),
    ("train.lr_scheduler_type=cosin", r"train\.lr_scheduler_type must be a transformers scheduler name \(did you "
                                      r"mean 'cosine'\?\)"),
    ("sft.lr_scheduler_type=nope", r"sft\.lr_scheduler_type must be a transformers scheduler name"),
    ("train.report_to=[tensorbord]", r"train\.report_to: 'tensorbord' is not a transformers integration"),
    ("model.device=cuda:0", r"model\.device is 'cuda:0' but no CUDA device is visible"),
    ("model.device=gpu", r"model\.device 'gpu' is not a device"),
])
def test_preflight_refuses_before_any_compute(tiny_cfg, tmp_path, capsys, monkeypatch, override, match):
    import torch

    import spa.loop

    if "cuda" in override and torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    ran = []
    monkeypatch.setattr(spa.loop, "run_stage", lambda cfg, stage: ran.append(stage.name))
    monkeypatch.delenv("SPA_KERNELS_IMPL", raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = Config.from_dict(tiny_cfg.to_dict(), [override])
    with pytest.raises(ConfigError, match=match):
        spa.loop.run(cfg)
    path = _write_config(tmp_path, cfg)
    commands = [["run", path], ["train", path, "--iteration", "0"]]
    if override != "data.seed=null":  # evaluating pi_init does not need the seed
        commands.append(["eval", path, "--sft"])
    for argv in commands:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("spa: error: ") and err.count("\n") == 1, err
    assert ran == [] and not os.path.exists(cfg.output_dir)


BAD_ROWS = {  # file -> its lines; each bad at the line the message names
    "bad_seed.jsonl": ['{"prompt": "a", "chosen": "b", "rejected": "c"}', '{"prompt": "d", "chosen": "e", "rej'],
    "bad_prompts.jsonl": ['{"prompt": "a"}', '{"promt": "b"}'],
    "bad_iter.jsonl": ['{"prompt": 7}'],
    "bad_demos.jsonl": ['{"prompt": "a", "respons": "b"}'],
}


@pytest.mark.parametrize("override, match", [
    ("data.seed=bad_seed.jsonl", r"data\.seed: bad_seed\.jsonl:2: not valid JSON"),
    ("eval.prompts=bad_prompts.jsonl", r"eval\.prompts: bad_prompts\.jsonl:2: missing field 'prompt' \(or "
                                       r"'messages'\); has promt"),
    ("data.iteration_prompt_files=[bad_iter.jsonl]",
     r"data\.iteration_prompt_files\[0\]: bad_iter\.jsonl:1: field 'prompt' must be a string"),
    ("sft.data=bad_demos.jsonl", r"sft\.data: bad_demos\.jsonl:1: missing field\(s\) 'completion'"),
    ("data.iteration_prompts=[100000]", r"data\.iteration_prompts asks for 100000 prompts"),
    ("data.seed=prefs.jsnol", r"data\.seed: prefs\.jsnol does not exist and is not a hub dataset name "
                              r"\('owner/name'\); did you mean 'prefs\.jsonl'\?"),
    ("eval.pairs=someone/no_such_dataset_xyz", r"eval\.pairs: someone/no_such_dataset_xyz: not a local "
                                               r"\.jsonl/\.json file, and datasets\.load_dataset\("
                                               r"'someone/no_such_dataset_xyz', split='test_prefs'\) failed"),
])
def test_malformed_data_fails_before_any_compute(tiny_cfg, task, tmp_path, capsys, monkeypatch, override, match):
    """Every row of every data source is read before the first stage: a bad line (or a misspelt file name, or a hub
    dataset that cannot be loaded) is one line naming the key, the file, the line and the field, not an error
    after the SFT model was trained and evaluated."""
    import spa.loop

    ran = []
    monkeypatch.setattr(spa.loop, "run_stage", lambda cfg, stage: ran.append(stage.name))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    for name, lines in BAD_ROWS.items():
        (tmp_path / name).write_text("\n".join(lines) + "\n")
    shutil.copy(task["prefs"], tmp_path / "prefs.jsonl")
    cfg = Config.from_dict(tiny_cfg.to_dict(), [override])
    with pytest.raises(ConfigError, match=match):
        spa.loop.run(cfg)
    assert main(["run", _write_config(tmp_path, cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spa: error: ") and err.count("\n") == 1, err
    assert ran == [] and not os.path.exists(cfg.output_dir)


def test_stage_alone_reads_only_its_own_data(tiny_cfg, tmp_path, monkeypatch):
    """A stage run alone checks the data it reads, not the rest: evaluating pi_init needs no valid seed."""
    from spa.preflight import preflight

    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad_seed.jsonl").write_text("\n".join(BAD_ROWS["bad_seed.jsonl"]) + "\n")
    cfg = Config.from_dict(tiny_cfg.to_dict(), ["data.seed=bad_seed.jsonl"])
    preflight(cfg, ["sft/eval"])
    preflight(cfg, ["sft"])
    for stage in ("iter_0/train", "iter_1/generate", "iter_0/validate"):
        with pytest.raises(ConfigError, match=r"data\.seed: bad_seed\.jsonl:2"):
            preflight(cfg, [stage])


def test_oracle_module_that_fails_to_import_is_a_config_error(tiny_cfg, tmp_path, capsys, monkeypatch):
    """A syntax error (or any exception) in the oracle's module: one line naming the key, the file and the line."""
    import spa.loop

    ran = []
    monkeypatch.setattr(spa.loop, "run_stage", lambda cfg, stage: ran.append(stage.name))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "broken_oracle_xyz.py").write_text("def score(prompt, response)\n    return 1.0\n")
    cfg = Config.from_dict(tiny_cfg.to_dict(), ["eval.oracle=broken_oracle_xyz:score"])
    assert main(["run", _write_config(tmp_path, cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spa: error: eval.oracle 'broken_oracle_xyz:score': importing 'broken_oracle_xyz' failed: "
                          "SyntaxError") and "broken_oracle_xyz.py, line 1" in err and err.count("\n") == 1, err
    assert ran == [] and not os.path.exists(cfg.output_dir)


def test_oracle_calls_are_checked():
    """An oracle that raises, returns a non-number or NaN: an OracleError naming the key, the prompt and the response
    (NaN would otherwise count as a loss in every win rate, silently)."""
    import sys
    import types

    from spa.oracle import OracleError, load_oracle

    mod = types.ModuleType("flaky_oracle_xyz")
    mod.score = lambda p, r: {"": 1 / len(r), "none": None, "nan": float("nan"), "int": 1}.get(r, 0.5)
    sys.modules["flaky_oracle_xyz"] = mod
    try:
        oracle = load_oracle("flaky_oracle_xyz:score")
        assert oracle("Shift: abc", "bcd") == 0.5 and type(oracle("Shift: abc", "int")) is float
        with pytest.raises(OracleError, match=r"eval\.oracle 'flaky_oracle_xyz:score' raised ZeroDivisionError: .*"
                                              r"\(on prompt 'Shift: abc', response ''\)") as e:
            oracle("Shift: abc", "")
        assert isinstance(e.value.__cause__, ZeroDivisionError)  # the oracle's own traceback stays attached
        with pytest.raises(OracleError, match=r"returned None, not a number \(on prompt 'Shift: abc', response 'none'"):
            oracle("Shift: abc", "none")
        with pytest.raises(OracleError, match=r"judge\.function 'flaky_oracle_xyz:score' returned NaN"):
            load_oracle("flaky_oracle_xyz:score", "judge.function")("Shift: abc", "nan")
    finally:
        del sys.modules["flaky_oracle_xyz"]


def test_preflight_accepts_the_tiny_config_and_checks_spa_kernels_impl(tiny_cfg, monkeypatch):
    from spa.preflight import preflight

    preflight(tiny_cfg)
    preflight(tiny_cfg.replace(**{"train.kernel_impl": "torch", "train.trainer_args": {"max_grad_norm": 0.5}}))
    monkeypatch.setenv("SPA_KERNELS_IMPL", "cuda")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"SPA_KERNELS_IMPL \(which replaces train\.kernel_impl=auto\) 'cuda'"):
            preflight(tiny_cfg)
    cfg = tiny_cfg.replace(**{"sft.enabled": False})  # pi_init must then be named
    with pytest.raises(ConfigError, match=r"model\.name_or_path is not set"):
        preflight(cfg)


# --- 7. an oracle module in the current directory -----------------------------------------------------------

CONSOLE_SCRIPT = """
import sys
from spa.cli import main
sys.exit(main())
"""


def test_console_script_finds_an_oracle_module_in_the_working_directory(sft_run, task, tmp_path):
    """The `spa` console script's sys.path holds the script's folder, not the working directory (unlike python -m):
    eval.oracle: my_oracle:score with my_oracle.py in the working directory must still import."""
    import shutil
    import subprocess
    import sys

    work, bin_dir = tmp_path / "work", tmp_path / "bin"
    work.mkdir()
    bin_dir.mkdir()
    (bin_dir / "spa_script.py").write_text(CONSOLE_SCRIPT)
    (work / "my_oracle.py").write_text("def score(prompt, response):\n    return float(len(response))\n")
    settings = tiny_settings(task, str(work / "run"))
    settings["eval"].update(oracle="my_oracle:score", pairs=None, max_prompts=4)
    cfg = Config.from_dict(settings)
    shutil.copytree(os.path.join(sft_run, "sft"), os.path.join(cfg.output_dir, "sft"))
    (work / "c.yaml").write_text(cfg.to_yaml())
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(bin_dir / "spa_script.py"), "eval", "c.yaml", "--sft"], cwd=work,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in open(Layout(cfg.output_dir).eval_samples("sft"))]
    assert len(rows) == 4 and all(r["oracle"] == [float(len(r["responses"][0]))] for r in rows)  # my_oracle's


# --- 8. thread count --------------------------------------------------------------------------------------------

@pytest.fixture
def restore_threads():
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_thread_count_default_and_pinning(monkeypatch, restore_threads):
    import torch

    import spa.cli
    from spa.cli import set_threads

    monkeypatch.delenv("SPA_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(spa.cli, "available_cpus", lambda: 3)
    torch.set_num_threads(8)  # torch counts the host's cores; a container may have fewer CPUs
    assert set_threads() == 3 and torch.get_num_threads() == 3
    torch.set_num_threads(2)
    assert set_threads() == 2  # never more than torch's own default
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    torch.set_num_threads(5)  # as torch reads OMP_NUM_THREADS at start
    assert set_threads() == 5  # the user's setting wins
    monkeypatch.setenv("SPA_NUM_THREADS", "1")
    assert set_threads() == 1 and torch.get_num_threads() == 1
    monkeypatch.setenv("SPA_NUM_THREADS", "two")
    with pytest.raises(ConfigError, match="SPA_NUM_THREADS must be a positive integer, got 'two'"):
        set_threads()


def test_available_cpus_reads_the_cgroup_quota(tmp_path, monkeypatch):
    import spa.cli
    from spa.cli import _cgroup_cpu_limit, available_cpus

    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert _cgroup_cpu_limit(str(tmp_path)) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert _cgroup_cpu_limit(str(tmp_path)) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert _cgroup_cpu_limit(str(v1)) == 2.0
    monkeypatch.setattr(spa.cli, "_cgroup_cpu_limit", lambda: 0.5)
    assert available_cpus() == 1
    monkeypatch.setattr(spa.cli, "_cgroup_cpu_limit", lambda: None)
    assert available_cpus() == len(os.sched_getaffinity(0))

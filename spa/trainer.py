"""The transformers.Trainer subclasses of the sft and train stages, and what they share (logging via report_to,
gradient accumulation, bf16, gradient checkpointing, checkpoints, DeepSpeed / FSDP configs come from transformers).

SPATrainer: DPO-family training on preference pairs, built on spa_kernels.integrations.hf's PreferenceLossMixin.
Log-probs come from spa_kernels' fused head (linear_sequence_logprobs, or linear_spa_sequence_logprobs for de-coupled
noise detection) through the model's own forward and its lm_head module, so [batch, seq, vocab] logits never exist
and logit scaling, softcapping, bias, tied weights and FSDP / ZeRO-3 gathering are handled where the drop-in
trainers handle them. Its inputs: tokenize_pairs -> ListDataset -> PairCollator.
SFTTrainer: the causal-LM loss on response tokens (SFTCollator).
Both stop at the first non-finite loss, gradient norm or weight (FiniteGuard), show one labelled progress bar
(StageProgress), and resume from the last complete checkpoint (last_checkpoint); training_arguments builds their
TrainingArguments from the config, finish_stage commits the stage's model folder.
The stages that run them: spa.stages.sft, spa.stages.train.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import math
import os
import re
from collections import defaultdict

import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

import spa_kernels as sk
from spa_kernels import preference_margins
from spa_kernels.integrations.hf import (
    PreferenceLossMixin,
    ensure_logprob_head,
    extrapolated_preference_logps,
    reference_logps,
    sequence_logprobs,
)

from . import data as data_mod
from . import distributed as dist
from .io import atomic_dir, atomic_write_json, atomic_write_jsonl, commit_dir, crash_point, remove_partial
from .models import drop_reference_adapter, resolve_device
from .refine import NoiseDetector, refine_alpha
from .scoring import pad_sequences

logger = logging.getLogger("spa")

REFINE_STATE = "spa_refine_state.json"


class ListDataset(Dataset):
    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def tokenize_pairs(pairs: list[dict], enc: data_mod.PromptEncoder, max_length: int) -> tuple[list[dict], dict]:
    """Features {prompt_ids, chosen_ids, rejected_ids (+ margin_score)}; a response that does not fit max_length
    after its prompt is cut at the end; a prompt leaving < 1 response token is skipped. Returns counts too."""
    out, cut, skipped = [], 0, 0
    for p in pairs:
        ids = enc.encode(p["prompt"])
        if ids is None or len(ids) >= max_length:
            skipped += 1
            continue
        room = max_length - len(ids)
        feats = {"prompt_ids": ids}
        for k in ("chosen", "rejected"):
            r = enc.encode_response(p[k])
            if len(r) > room:
                cut += 1
                r = r[:room]
            feats[f"{k}_ids"] = r
        if "score_chosen" in p and "score_rejected" in p:
            feats["score_margin"] = p["score_chosen"] - p["score_rejected"]
        out.append(feats)
    return out, {**enc.metrics(), "train/pairs_skipped_long": skipped, "train/responses_truncated": cut}


class PairCollator:
    """[2B, T] batch, chosen rows first then rejected (as spa_kernels, TRL and Liger expect), right padded, labels
    aligned with input_ids (the responses; -100 elsewhere); ref_chosen_logps / ref_rejected_logps [B] and
    score_margin [B] when the features have them."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, feats: list[dict]) -> dict:
        items = [(f["prompt_ids"], f["chosen_ids"]) for f in feats] + [(f["prompt_ids"], f["rejected_ids"])
                                                                          for f in feats]
        batch = pad_sequences(items, self.pad_id, "cpu")
        batch.pop("response_mask")
        if "ref_chosen" in feats[0]:
            batch["ref_chosen_logps"] = torch.tensor([f["ref_chosen"] for f in feats], dtype=torch.float32)
            batch["ref_rejected_logps"] = torch.tensor([f["ref_rejected"] for f in feats], dtype=torch.float32)
        if "score_margin" in feats[0]:
            batch["score_margin"] = torch.tensor([f["score_margin"] for f in feats], dtype=torch.float32)
        return batch


class SFTCollator:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, feats):
        batch = pad_sequences([(f["prompt_ids"], f["response_ids"]) for f in feats], self.pad_id, "cpu")
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": batch["labels"]}


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss, gradient norm or weight; the stage stopped and saved nothing from there."""


def nonfinite_parameters(model) -> list[str]:
    """Names of the parameters holding an inf or a NaN (one device sync for all of them)."""
    params = [(n, p) for n, p in model.named_parameters() if p.numel()]
    if not params:
        return []
    device = params[0][1].device
    ok = torch.stack([torch.isfinite(p.detach()).all().to(device) for _, p in params]).cpu()
    return [] if bool(ok.all()) else [n for (n, _), good in zip(params, ok.tolist()) if not good]


class FiniteGuard:
    """Mixin for a transformers.Trainer: stops the stage with NonFiniteError (naming `stage` and the step) at the
    first non-finite loss (checked every step, before the Trainer's NaN filter would hide it), gradient norm (at
    every logging step) or weight (before every checkpoint, and in _finish before the model is committed), so no
    checkpoint and no model folder ever holds one."""

    stage = "train"

    def _nonfinite(self, what: str, value, step: int | None = None) -> NonFiniteError:
        step = self.state.global_step if step is None else step
        total = f" of {self.state.max_steps}" if self.state.max_steps > 0 else ""
        return NonFiniteError(f"{self.stage}: non-finite {what} ({value}) at step {step}{total}; stopped before "
                              "saving anything from this step (lower the learning rate, check the data)")

    def training_step(self, model, inputs, *args, **kwargs):
        loss = super().training_step(model, inputs, *args, **kwargs)
        if not bool(torch.isfinite(loss).all()):  # the Trainer syncs on this value every step anyway
            raise self._nonfinite("loss", float(loss.float().mean()), self.state.global_step + 1)
        return loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        for k in ("loss", "grad_norm"):
            v = logs.get(k)
            if isinstance(v, (int, float)) and not math.isfinite(v):
                raise self._nonfinite(k.replace("_", " "), v)
        super().log(logs, *args, **kwargs)

    def check_weights(self) -> None:
        bad = nonfinite_parameters(self.model)
        if bad:
            raise self._nonfinite("weights", ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else ""))

    def _save_checkpoint(self, model, trial):
        self.check_weights()
        super()._save_checkpoint(model, trial)

    def _issue_warnings_after_load(self, load_result) -> None:
        # A checkpoint of a model with tied weights (lm_head.weight = embed_tokens.weight) stores the shared tensor
        # once, so resuming reports the other name as missing although nothing is: re-tie and drop those names.
        tied = tied_parameter_names(self.model)
        benign = [k for k in load_result.missing_keys if k in tied]
        if benign:
            self.model.tie_weights()
            load_result = load_result._replace(missing_keys=[k for k in load_result.missing_keys if k not in tied])
        super()._issue_warnings_after_load(load_result)


def tied_parameter_names(model) -> set[str]:
    """Names of parameters that share their tensor with another parameter of the model (tied weights)."""
    by_tensor: dict[tuple, list[str]] = defaultdict(list)
    for name, p in model.named_parameters(remove_duplicate=False):
        by_tensor[(p.data_ptr(), p.shape, p.device)].append(name)
    return {n for names in by_tensor.values() if len(names) > 1 for n in names}


class StageProgress(ProgressCallback):
    """The Trainer's progress bar, labelled with the stage ("train iter_1") and the last logged loss, in place of
    transformers' ProgressCallback / PrinterCallback, which print every log dict to stdout. The logs themselves
    go to the stage's log file (iter_<i>/train_log.jsonl, sft/sft_log.jsonl)."""

    def __init__(self, desc: str, disable: bool = False):
        super().__init__()
        self.desc, self.disable = desc, disable

    def on_train_begin(self, args, state, control, **kwargs):
        from tqdm.auto import tqdm

        if state.is_world_process_zero:
            self.training_bar = tqdm(total=state.max_steps, desc=self.desc, dynamic_ncols=True, leave=False,
                                     unit="step", disable=self.disable)
        self.current_step = 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs and "loss" in logs:
            self.training_bar.set_postfix(loss=f"{logs['loss']:.4g}", refresh=False)
        logger.debug("%s: %s", self.desc, logs)


def quiet_progress(trainer: Trainer, desc: str) -> Trainer:
    """Replaces the Trainer's printing callbacks by a StageProgress bar labelled `desc`."""
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(StageProgress(desc, disable=bool(trainer.args.disable_tqdm)))
    return trainer


class SFTTrainer(FiniteGuard, Trainer):
    """transformers.Trainer (causal-LM loss) with the non-finite guards."""


class SPATrainer(FiniteGuard, PreferenceLossMixin, Trainer):
    """The train stage's transformers.Trainer: spa_kernels.integrations.hf's PreferenceLossMixin (log-probs through
    the fused head, TRL's metric names, averaged over steps and processes) with SPA's losses and guards.

    loss_type: "sigmoid" (DPO), "spa" (self-refined; needs `detector`, optional `lam` for DND), "dlma" (margin from
    the batch's score_margin). With lam, `ref_model` gives the reference hidden states per step; otherwise the batch
    carries precomputed ref_chosen_logps / ref_rejected_logps. Logs refine/... besides TRL's names for the spa
    loss."""

    def __init__(self, *args, loss_type: str = "sigmoid", beta: float = 0.1, ref_model=None, lam: float | None = None,
                 detector: NoiseDetector | None = None, refine_alpha: float = 0.1, refine_warmup: float = 0.2,
                 dlma_gamma: float = 0.2, kernel_impl: str = "auto", **kwargs):
        if loss_type == "spa" and detector is None:
            raise ValueError("loss_type='spa' needs a NoiseDetector")
        if lam is not None and ref_model is None:
            raise ValueError("lam (DND) needs ref_model: the reference hidden states are computed per step")
        model = kwargs["model"] if "model" in kwargs else args[0]
        ensure_logprob_head(model, kernel_impl)  # before the Trainer wraps the model
        super().__init__(*args, **kwargs)
        if ref_model is not None:
            ensure_logprob_head(ref_model, kernel_impl)
        self.loss_type, self.beta, self.ref_model, self.lam = loss_type, beta, ref_model, lam
        self.detector, self.alpha, self.refine_warmup = detector, refine_alpha, refine_warmup
        self.dlma_gamma, self.kernel_impl = dlma_gamma, kernel_impl
        self.preference_options = dict(beta=beta, loss_type=loss_type, impl=kernel_impl)

    def preference_step(self, model, inputs):
        impl = self.kernel_impl
        if self.lam is not None:
            out = extrapolated_preference_logps(model, self.ref_model, inputs, lam=self.lam, impl=impl)
            logps, ref, ext = out.logps, out.ref_logps, out.extrapolated_logps
        else:
            logps = sequence_logprobs(model, inputs, impl=impl).logps
            ref, ext = torch.cat(reference_logps(model, inputs, self.ref_model, impl=impl)), None
        pc, pr = logps.chunk(2)
        rc, rr = ref.to(logps.device, logps.dtype).chunk(2)
        kw, extra = {}, {}
        if self.loss_type == "spa":
            margins = preference_margins(*(ext.chunk(2) if ext is not None else (pc, pr)), rc, rr, self.beta)
            noisy, threshold = self._detect_noise(margins)
            a = refine_alpha(self.state.global_step, max(self.state.max_steps, 1), self.alpha, self.refine_warmup)
            kw = {"noisy": noisy, "refine_alpha": a}
            extra = {"refine/threshold": threshold, "refine/alpha": a, "refine/margin": margins.mean().item()}
        elif self.loss_type == "dlma":
            kw = {"margin": sk.dlma_margin(inputs["score_margin"].to(pc.device), gamma=self.dlma_gamma)}
        out = sk.preference_loss(pc, pr, rc, rr, beta=self.beta, loss_type=self.loss_type, **kw)
        return dataclasses.replace(out, chosen_logps=pc.detach(), rejected_logps=pr.detach()), extra

    def _detect_noise(self, margins: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The detector on the whole step's margins: with several processes, every process's batch in rank order
        (the accelerate data loader gives process r the r-th consecutive slice of the global batch), so the window,
        the threshold and the noisy pairs are those of one process on the global batch; returns this process's
        rows."""
        world = self.accelerator.num_processes
        if world == 1:
            return self.detector(margins)
        noisy, threshold = self.detector(self.accelerator.gather(margins.detach().contiguous()))
        return noisy.chunk(world)[self.accelerator.process_index].to(margins.device), threshold

    def _save_checkpoint(self, model, trial):
        # The detector's window is written before the Trainer's files; a checkpoint counts as complete only once
        # trainer_state.json (written last by the Trainer) exists, so the two cannot disagree.
        self.check_weights()  # before any file of the checkpoint
        if self.detector is not None:
            folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, REFINE_STATE), "w") as f:
                json.dump(self.detector.state_dict(), f)
        super()._save_checkpoint(model, trial)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, REFINE_STATE)
        if self.detector is not None and os.path.exists(path):
            with open(path) as f:
                self.detector.load_state_dict(json.load(f))


class CrashPointCallback(TrainerCallback):
    """Lets SPA_CRASH_AFTER=<unit>:<n> kill the process right after the n-th checkpoint (crash-safety tests)."""

    def __init__(self, unit: str):
        self.unit = unit

    def on_save(self, args, state, control, **kwargs):
        crash_point(self.unit)

# Model weights as Trainer.save_model writes them (full, sharded, PEFT adapter), or DeepSpeed / FSDP state folders.
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
            "adapter_model.safetensors", "adapter_model.bin", "global_step*", "pytorch_model_fsdp_*")


def _checkpoint_problem(folder: str) -> str | None:
    """Why a checkpoint whose trainer_state.json exists cannot be resumed from, or None."""
    try:
        with open(os.path.join(folder, "trainer_state.json"), encoding="utf-8") as f:
            state = json.load(f)
        if not isinstance(state, dict) or "global_step" not in state:
            raise ValueError("no global_step in it")
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return f"its trainer_state.json does not parse ({e})"
    if not any(glob.glob(os.path.join(folder, w)) for w in _WEIGHTS):
        return "its model weights are missing"
    return None


def uneven_last_batch(pairs: int, batch_size: int, world: int) -> str | None:
    """Why a data-parallel run's training differs from one process's, or None: accelerate fills a short last global
    batch with rows from the epoch's start where a single process trains on a smaller last batch."""
    if world <= 1 or pairs % batch_size == 0:
        return None
    return (f"{pairs} pairs are not a multiple of train.batch_size {batch_size}: with {world} processes, accelerate "
            f"fills the last batch of each epoch with {batch_size - pairs % batch_size} pairs from the epoch's start, "
            "so training differs from a 1-process run (a pair count that is a multiple of the batch, e.g. through "
            "data.seed_size, matches it)")


def resumed_step(checkpoint: str | None, stage: str) -> int:
    """The step a Trainer resumes from (0 without a checkpoint); says so on the console (main process)."""
    if checkpoint is None:
        return 0
    step = int(os.path.basename(checkpoint).rsplit("-", 1)[1])
    if dist.is_main():
        logger.info("%s: resuming from %s (step %d)", stage, checkpoint, step)
    return step


def last_checkpoint(folder: str) -> str | None:
    """The newest complete Trainer checkpoint in folder. trainer_state.json is written last, so a checkpoint without
    it was being written when the run stopped and is skipped silently; one whose trainer_state.json does not parse
    or whose model weights are missing is skipped with a warning naming it, in favour of the previous one."""
    steps = []
    for d in glob.glob(os.path.join(folder, "checkpoint-*")):
        m = re.fullmatch(r"checkpoint-(\d+)", os.path.basename(d))
        if m and os.path.isdir(d) and os.path.exists(os.path.join(d, "trainer_state.json")):
            steps.append((int(m.group(1)), d))
    for _, d in sorted(steps, reverse=True):
        problem = _checkpoint_problem(d)
        if problem is None:
            return d
        logger.warning("skipping checkpoint %s: %s; resuming from an earlier one", d, problem)
    return None


def training_arguments(out_dir: str, cfg, *, batch_size: int, per_device: int | None, lr: float, epochs: float,
                   scheduler: str, warmup: float, weight_decay: float, max_steps: int = -1):
    t = cfg.train
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by accelerate / torchrun launchers
    pd = per_device or max(1, batch_size // world)
    if batch_size % (pd * world):
        raise ValueError(f"batch size {batch_size} is not a multiple of per-device batch {pd} x {world} "
                         "processes")
    kw = dict(output_dir=out_dir, per_device_train_batch_size=pd,
              gradient_accumulation_steps=batch_size // (pd * world), learning_rate=lr, num_train_epochs=epochs,
              max_steps=max_steps, lr_scheduler_type=scheduler, warmup_steps=warmup, weight_decay=weight_decay,
              logging_steps=t.logging_steps, save_strategy="steps", save_steps=t.save_steps, save_total_limit=2,
              report_to=t.report_to, seed=cfg.seed, data_seed=cfg.seed, bf16=t.bf16, remove_unused_columns=False,
              dataloader_num_workers=0, disable_tqdm=False, use_cpu=resolve_device(cfg.model.device).type == "cpu",
              deepspeed=t.deepspeed, fsdp=t.fsdp or "")
    if t.gradient_checkpointing:  # transformers 5 name (gradient_checkpointing is deprecated there)
        kw["activation_checkpointing"] = True
    if cfg.model.peft is not None and world > 1:
        # a PeftModel is no PreTrainedModel, so the Trainer would have DDP search for unused parameters every step
        kw["ddp_find_unused_parameters"] = False
    unknown = set(t.trainer_args) - {f.name for f in dataclasses.fields(TrainingArguments)}
    if unknown:
        raise ValueError(f"train.trainer_args: unknown TrainingArguments field(s) {sorted(unknown)}")
    kw.update(t.trainer_args)
    return TrainingArguments(**kw)


def finish_stage(trainer, tok, final: str, partial: str, metrics: dict, metrics_path: str, log_path: str) -> str:
    trainer.check_weights()  # nothing non-finite is ever committed
    drop_reference_adapter(trainer.model)  # a LoRA run saves the trained adapter alone
    tmp = atomic_dir(final) if dist.is_main() else f"{final}.tmp"
    dist.barrier()  # the folder exists before any process saves into it
    trainer.save_model(tmp)  # every process (DeepSpeed / FSDP gather the weights); the Trainer writes on the main one
    if dist.is_main():
        tok.save_pretrained(tmp)
        atomic_write_jsonl(log_path, trainer.state.log_history)
        atomic_write_json(metrics_path, metrics)
        commit_dir(tmp, final)  # last: the model folder's existence marks the stage done
        remove_partial(partial)
    return final


def log_summary(log_history: list[dict], prefix: str) -> dict:
    """Mean of every logged training metric over the stage, and the last logged loss."""
    acc = defaultdict(list)
    for entry in log_history:
        for k, v in entry.items():
            if isinstance(v, (int, float)) and k not in ("epoch", "step", "learning_rate", "grad_norm"):
                acc[k].append(v)
    out = {f"{prefix}/{k}": sum(v) / len(v) for k, v in acc.items() if not k.startswith("train_")}
    losses = [e["loss"] for e in log_history if "loss" in e]
    if losses:
        out[f"{prefix}/final_loss"] = losses[-1]
    return out

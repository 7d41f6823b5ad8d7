"""Generation backends: what turns tokenised prompts into sampled responses for the generate and eval stages.

`generate.backend` chooses one:
  hf    transformers' `model.generate` (the default): prompts batched in length order with left padding,
        `generate.batch_size` prompts per call, each batch seeded from (seed_key, batch index), KV cache on
        (`generate.use_cache`), optionally the model's forward compiled (`generate.compile`).
  vllm  vLLM's offline engine (`pip install 'spa[vllm]'`), one request per prompt with n samples and the seed
        SamplingParams(seed=...) derived from (seed_key, prompt index). UNTESTED: vLLM cannot be installed where spa
        is tested; the same sampling parameters are passed, but its samples differ from the hf backend's (another
        sampler, another random stream), so runs with different backends are not comparable draw for draw.

A backend returns token ids, not text: generate_responses decodes them the same way for every backend (the
generate stage, spa.stages.generate, and the eval stage sample through it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from .io import derive_seed, seed_everything
from .models import load_causal_lm

BACKENDS = ("hf", "vllm")
VLLM_EXTRA = "pip install 'spa[vllm]'"


@dataclass(frozen=True)
class SamplingParams:
    temperature: float  # 0 = greedy (one response, repeated num_samples times)
    top_p: float
    max_new_tokens: int


@runtime_checkable
class GenerationBackend(Protocol):
    """generate(prompts, num_samples, params, seed_key) -> per prompt, num_samples lists of new token ids: the
    response's tokens, ending with the EOS token when the model ended the response (none when it stopped at
    max_new_tokens), never padding. The result must depend only on the arguments (the backend derives every seed
    from seed_key), never on which process or how many processes run it."""

    name: str

    def generate(self, prompts: list[list[int]], num_samples: int, params: SamplingParams, seed_key: tuple,
                 progress: str | None = None) -> list[list[list[int]]]: ...


class HFBackend:
    """transformers' generate on a loaded causal LM, `batch_size` prompts per call in length order (less padding)."""

    name = "hf"

    def __init__(self, model, pad_token_id: int, eos_token_id: int, batch_size: int, use_cache: bool = True,
                 compile: bool = False):
        self.model, self.pad, self.eos, self.batch_size, self.use_cache = model, pad_token_id, eos_token_id, \
            batch_size, use_cache
        if compile:
            # dynamic=True: one graph for every batch shape and cache length instead of a recompile per shape
            model.forward = torch.compile(model.forward, dynamic=True)

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], num_samples: int, params: SamplingParams, seed_key: tuple,
                 progress: str | None = None) -> list[list[list[int]]]:
        from tqdm.auto import tqdm

        device = next(self.model.parameters()).device
        pad, eos = self.pad, self.eos
        sample = params.temperature > 0
        gen_kw = dict(do_sample=sample, max_new_tokens=params.max_new_tokens, pad_token_id=pad, eos_token_id=eos,
                      num_return_sequences=num_samples if sample else 1, use_cache=self.use_cache)
        if sample:  # top_k=0: no top-k cut (the paper has none)
            gen_kw.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out: list[list[list[int]] | None] = [None] * len(prompts)
        new_tokens, t0 = 0, time.perf_counter()
        bar = tqdm(total=len(prompts), desc=progress, disable=progress is None, leave=False, unit="prompt")
        for b, s in enumerate(range(0, len(order), self.batch_size)):
            idx = order[s:s + self.batch_size]
            T = max(len(prompts[i]) for i in idx)
            ids = torch.full((len(idx), T), pad, dtype=torch.long)
            att = torch.zeros((len(idx), T), dtype=torch.long)
            for r, i in enumerate(idx):  # left padding
                ids[r, T - len(prompts[i]):] = torch.tensor(prompts[i])
                att[r, T - len(prompts[i]):] = 1
            seed_everything(*seed_key, b)
            seqs = self.model.generate(input_ids=ids.to(device), attention_mask=att.to(device), **gen_kw)[:, T:]
            seqs = seqs.cpu()
            if not sample:  # greedy: the same response num_samples times
                seqs = seqs.repeat_interleave(num_samples, 0)
            for r, i in enumerate(idx):
                rows = []
                for row in seqs[r * num_samples:(r + 1) * num_samples].tolist():
                    rows.append(row[:row.index(eos) + 1] if eos in row else [t for t in row if t != pad])
                    new_tokens += len(rows[-1])
                out[i] = rows
            bar.update(len(idx))
            bar.set_postfix(tok_s=f"{new_tokens / max(time.perf_counter() - t0, 1e-9):.0f}")
        bar.close()
        return out


class VLLMBackend:
    """vLLM's offline LLM engine on the model folder (UNTESTED; see the module docstring)."""

    name = "vllm"

    def __init__(self, path: str, mcfg, eos_token_id: int):
        vllm = import_vllm()
        kw = {"trust_remote_code": mcfg.trust_remote_code, "dtype": "auto" if mcfg.dtype == "auto" else mcfg.dtype}
        self.llm, self.vllm, self.eos = vllm.LLM(model=path, **kw), vllm, eos_token_id

    def generate(self, prompts: list[list[int]], num_samples: int, params: SamplingParams, seed_key: tuple,
                 progress: str | None = None) -> list[list[list[int]]]:
        from vllm.inputs import TokensPrompt

        sample = params.temperature > 0
        sampling = [self.vllm.SamplingParams(
            n=num_samples if sample else 1, temperature=params.temperature if sample else 0.0, top_p=params.top_p,
            max_tokens=params.max_new_tokens, seed=derive_seed(*seed_key, "prompt", i), stop_token_ids=[self.eos])
            for i in range(len(prompts))]
        results = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sampling,
                                    use_tqdm=progress is not None)
        out = []
        for res in results:
            rows = []
            for c in res.outputs:
                toks = list(c.token_ids)
                if c.finish_reason == "stop" and (not toks or toks[-1] != self.eos):
                    toks.append(self.eos)  # vLLM may leave the stop token out; the EOS marks "finished" here
                rows.append(toks)
            out.append(rows if sample else rows * num_samples)
        return out


def import_vllm():
    """The vllm module, or an ImportError naming the extra that installs it."""
    try:
        import vllm
    except ImportError as e:
        raise ImportError(f"generate.backend is 'vllm' but vllm is not importable ({e}); install it with "
                          f"{VLLM_EXTRA} (a CUDA machine), or set generate.backend: hf") from None
    return vllm


def check_backend(gcfg) -> None:
    """Raises ImportError (naming the extra) when generate.backend's library is missing, before any compute."""
    if gcfg.backend == "vllm":
        import_vllm()


def build_backend(gcfg, path: str, mcfg, tokenizer, device, model=None) -> GenerationBackend:
    """The generate.backend on the model folder `path` (hf: `model` when already loaded, else loaded here)."""
    if gcfg.backend == "vllm":
        return VLLMBackend(path, mcfg, tokenizer.eos_token_id)
    if model is None:
        model = load_causal_lm(path, mcfg, device)
    return HFBackend(model, tokenizer.pad_token_id, tokenizer.eos_token_id, gcfg.batch_size, gcfg.use_cache,
                     gcfg.compile)


def generate_responses(generator, tokenizer, prompts: list[list[int]], num_samples: int, *, temperature: float,
                       top_p: float, max_new_tokens: int, seed_key: tuple, batch_size: int | None = None,
                       progress: str | None = None) -> tuple[list[dict], dict]:
    """num_samples responses for each tokenised prompt. `generator`: a spa.generation.GenerationBackend, or a
    transformers causal LM, run with the hf backend in batches of `batch_size` prompts. The backend derives every
    seed from seed_key, so the result depends only on the prompts and seed_key. temperature 0 = greedy.
    Returns ([{responses, finished, num_tokens}], stats)."""
    if isinstance(generator, torch.nn.Module):  # a transformers model: the hf backend
        if batch_size is None:
            raise ValueError("batch_size is needed to generate with a transformers model")
        generator = HFBackend(generator, tokenizer.pad_token_id, tokenizer.eos_token_id, batch_size)
    eos = tokenizer.eos_token_id
    t0 = time.perf_counter()
    params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
    token_ids = generator.generate(prompts, num_samples, params, seed_key, progress)
    seconds = time.perf_counter() - t0
    out, new_tokens = [], 0
    for rows in token_ids:
        texts, finished, counts = [], [], []
        for toks in rows:
            done = bool(toks) and toks[-1] == eos
            texts.append(tokenizer.decode(toks[:-1] if done else toks, skip_special_tokens=True))
            finished.append(done)
            counts.append(len(toks))
            new_tokens += len(toks)
        out.append({"responses": texts, "finished": finished, "num_tokens": counts})
    return out, {"new_tokens": new_tokens, "seconds": seconds, "tokens_per_s": new_tokens / max(seconds, 1e-9)}


__all__ = ["BACKENDS", "GenerationBackend", "HFBackend", "SamplingParams", "VLLMBackend", "build_backend",
           "check_backend", "generate_responses", "import_vllm"]

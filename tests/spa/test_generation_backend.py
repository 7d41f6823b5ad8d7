"""The generation backend interface (spa.generation): the hf backend, the config key and the vllm extra's error."""

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from spa import Config
from spa.config import ConfigError
from spa.data import PromptEncoder
from spa.generation import HFBackend, SamplingParams, VLLMBackend, generate_responses
from spa.io import Layout
from spa.preflight import preflight


class FixedBackend:
    """Returns preset token ids: checks what generate_responses makes of a backend's answer."""

    name = "fixed"

    def __init__(self, rows):
        self.rows, self.calls = rows, []

    def generate(self, prompts, num_samples, params, seed_key, progress=None):
        self.calls.append((prompts, num_samples, params, seed_key))
        return self.rows


def test_generate_responses_decodes_any_backend(sft_run):
    tok = AutoTokenizer.from_pretrained(Layout(sft_run).sft_model)
    eos = tok.eos_token_id
    ab, cd = tok("ab", add_special_tokens=False).input_ids, tok("cd", add_special_tokens=False).input_ids
    backend = FixedBackend([[ab + [eos], cd]])
    out, stats = generate_responses(backend, tok, [[1, 2]], 2, temperature=0.5, top_p=0.9, max_new_tokens=7,
                                    seed_key=(3, "x"))
    assert out == [{"responses": ["ab", "cd"], "finished": [True, False], "num_tokens": [3, 2]}]
    assert stats["new_tokens"] == 5
    assert backend.calls == [([[1, 2]], 2, SamplingParams(0.5, 0.9, 7), (3, "x"))]


def test_hf_backend_kv_cache_changes_nothing(sft_run):
    model = AutoModelForCausalLM.from_pretrained(Layout(sft_run).sft_model)
    tok = AutoTokenizer.from_pretrained(Layout(sft_run).sft_model)
    enc = PromptEncoder(tok, 24)
    prompts = [enc.encode([{"role": "user", "content": f"reverse: {w}"}]) for w in ("ab", "abcdefg", "xyz")]
    params = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=6)
    cached = HFBackend(model, tok.pad_token_id, tok.eos_token_id, 2, use_cache=True)
    uncached = HFBackend(model, tok.pad_token_id, tok.eos_token_id, 2, use_cache=False)
    assert cached.generate(prompts, 2, params, (0,)) == uncached.generate(prompts, 2, params, (0,))


def test_backend_is_a_validated_config_key(tiny_cfg):
    assert tiny_cfg.generate.backend == "hf"
    with pytest.raises(ConfigError, match=r"generate.backend must be one of \['hf', 'vllm'\].*got 'vlm'"):
        tiny_cfg.replace(**{"generate.backend": "vlm"})


def test_missing_vllm_names_the_extra(tiny_cfg):
    pytest.importorskip("torch")
    try:
        import vllm  # noqa: F401
        pytest.skip("vllm is installed")
    except ImportError:
        pass
    cfg = tiny_cfg.replace(**{"generate.backend": "vllm"})
    with pytest.raises(ConfigError, match=r"generate.backend is 'vllm'.*pip install 'spa\[vllm\]'"):
        preflight(cfg)
    preflight(cfg, ["iter_0/train"])  # a stage that does not generate does not need it
    with pytest.raises(ImportError, match=r"spa\[vllm\]"):
        VLLMBackend("unused", cfg.model, 0)
    assert isinstance(Config.from_dict(cfg.to_dict()).generate.backend, str)


def test_vllm_is_refused_under_a_multi_process_launch(tiny_cfg, monkeypatch):
    """vLLM's engine sets up its own parallelism: under accelerate launch / torchrun it is refused before compute."""
    cfg = tiny_cfg.replace(**{"generate.backend": "vllm"})
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"generate.backend vllm runs in one process"):
        preflight(cfg)

"""Shared pieces for the integration tests: the committed preference set, the character tokenizer and tiny models."""

import copy
import os

import pytest
import torch

pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
datasets.disable_progress_bars()

from tests.toy import char_tokenizer, load_preferences, tiny_llama  # noqa: E402

DATA = os.path.join(os.path.dirname(__file__), "..", "data", "preferences.jsonl")


@pytest.fixture(scope="session")
def tokenizer():
    return char_tokenizer()


@pytest.fixture(scope="session")
def rows():
    return load_preferences(DATA)


def perturbed(model, scale=0.2, seed=1):
    """A copy of model with seeded noise on every parameter: a policy that differs from its reference, so rewards,
    margins and hinge/robust branches are not all at their zero point."""
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return out


def models(tokenizer, tie=False, **config):
    """(policy, reference) pair of tiny Llamas."""
    ref = tiny_llama(len(tokenizer), tie_word_embeddings=tie, **config)
    return perturbed(ref), ref

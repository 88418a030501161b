"""Shared fixtures: tiny models built from local configs and a small embedded dataset (no network)."""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers

# `make test` runs two pytest workers on two cores: one thread each, or torch's threads fight over the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()


def pytest_collection_modifyitems(config, items):
    # Under scripts/mutation.py each mutant runs its tests until the first failure. mutmut's forkserver workers
    # run them in set order; fastest first (the durations mutmut recorded) makes a killed mutant cost seconds.
    if not os.environ.get("MUTANT_UNDER_TEST") or not os.path.isfile("mutmut-stats.json"):
        return
    with open("mutmut-stats.json") as f:
        seconds = json.load(f)["duration_by_test"]
    items.sort(key=lambda item: seconds.get(item.nodeid, float("inf")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    """A small embedded shapes dataset on disk (paths dict from write_shapes_dataset)."""
    from mmalign.data.shapes import write_shapes_dataset

    return write_shapes_dataset(tmp_path_factory.mktemp("shapes"), n_train=40, n_val=4, n_test=4, seed=0, n_episodes=40)


@pytest.fixture(scope="session")
def tiny_hf_llava(tmp_path_factory, shapes):
    """A tiny random transformers Llava (CLIP vision + Llama text) saved with its tokenizer."""
    from helpers import write_llava

    return write_llava(tmp_path_factory.mktemp("hf_llava"), shapes["tokenizer"])


@pytest.fixture(scope="session")
def base(tmp_path_factory, shapes):
    """Tiny encoder and LLM saved as HF folders, as stage 0 would leave them."""
    from helpers import TINY_LLAMA, TINY_VISION
    from mmalign.config import LLMConfig
    from mmalign.models.encoders import clip_encoder, save_encoder
    from mmalign.models.llm import load_llm, load_tokenizer

    out = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    save_encoder(clip_encoder(config=dict(TINY_VISION)), out / "encoder")
    tok = load_tokenizer(LLMConfig(tokenizer=shapes["tokenizer"]), ["<image>"])
    load_llm(LLMConfig(config=dict(TINY_LLAMA)), tok).save_pretrained(out / "lm")
    tok.save_pretrained(out / "lm")
    return out

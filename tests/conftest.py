"""Shared pytest fixtures: tiny Switch checkpoints in every Hugging Face layout.

* ``tiny_reference`` / ``c2048_reference``: (config dict, transformers model, state dict) built with a
  fixed seed; ``tiny_reference`` is switch-base style (alternating sparse, tied, float32),
  ``c2048_reference`` is all-sparse, untied, bfloat16.
* ``tiny_checkpoint`` / ``c2048_checkpoint``: folder paths of those models written as HF checkpoints
  (the c2048 one with c2048's config and storage quirks).
* ``checkpoint_layout``: parametrized over (fmt, shards) for every layout the reader accepts.

Tests marked ``gpu`` are skipped on machines without CUDA.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import switch_fixtures  # noqa: E402

LAYOUTS = [("safetensors", 1), ("safetensors", 3), ("bin", 1), ("bin", 3)]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _reference(kind: str):
    cfg = switch_fixtures.make_config(kind)
    model = switch_fixtures.reference_model(cfg, seed=0)
    return cfg, model, switch_fixtures.hf_state_dict(model)


@pytest.fixture(scope="session")
def tiny_reference():
    """(config dict, transformers model, state dict): switch-base style, float32."""
    return _reference("base")


@pytest.fixture(scope="session")
def c2048_reference():
    """(config dict, transformers model, state dict): c2048 style (all sparse, untied), bfloat16."""
    return _reference("c2048")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_reference) -> str:
    """Path of ``tiny_reference`` written as 3 safetensors shards with an index, plus tokenizer."""
    cfg, _, sd = tiny_reference
    path = str(tmp_path_factory.mktemp("tiny_checkpoint"))
    return switch_fixtures.write_checkpoint(path, cfg, sd, fmt="safetensors", shards=3)


@pytest.fixture(scope="session")
def c2048_checkpoint(tmp_path_factory, c2048_reference) -> str:
    """Path of ``c2048_reference`` written like google/switch-c-2048: sharded .bin with an index,
    ``decoder.lm_head.weight``, no torch_dtype, wrong num_decoder_layers, is_full_sparse."""
    cfg, _, sd = c2048_reference
    path = str(tmp_path_factory.mktemp("c2048_checkpoint"))
    return switch_fixtures.write_checkpoint(path, cfg, sd, fmt="bin", shards=3, c2048_quirks=True)


@pytest.fixture(params=LAYOUTS, ids=[f"{fmt}-{n}shard" for fmt, n in LAYOUTS])
def checkpoint_layout(request):
    """(fmt, shards) for each layout: single file and sharded, safetensors and .bin."""
    return request.param


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls: one torch thread avoids OpenMP spinning on a shared, oversubscribed machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

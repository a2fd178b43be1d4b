"""Memory planner: balanced contiguous placement against brute force, sizes from the manifest against
the memory the loaded model really holds, device parsing and errors."""
from __future__ import annotations

import itertools
import random

import pytest
import torch

from qmoe.config import SwitchConfig
from qmoe.placement import (PlacementError, balanced_placement, block_memory, format_plan, parse_devices,
                            parse_size, plan, plan_blocks, validate_device_map)
from test_runtime import write_compressed


def _brute_force(sizes, budgets, overhead=0, overhead_blocks=()):
    """Smallest max utilization over every split of the ordered blocks into len(budgets) runs; a run
    holding any of ``overhead_blocks`` costs ``overhead`` more."""
    names = list(sizes)
    n, best = len(names), float("inf")
    for cuts in itertools.combinations_with_replacement(range(n + 1), len(budgets) - 1):
        bounds = (0,) + cuts + (n,)
        util = 0.0
        for i, b in enumerate(budgets):
            run = names[bounds[i]:bounds[i + 1]]
            used = sum(sizes[x] for x in run) + (overhead if set(run) & set(overhead_blocks) else 0)
            util = max(util, used / b if b else (float("inf") if used else 0.0))
        best = min(best, util)
    return best


def test_balanced_placement_is_optimal_against_brute_force():
    rng = random.Random(0)
    for trial in range(200):
        n = rng.randint(1, 8)
        sizes = {f"b{i}": rng.choice([0, rng.randint(1, 100)]) for i in range(n)}
        budgets = [rng.choice([0, rng.randint(1, 200)]) for _ in range(rng.randint(1, 4))]
        if sum(budgets) == 0:
            budgets[0] = 1
        overhead = 0 if trial % 2 else rng.randint(1, 60)
        special = [b for b in sizes if rng.random() < 0.5]
        runs, util = balanced_placement(sizes, budgets, overhead, special)
        assert [b for run in runs for b in run] == list(sizes)  # every block once, order kept
        for run, bud in zip(runs, budgets):
            used = sum(sizes[b] for b in run) + (overhead if set(run) & set(special) else 0)
            assert used <= util * bud + 1e-6 * max(1, used) or (bud == 0 and used == 0)
        assert util == pytest.approx(_brute_force(sizes, budgets, overhead, special), rel=1e-6)


def test_balanced_placement_respects_budget_ratios():
    sizes = {f"b{i}": 10 for i in range(12)}
    runs, util = balanced_placement(sizes, [100, 200])
    assert [len(r) for r in runs] == [4, 8] and util == pytest.approx(0.4)


@pytest.mark.parametrize("text,expected", [("1024", 1024), ("2KiB", 2048), ("1.5GiB", int(1.5 * 2**30)),
                                           ("500MB", 500 * 10**6), ("3G", 3 * 10**9), ("7 kib", 7168)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_parse_devices_and_errors():
    budgets = parse_devices("cpu=1GiB,cpu:0=2GiB")
    assert [(b.device, b.budget_bytes, b.explicit) for b in budgets] == [("cpu", 2**30, True),
                                                                          ("cpu:0", 2 * 2**30, True)]
    free = parse_devices(["cpu"], headroom=0.5)[0]
    assert not free.explicit and free.budget_bytes > 0
    with pytest.raises(PlacementError, match="not a device"):
        parse_devices(["gpu0"])
    with pytest.raises(PlacementError, match="memory size"):
        parse_devices(["cpu=lots"])
    with pytest.raises(PlacementError, match="no devices"):
        parse_devices([])
    if not torch.cuda.is_available():
        with pytest.raises(PlacementError, match="CUDA is not available"):
            parse_devices(["cuda:0"])


def test_validate_device_map():
    names = ["shared", "lm_head"]
    assert validate_device_map({"shared": "cpu", "lm_head": "cpu:0"}, names) == {"shared": "cpu", "lm_head": "cpu:0"}
    with pytest.raises(PlacementError, match="missing blocks"):
        validate_device_map({"shared": "cpu"}, names)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_reference, c2048_reference):
    out = {}
    for name, (cfg, _, sd), kind in (("base", tiny_reference, "int4"), ("c2048", c2048_reference, "int4"),
                                     ("ternary", tiny_reference, "ternary")):
        path = str(tmp_path_factory.mktemp(f"plan_{name}"))
        write_compressed(path, cfg, sd, kind)
        out[name] = (path, cfg)
    return out


@pytest.mark.parametrize("kind", ["base", "c2048", "ternary"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_planned_bytes_match_loaded_model(checkpoints, kind, dtype):
    from qmoe.runtime import load_compressed

    path, cfg = checkpoints[kind]
    result = plan(path, ["cpu=4GiB"], dense_dtype=dtype)
    model = load_compressed(path, devices=["cpu=4GiB"], dtype=dtype)
    resident = sum(model.memory_by_device().values())
    # Planned bytes count each block file's safetensors header (JSON, ~100 bytes per tensor) as memory.
    n_files = len(result["block_bytes"])
    assert resident <= result["total_bytes"] <= resident + n_files * 16 * 1024
    assert result["fits"] and result["device_map"] == model.device_map
    assert (result["dictionary_bytes"] > 0) == (kind == "ternary")


def test_dictionary_is_counted_once_per_device(checkpoints):
    path, _ = checkpoints["ternary"]
    total = plan(path, ["cpu=1GiB"])["total_bytes"]
    split = plan(path, [f"cpu={total * 2 // 3}", f"cpu:0={total * 2 // 3}"])
    # The dictionary dominates this tiny model, so both devices hold sparse blocks and pay for it.
    assert split["total_bytes"] == total + split["dictionary_bytes"]


def test_expert_fraction_scales_only_expert_bytes(checkpoints):
    path, cfg = checkpoints["c2048"]
    config = SwitchConfig.from_dict(cfg)
    from qmoe.storage import open_compressed

    ckpt = open_compressed(path)
    sizes = {b: ckpt.block_bytes(b) for b in ckpt.block_names()}
    full = block_memory(config, sizes, torch.bfloat16)
    half = block_memory(config, sizes, torch.bfloat16, expert_fraction=0.5)
    for block in full:
        if block.startswith(("encoder.block.", "decoder.block.")):  # all sparse in this config
            assert full[block] / 2 < half[block] < full[block]
        else:
            assert half[block] == full[block]
    with pytest.raises(PlacementError, match="expert_fraction"):
        block_memory(config, sizes, torch.bfloat16, expert_fraction=0)


def test_plan_reports_what_does_not_fit(checkpoints):
    path, cfg = checkpoints["c2048"]
    total = plan(path, ["cpu=1GiB"])["total_bytes"]
    small = plan(path, [f"cpu={total // 3}", f"cpu:0={total // 3}"])
    assert not small["fits"] and small["utilization"] > 1
    text = format_plan(small)
    assert "DOES NOT FIT" in text and "cpu:0" in text
    ok = plan(path, [f"cpu={total}", f"cpu:0={total}"])
    assert ok["fits"] and "fits" in format_plan(ok)
    used = {d["device"]: d["used_bytes"] for d in ok["devices"]}
    assert sum(used.values()) == ok["total_bytes"]
    assert max(used.values()) <= 0.6 * total  # balanced: neither device takes nearly everything


def test_tied_head_follows_the_embeddings(checkpoints):
    path, cfg = checkpoints["base"]
    assert SwitchConfig.from_dict(cfg).tie_word_embeddings
    total = plan(path, ["cpu=1GiB"])["total_bytes"]
    result = plan(path, [f"cpu={total // 2 + 1}", f"cpu:0={total}"])
    assert result["device_map"]["lm_head"] == result["device_map"]["shared"]
    assert result["block_bytes"]["lm_head"] == 0


def test_block_memory_needs_every_block():
    config = SwitchConfig.from_dict({"model_type": "switch_transformers", "num_layers": 1, "num_decoder_layers": 1,
                                     "d_model": 8, "d_ff": 16, "d_kv": 4, "num_heads": 2, "num_experts": 2,
                                     "vocab_size": 10, "tie_word_embeddings": False})
    sizes = {name: 1000 for name in config.block_names()}
    del sizes["lm_head"]
    with pytest.raises(PlacementError, match="lm_head"):
        block_memory(config, sizes, torch.bfloat16)
    sizes["lm_head"] = 10 * 8 * 2
    mem = block_memory(config, sizes, torch.float32)
    assert mem["lm_head"] == 10 * 8 * 4  # a dense-only block doubles from bf16 to float32
    assert plan_blocks(config, sizes, ["cpu=1MiB"])["fits"]

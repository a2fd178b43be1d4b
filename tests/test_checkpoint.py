"""CheckpointReader: every HF layout, c2048 quirks, Hub cache, shard hooks, clear errors, bounded memory."""
import json
import os
import shutil
import sys

import pytest
import torch

import qmoe
import switch_fixtures
from qmoe.checkpoint import CheckpointError, CheckpointReader

BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def _inputs(seed=3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(2, switch_fixtures.VOCAB_SIZE, (2, 10), generator=g),
            torch.randint(2, switch_fixtures.VOCAB_SIZE, (2, 5), generator=g))


def _logits(model, ids, dec):
    with torch.no_grad():
        return model(input_ids=ids, decoder_input_ids=dec).logits


@pytest.mark.parametrize("kind", ["base", "c2048"])
def test_every_layout_loads_and_matches_transformers(tmp_path, checkpoint_layout, kind, tiny_reference,
                                                     c2048_reference):
    fmt, shards = checkpoint_layout
    cfg, hf, sd = tiny_reference if kind == "base" else c2048_reference
    path = switch_fixtures.write_checkpoint(str(tmp_path / "ckpt"), cfg, sd, fmt=fmt, shards=shards,
                                            c2048_quirks=kind == "c2048")
    reader = CheckpointReader(path)
    assert reader.layout == fmt and reader.sharded == (shards > 1)
    model = qmoe.load_switch(path)
    assert not any(p.is_meta for p in model.parameters())
    assert next(model.parameters()).dtype == getattr(torch, cfg["torch_dtype"])
    ids, dec = _inputs()
    ref, got = _logits(hf, ids, dec), _logits(model, ids, dec)
    assert (got.float() - ref.float()).abs().max() <= 1e-5 * ref.float().abs().max()


def test_read_block_returns_exactly_the_block(tiny_checkpoint, tiny_reference):
    _, _, sd = tiny_reference
    reader = CheckpointReader(tiny_checkpoint)
    seen = set()
    for block, tensors in reader.iter_blocks():
        assert sorted(tensors) == sorted(reader.tensor_names(block))
        assert set(tensors) == set(reader.config.block_tensor_shapes(block))
        for name, t in tensors.items():
            assert torch.equal(t, sd[name]), name
        seen |= set(tensors)
    assert seen == {k for k in sd if "embed_tokens" not in k}


def test_c2048_quirks_are_normalized(c2048_checkpoint, c2048_reference):
    cfg, _, sd = c2048_reference
    reader = CheckpointReader(c2048_checkpoint)
    with open(os.path.join(c2048_checkpoint, "config.json")) as f:
        stored = json.load(f)
    assert stored["num_decoder_layers"] < cfg["num_decoder_layers"] and "torch_dtype" not in stored
    assert reader.config.num_decoder_layers == cfg["num_decoder_layers"]
    assert reader.config.dtype == torch.bfloat16 and reader.config.tie_word_embeddings is False
    assert all(reader.config.is_sparse("decoder", i) for i in range(reader.config.num_decoder_layers))
    head = reader.read_block("lm_head")
    assert list(head) == ["lm_head.weight"] and torch.equal(head["lm_head.weight"], sd["lm_head.weight"])


def test_sizes_and_files(tiny_checkpoint, tiny_reference):
    _, _, sd = tiny_reference
    reader = CheckpointReader(tiny_checkpoint)
    distinct = {k: v for k, v in sd.items() if "embed_tokens" not in k and k != "lm_head.weight"}  # tied
    assert reader.total_bytes == sum(t.numel() * t.element_size() for t in distinct.values())
    for block in reader.block_names():
        expected = sum(sd[n].numel() * sd[n].element_size() for n in reader.tensor_names(block))
        assert reader.block_bytes(block) == expected
    with open(os.path.join(tiny_checkpoint, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    assert reader.files_for_block("encoder.block.1") == sorted(
        {f for n, f in weight_map.items() if n.startswith("encoder.block.1.")})
    assert reader.files_for_block("lm_head") == [weight_map["shared.weight"]]  # tied: read from shared


def test_on_shard_done_fires_once_per_shard_after_its_last_block(tiny_checkpoint):
    done = []
    reader = CheckpointReader(tiny_checkpoint, on_shard_done=done.append)
    consumers = reader.shard_consumers()
    assert len(consumers) == 3
    read = set()
    for block in reader.block_names():
        reader.read_block(block)
        read.add(block)
        finished = {os.path.basename(p) for p in done}
        assert finished == {f for f, blocks in consumers.items() if blocks <= read}
    assert len(done) == 3 and all(os.path.isfile(p) for p in done)
    assert reader.shard_consumers() == {}


def test_mark_consumed_counts_skipped_blocks_as_read(tiny_checkpoint):
    """A resumed compression skips finished blocks; their shards must still be released."""
    done = []
    reader = CheckpointReader(tiny_checkpoint, on_shard_done=done.append)
    consumers = reader.shard_consumers()
    blocks = reader.block_names()
    half = blocks[: len(blocks) // 2]
    for block in half:
        reader.mark_consumed(block)
    assert {os.path.basename(p) for p in done} == {f for f, b in consumers.items() if b <= set(half)}
    for block in blocks[len(half):]:
        reader.read_block(block)
    assert len(done) == len(consumers) and reader.shard_consumers() == {}


def _fake_hub_cache(cache_dir, repo_id, files_from):
    """Lays out a huggingface_hub cache snapshot of ``files_from`` for ``repo_id``."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = os.path.join(cache_dir, "models--" + repo_id.replace("/", "--"))
    snapshot = os.path.join(repo_dir, "snapshots", commit)
    os.makedirs(os.path.join(repo_dir, "refs"))
    shutil.copytree(files_from, snapshot)
    with open(os.path.join(repo_dir, "refs", "main"), "w") as f:
        f.write(commit)
    return snapshot


def test_hub_id_offline_uses_cache_and_fetches_only_needed_files(tmp_path, tiny_checkpoint, tiny_reference,
                                                                 monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cache = str(tmp_path / "hub")
    _fake_hub_cache(cache, "google/switch-tiny", tiny_checkpoint)

    import huggingface_hub

    fetched = []
    real = huggingface_hub.hf_hub_download

    def spy(repo_id, filename, **kw):
        fetched.append(filename)
        return real(repo_id, filename, **kw)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", spy)
    reader = CheckpointReader("google/switch-tiny", cache_dir=cache)
    assert set(fetched) <= {"config.json", "model.safetensors.index.json"}
    fetched.clear()
    block = reader.read_block("encoder.block.0")
    assert set(fetched) == set(reader.files_for_block("encoder.block.0"))
    _, hf, _ = tiny_reference
    model = qmoe.load_switch("google/switch-tiny", cache_dir=cache)
    ids, dec = _inputs()
    torch.testing.assert_close(_logits(model, ids, dec), _logits(hf, ids, dec), rtol=1e-5, atol=1e-5)
    assert block  # read through the cache

    with pytest.raises(CheckpointError, match="google/switch-missing.*offline"):
        CheckpointReader("google/switch-missing", cache_dir=cache)


# ---------------------------------------------------------------------------------------- errors


@pytest.fixture
def writable_checkpoint(tmp_path, tiny_reference):
    def make(fmt="safetensors", shards=3, state=None, config=None):
        cfg, _, sd = tiny_reference
        path = str(tmp_path / f"ckpt-{fmt}-{shards}")
        return switch_fixtures.write_checkpoint(path, config or cfg, state or sd, fmt=fmt, shards=shards,
                                                tokenizer=False)
    return make


def _read_all(path):
    reader = CheckpointReader(path)
    for _ in reader.iter_blocks():
        pass


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_missing_shard_names_the_file(writable_checkpoint, fmt):
    path = writable_checkpoint(fmt)
    shard = sorted(f for f in os.listdir(path) if f.endswith((".safetensors", ".bin")))[1]
    os.remove(os.path.join(path, shard))
    with pytest.raises(CheckpointError, match=f"{shard}: file missing"):
        _read_all(path)


@pytest.mark.parametrize("fmt,cut", [("safetensors", 0.5), ("bin", 0.5), ("safetensors", 0.0001)])
def test_truncated_shard_names_the_file(writable_checkpoint, fmt, cut):
    path = writable_checkpoint(fmt)
    shard = sorted(f for f in os.listdir(path) if f.endswith((".safetensors", ".bin")))[0]
    full = os.path.join(path, shard)
    size = os.path.getsize(full)
    with open(full, "r+b") as f:
        f.truncate(max(4, int(size * cut)))
    with pytest.raises(CheckpointError, match=f"{shard}: unreadable"):
        _read_all(path)


def test_corrupt_safetensors_header(writable_checkpoint):
    path = writable_checkpoint("safetensors", shards=1)
    full = os.path.join(path, "model.safetensors")
    with open(full, "r+b") as f:
        f.seek(8)
        f.write(b"\x00garbage")
    with pytest.raises(CheckpointError, match="model.safetensors: unreadable"):
        CheckpointReader(path)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_index_naming_a_tensor_absent_from_its_shard(writable_checkpoint, fmt):
    path = writable_checkpoint(fmt)
    index_file = os.path.join(path, "model.safetensors.index.json" if fmt == "safetensors"
                              else "pytorch_model.bin.index.json")
    with open(index_file) as f:
        index = json.load(f)
    name = "encoder.block.1.layer.1.mlp.experts.expert_2.wi.weight"
    wrong = next(v for v in sorted(set(index["weight_map"].values())) if v != index["weight_map"][name])
    index["weight_map"][name] = wrong
    with open(index_file, "w") as f:
        json.dump(index, f)
    with pytest.raises(CheckpointError, match=f"{wrong}: tensor {name} is named by the index but absent"):
        _read_all(path)


def test_tensor_missing_from_index(writable_checkpoint, tiny_reference):
    _, _, sd = tiny_reference
    name = "decoder.block.3.layer.2.mlp.experts.expert_0.wo.weight"
    path = writable_checkpoint(state={k: v for k, v in sd.items() if k != name})
    with pytest.raises(CheckpointError, match=f"no tensor {name}"):
        CheckpointReader(path)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_wrong_shape_names_file_and_tensor(writable_checkpoint, tiny_reference, fmt):
    _, _, sd = tiny_reference
    name = "encoder.block.2.layer.1.mlp.wi.weight"
    path = writable_checkpoint(fmt, state=dict(sd, **{name: torch.zeros(64, 31)}))
    with pytest.raises(CheckpointError, match=rf"tensor {name} has shape \(64, 31\), config.json implies \(64, 32\)"):
        _read_all(path)


def test_wrong_dtype_names_file_and_tensor(writable_checkpoint, tiny_reference):
    _, _, sd = tiny_reference
    name = "decoder.final_layer_norm.weight"
    path = writable_checkpoint("bin", state=dict(sd, **{name: sd[name].to(torch.int32)}))
    with pytest.raises(CheckpointError, match=f"pytorch_model-0000.-of-00003.bin: tensor {name} has dtype torch.int32"):
        _read_all(path)


def test_extra_experts_mean_config_mismatch(writable_checkpoint, tiny_reference):
    cfg, _, sd = tiny_reference
    path = writable_checkpoint(config=dict(cfg, num_experts=2))
    with pytest.raises(CheckpointError, match="not in the model described by config.json.*num_experts=2"):
        CheckpointReader(path)


def test_unknown_architecture(writable_checkpoint, tiny_reference):
    cfg, _, _ = tiny_reference
    path = writable_checkpoint(config=dict(cfg, architectures=["MixtralForCausalLM"], model_type="mixtral"))
    with pytest.raises(CheckpointError, match="config.json: unknown architecture"):
        CheckpointReader(path)


def test_no_weights_and_bad_source(tmp_path, tiny_reference):
    cfg, _, _ = tiny_reference
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="no weights found"):
        CheckpointReader(str(tmp_path))
    with pytest.raises(CheckpointError, match="not a local folder and not a Hub repository id"):
        CheckpointReader(str(tmp_path / "does-not-exist"))


class _Payload:
    """Anything but a tensor: weights_only unpickling must refuse to build it."""

    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.parametrize("payload,match", [
    (lambda sd: dict(sd, extra=_Payload()), "refusing to load"),
    (lambda sd: dict(sd, step=7), "refusing to load: entry 'step' is a int, not a tensor"),
    (lambda sd: [sd], "refusing to load: expected a dict of tensors"),
])
def test_pickle_that_is_not_plain_tensors_is_refused(tmp_path, tiny_reference, payload, match, capsys):
    cfg, _, sd = tiny_reference
    path = tmp_path / "ckpt"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(cfg))
    torch.save(payload(sd), path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=f"pytorch_model.bin: {match}"):
        CheckpointReader(str(path))
    assert "must never run" not in capsys.readouterr().out


def test_index_with_path_outside_checkpoint(writable_checkpoint):
    path = writable_checkpoint("safetensors")
    index_file = os.path.join(path, "model.safetensors.index.json")
    with open(index_file) as f:
        index = json.load(f)
    index["weight_map"]["shared.weight"] = "../elsewhere.safetensors"
    with open(index_file, "w") as f:
        json.dump(index, f)
    with pytest.raises(CheckpointError, match="outside the checkpoint"):
        _read_all(path)


# ---------------------------------------------------------------------------------------- memory


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_streaming_keeps_rss_near_one_block(tmp_path, fmt):
    """~150 MB checkpoint in 8 blocks: streaming it all must grow RSS by far less than the checkpoint.
    (benchmarks/stream_memory.py shows the tight bound on a >= 4 GB checkpoint.)"""
    sys.path.insert(0, BENCH_DIR)
    try:
        import stream_memory
    finally:
        sys.path.remove(BENCH_DIR)
    cfg = stream_memory.make_config("test")
    sizes = stream_memory.write_checkpoint(str(tmp_path / fmt), cfg, fmt,
                                           shard_bytes=int(max(stream_memory.sizes_of(cfg).values()) * 1.5))
    largest = max(sizes["block_bytes"].values())
    assert sizes["total_bytes"] > 4 * largest and len(sizes["block_bytes"]) >= 8
    result = stream_memory.measure(str(tmp_path / fmt), "stream")
    growth = result["growth_mb"] * 2 ** 20
    assert result["blocks"] == len(cfg.block_names())
    assert growth < 2.5 * largest + 32 * 2 ** 20, (growth / 2 ** 20, largest / 2 ** 20)
    assert growth < 0.6 * sizes["total_bytes"]

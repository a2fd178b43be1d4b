"""Runtime: a compressed checkpoint runs like the dense model holding its decoded weights.

The compressed checkpoints here are built in the test from a transformers model with seeded random
weights: experts quantized by plain round-to-nearest written below (integer kinds) or by
``qmoe.codec`` (ternary), packed by ``qmoe.storage``. The reference is transformers'
``SwitchTransformersForConditionalGeneration`` holding the weights decoded by the formula written
here, independent of the runtime's decode path. ``test_generation.py`` and ``test_placement.py``
reuse :func:`write_compressed`.
"""
from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import switch_fixtures
from qmoe import storage
from qmoe.config import SwitchConfig
from qmoe.placement import PlacementError
from qmoe.runtime import (CompressedExperts, CompressedModelError, IdealDenseExperts, PlacedModel,
                          load_compressed, shard_range)
from qmoe.storage import PackedExperts, StorageError


# ------------------------------------------------------------------------------ fixture builder


def rtn_int(w: torch.Tensor, bits: int):
    """Per-row asymmetric round-to-nearest of w [E, rows, cols]: (codes uint8, scale bf16 [E, rows],
    zero uint8 [E, rows]); the decoded weight is (code - zero) * scale."""
    levels = (1 << bits) - 1
    lo = w.amin(-1).clamp(max=0)
    hi = w.amax(-1).clamp(min=0)
    scale = ((hi - lo) / levels).clamp(min=1e-8).to(torch.bfloat16)
    s = scale.float()
    zero = torch.round(-lo / s).clamp(0, levels)
    codes = torch.clamp(torch.round(w / s[..., None]) + zero[..., None], 0, levels)
    return codes.to(torch.uint8), scale, zero.to(torch.uint8)


def rtn_ternary(w: torch.Tensor):
    """QMoE's min/max ternary grid per row of w [rows, cols]: (ternary int8, scales float32 [rows, 2])
    with the scales rounded to bf16 as they are stored."""
    a = w.amin(-1).clamp(max=0).to(torch.bfloat16).float()
    b = w.amax(-1).clamp(min=0).to(torch.bfloat16).float()
    t = torch.zeros_like(w, dtype=torch.int8)
    t[w > b[:, None] / 2] = 1
    t[w < a[:, None] / 2] = -1
    return t, torch.stack([a, b], dim=1)


def write_compressed(directory: str, config_dict: dict, state_dict: dict, kind: str = "int4",
                     store_tied_head: bool = False) -> dict:
    """Writes ``state_dict`` (transformers names) as a compressed checkpoint with ``kind`` experts
    ("int2", "int3", "int4" or "ternary") and returns the state dict holding the decoded weights."""
    config = SwitchConfig.from_dict(config_dict)
    decoded = dict(state_dict)
    dictionary = None
    if kind == "ternary":
        from qmoe import codec

        dictionary = codec.default_dictionary()
        storage.write_dictionary(directory, dictionary)
    names = config.block_names()
    if config.tie_word_embeddings and not store_tied_head:
        names.remove("lm_head")
    for block in names:
        shapes = config.block_tensor_shapes(block)
        dense = {n: state_dict[n] for n in shapes if ".mlp.experts." not in n}
        experts = {}
        for mlp in sorted({n.split(".experts.")[0] for n in shapes if ".mlp.experts." in n}):
            experts[mlp] = {}
            for m in ("wi", "wo"):
                ws = torch.stack([state_dict[f"{mlp}.experts.expert_{e}.{m}.weight"].float()
                                  for e in range(config.num_experts)])  # [E, rows, cols]
                if kind == "ternary":
                    from qmoe import codec

                    encoded, deq = [], []
                    for e in range(config.num_experts):
                        t, scales = rtn_ternary(ws[e])
                        encoded.append(codec.encode(t.numpy(), scales.numpy(), dictionary))
                        deq.append(torch.where(t > 0, scales[:, 1:], torch.where(t < 0, scales[:, :1], 0.0)))
                    packed = PackedExperts.from_encoded(encoded, dictionary)
                else:
                    bits = int(kind[3:])
                    codes, scale, zero = rtn_int(ws, bits)
                    packed = PackedExperts.from_int_codes(codes, scale, zero, bits)
                    deq = (codes.float() - zero.float()[..., None]) * scale.float()[..., None]
                experts[mlp][m] = packed
                for e in range(config.num_experts):
                    name = f"{mlp}.experts.expert_{e}.{m}.weight"
                    decoded[name] = deq[e].to(state_dict[name].dtype)
        storage.write_block(directory, block, dense, experts)
    cfg = config.to_dict()
    cfg["quantization_config"] = {"quant_method": "qmoe", "experts": kind}
    storage.atomic_write_json(os.path.join(directory, "config.json"), cfg)
    switch_fixtures.write_tokenizer(directory)
    storage.write_manifest(directory, names)
    # The runtime stores dense weights in bf16 (the checkpoint format); so must the reference.
    return {k: (v.to(torch.bfloat16).to(v.dtype) if v.is_floating_point() and ".experts." not in k else v)
            for k, v in decoded.items()}


def reference(config_dict: dict, decoded: dict, dtype=torch.float32):
    """transformers' model holding ``decoded`` in ``dtype``, eval mode."""
    model = switch_fixtures.reference_model(config_dict, seed=0, dtype=dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in decoded.items()}, strict=False)
    return model


def tiny_inputs(vocab: int, batch: int = 3, src: int = 11, tgt: int = 7, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (batch, src), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # padding in one sequence exercises the encoder and cross-attention masks
    dec = torch.randint(2, vocab, (batch, tgt), generator=g)
    dec[:, 0] = 0
    return ids, mask, dec


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def int4_model(tmp_path_factory, tiny_reference):
    cfg, _, sd = tiny_reference
    path = str(tmp_path_factory.mktemp("int4"))
    decoded = write_compressed(path, cfg, sd, "int4")
    return path, cfg, decoded


# ------------------------------------------------------------------------------ equivalence


@pytest.mark.parametrize("kind", ["int4", "int3", "int2"])
def test_logits_equal_dense_model_with_decoded_weights(tmp_path, tiny_reference, kind):
    cfg, _, sd = tiny_reference
    decoded = write_compressed(str(tmp_path), cfg, sd, kind)
    model = load_compressed(str(tmp_path), devices=["cpu"], dtype=torch.float32)
    ids, mask, dec = tiny_inputs(cfg["vocab_size"])
    ref = reference(cfg, decoded)(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    out = model(ids, dec, attention_mask=mask).logits
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_c2048_style_untied_bf16(tmp_path, c2048_reference):
    """All-sparse, untied lm_head, bf16 runtime dtype: logits match transformers in bf16."""
    cfg, _, sd = c2048_reference
    decoded = write_compressed(str(tmp_path), cfg, sd, "int4")
    model = load_compressed(str(tmp_path), devices=["cpu"], dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    ids, mask, dec = tiny_inputs(cfg["vocab_size"])
    ref = reference(cfg, decoded, torch.bfloat16)(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    out = model(ids, dec, attention_mask=mask).logits
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    assert (out.float().argmax(-1) == ref.float().argmax(-1)).float().mean() > 0.95


def test_ternary_experts_equal_decoded_dense(tmp_path, tiny_reference):
    pytest.importorskip("qmoe.ops")
    cfg, _, sd = tiny_reference
    decoded = write_compressed(str(tmp_path), cfg, sd, "ternary")
    model = load_compressed(str(tmp_path), devices=["cpu"], dtype=torch.float32)
    assert any(isinstance(m, CompressedExperts) and m.kind == "ternary" for m in model.modules())
    ids, mask, dec = tiny_inputs(cfg["vocab_size"])
    ref = reference(cfg, decoded)(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    torch.testing.assert_close(model(ids, dec, attention_mask=mask).logits, ref, rtol=1e-4, atol=1e-4)
    # The ideal dense baseline of a ternary checkpoint holds expert 0's decoded weights.
    ideal = load_compressed(str(tmp_path), devices=["cpu"], dtype=torch.float32, ideal_dense=True)
    for name, module in ideal.model.named_modules():
        if isinstance(module, IdealDenseExperts):
            for m in ("wi", "wo"):
                assert torch.equal(getattr(module, m), decoded[f"{name}.expert_0.{m}.weight"])


def test_ternary_layers_share_one_dictionary_and_slice_exactly(tmp_path, tiny_reference):
    pytest.importorskip("qmoe.ops")
    from qmoe.runtime import _slice_packed

    cfg, _, sd = tiny_reference
    write_compressed(str(tmp_path), cfg, sd, "ternary")
    model = load_compressed(str(tmp_path), devices=["cpu"], dtype=torch.float32)
    layers = [m for m in model.modules() if isinstance(m, CompressedExperts)]
    assert len(layers) > 1
    assert len({layer.dict_entry_length.data_ptr() for layer in layers}) == 1
    packed = storage.open_compressed(str(tmp_path)).read_block("encoder.block.1").experts[
        "encoder.block.1.layer.1.mlp"]["wi"]
    for lo, hi in ((0, 2), (1, 4), (3, 3)):
        part = _slice_packed(packed, lo, hi)
        part.validate(f"slice {lo}:{hi}")
        t, p = packed.tensors, part.tensors
        for e in range(lo, hi):
            stream = t["codewords"][int(t["expert_offsets"][e]):int(t["expert_offsets"][e + 1])]
            part_stream = p["codewords"][int(p["expert_offsets"][e - lo]):int(p["expert_offsets"][e - lo + 1])]
            assert torch.equal(part_stream.view(torch.int16), stream.view(torch.int16))
            for key in ("row_offsets", "row_class", "scales"):
                assert torch.equal(p[key][e - lo].view(torch.uint8), t[key][e].view(torch.uint8))


def test_loss_matches_transformers(int4_model):
    path, cfg, decoded = int4_model
    model = load_compressed(path, devices=["cpu"], dtype=torch.float32)
    ids, mask, labels = tiny_inputs(cfg["vocab_size"])
    labels[1, -2:] = -100
    # transformers adds router z/aux losses to its loss; the evaluation loss is the plain token
    # cross-entropy of its logits.
    ref_logits = reference(cfg, decoded)(input_ids=ids, attention_mask=mask, labels=labels).logits
    ref = torch.nn.functional.cross_entropy(ref_logits.reshape(-1, ref_logits.shape[-1]), labels.reshape(-1),
                                            ignore_index=-100)
    out = model(ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_pipeline_validation_loss_equals_runtime_loss(tiny_checkpoint, tmp_path):
    """The compression pipeline measures the validation loss of the quantized model from the decoded
    dense weights; the runtime evaluates the stored compressed checkpoint. Both must agree."""
    from qmoe.compress import CompressSettings, compress
    from qmoe.data import collate, load_tokenizer, make_samples
    from qmoe.generation import evaluate_loss

    out = str(tmp_path / "compressed")
    settings = CompressSettings(bits="ternary", method="rtn", samples=4, val_samples=3, sample_length=64)
    report = compress(tiny_checkpoint, out, settings, progress=False, log=lambda *a, **k: None)
    model = load_compressed(out, devices=["cpu"], dtype=torch.float32)
    tok = load_tokenizer(model.tokenizer_path)
    samples = make_samples(tok, None, settings.val_samples, settings.seed, "validation", settings.sample_length)
    result = evaluate_loss(model, [collate(samples, tok.pad_id, model.config.decoder_start_token_id)])
    assert result["loss"] == pytest.approx(report["loss_after"], rel=1e-4)
    assert result["loss"] != pytest.approx(report["loss_before"], rel=1e-4)  # the experts really changed


def test_experts_stay_compressed(int4_model):
    path, cfg, _ = int4_model
    model = load_compressed(path, devices=["cpu"], dtype=torch.float32)
    experts = [m for m in model.modules() if isinstance(m, CompressedExperts)]
    config = SwitchConfig.from_dict(cfg)
    n_sparse = sum(config.is_sparse(s, i) for s in ("encoder", "decoder") for i in range(config.num_blocks(s)))
    assert len(experts) == n_sparse
    packed = sum(b.numel() * b.element_size() for m in experts for b in m.buffers())
    dense = 2 * n_sparse * config.num_experts * config.d_ff * config.d_model * 4
    # int4 codes are 1/8 of float32 weights plus per-row scale and zero.
    assert packed < dense / 6
    assert not any(".experts.expert_" in n for n, _ in model.model.named_parameters())


# ------------------------------------------------------------------------------ placement


def test_explicit_device_map_over_two_cpu_devices_equals_one(int4_model):
    path, cfg, _ = int4_model
    one = load_compressed(path, devices=["cpu"], dtype=torch.float32)
    names = SwitchConfig.from_dict(cfg).block_names()
    device_map = {b: ("cpu:0" if i < len(names) // 2 else "cpu") for i, b in enumerate(names)}
    two = load_compressed(path, device_map=device_map, dtype=torch.float32)
    assert len(two.devices()) == 2
    ids, mask, dec = tiny_inputs(cfg["vocab_size"])
    assert torch.equal(one(ids, dec, attention_mask=mask).logits, two(ids, dec, attention_mask=mask).logits)


def test_automatic_placement_splits_by_budget(int4_model):
    path, cfg, _ = int4_model
    from qmoe.placement import plan

    total = plan(path, ["cpu=1GiB"], dense_dtype=torch.float32)["total_bytes"]
    budget = int(total * 0.6)
    model = load_compressed(path, devices=[f"cpu={budget}", f"cpu:0={budget}"], dtype=torch.float32)
    assert set(model.device_map.values()) == {"cpu", "cpu:0"}
    one = load_compressed(path, devices=["cpu"], dtype=torch.float32)
    ids, mask, dec = tiny_inputs(cfg["vocab_size"])
    assert torch.equal(one(ids, dec, attention_mask=mask).logits, model(ids, dec, attention_mask=mask).logits)
    with pytest.raises(PlacementError, match="does not fit"):
        load_compressed(path, devices=[f"cpu={total // 4}", f"cpu:0={total // 4}"], dtype=torch.float32)


def test_bad_device_map_is_refused(int4_model):
    path, cfg, _ = int4_model
    names = SwitchConfig.from_dict(cfg).block_names()
    with pytest.raises(PlacementError, match="missing blocks"):
        load_compressed(path, device_map={b: "cpu" for b in names[:-2]})
    with pytest.raises(PlacementError, match="unknown blocks"):
        load_compressed(path, device_map={**{b: "cpu" for b in names}, "encoder.block.99": "cpu"})
    with pytest.raises(PlacementError, match="not a device"):
        load_compressed(path, device_map={**{b: "cpu" for b in names}, "shared": "gpu7"})
    with pytest.raises(CompressedModelError, match="not both"):
        load_compressed(path, devices=["cpu"], device_map={b: "cpu" for b in names})


# ------------------------------------------------------------------------------ ideal dense baseline


def test_ideal_dense_shares_expert_zero_weights(int4_model):
    path, cfg, decoded = int4_model
    model = load_compressed(path, devices=["cpu"], dtype=torch.float32, ideal_dense=True)
    ideal = [(n, m) for n, m in model.model.named_modules() if isinstance(m, IdealDenseExperts)]
    assert ideal and not any(isinstance(m, CompressedExperts) for m in model.modules())
    # Same output as the decoded dense model in which every expert is a copy of expert 0.
    shared = dict(decoded)
    for name in decoded:
        if ".experts.expert_" in name:
            prefix, rest = name.split(".experts.expert_")
            shared[name] = decoded[f"{prefix}.experts.expert_0.{rest.split('.', 1)[1]}"]
    ids, mask, dec = tiny_inputs(cfg["vocab_size"])
    ref = reference(cfg, shared)(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    torch.testing.assert_close(model(ids, dec, attention_mask=mask).logits, ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ bad checkpoints


def test_corrupt_block_file_is_refused(tmp_path, tiny_reference):
    cfg, _, sd = tiny_reference
    write_compressed(str(tmp_path), cfg, sd, "int4")
    path = tmp_path / "blocks" / "encoder.block.1.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(StorageError, match="sha256"):
        load_compressed(str(tmp_path), devices=["cpu"])


def test_expert_count_mismatch_names_the_layer(tmp_path, tiny_reference):
    cfg, _, sd = tiny_reference
    write_compressed(str(tmp_path), cfg, sd, "int4")
    # Claim more experts in config.json (and re-sign it): the stored experts no longer fit the model.
    config_path = tmp_path / "config.json"
    config = json.loads(config_path.read_text())
    config["num_experts"] *= 2
    config_path.write_text(json.dumps(config))
    blocks = json.loads((tmp_path / storage.MANIFEST).read_text())["blocks"]
    storage.write_manifest(str(tmp_path), blocks)
    with pytest.raises(CompressedModelError, match=r"encoder\.block\.1\.layer\.1\.mlp\.experts\.wi"):
        load_compressed(str(tmp_path), devices=["cpu"])


def test_wi_wo_mismatch_is_refused():
    codes = torch.zeros(2, 6, 4, dtype=torch.uint8)
    scale = torch.ones(2, 6, dtype=torch.bfloat16)
    zero = torch.zeros(2, 6, dtype=torch.uint8)
    wi = PackedExperts.from_int_codes(codes, scale, zero, 4)
    with pytest.raises(CompressedModelError, match="do not form an FFN"):
        CompressedExperts(wi, wi, "relu", where="layer.x")


def test_shard_range_partitions_experts():
    for E in (1, 5, 8, 2048):
        for world in (1, 2, 3, 7):
            ranges = [shard_range(E, r, world) for r in range(world)]
            assert ranges[0][0] == 0 and ranges[-1][1] == E
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            sizes = [hi - lo for lo, hi in ranges]
            assert max(sizes) - min(sizes) <= 1
    with pytest.raises(CompressedModelError):
        shard_range(8, 2, 2)


# ------------------------------------------------------------------------------ expert parallel


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _expert_parallel_worker(rank, world, port, path, inputs, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = load_compressed(path, devices=["cpu"], dtype=torch.float32, expert_shard=(rank, world))
        ids, mask, dec = inputs
        logits = model(ids, dec, attention_mask=mask).logits
        tokens = model.generate(ids, attention_mask=mask, max_new_tokens=6)
        held = [m.expert_range for m in model.modules() if isinstance(m, CompressedExperts)]
        torch.save({"logits": logits, "tokens": tokens, "held": held}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_expert_parallel_over_two_processes_equals_one(int4_model, tmp_path):
    path, cfg, _ = int4_model
    inputs = tiny_inputs(cfg["vocab_size"])
    mp.start_processes(_expert_parallel_worker, args=(2, _free_port(), path, inputs, str(tmp_path)), nprocs=2,
                       join=True, start_method="spawn")
    one = load_compressed(path, devices=["cpu"], dtype=torch.float32)
    ids, mask, dec = inputs
    ref_logits = one(ids, dec, attention_mask=mask).logits
    ref_tokens = one.generate(ids, attention_mask=mask, max_new_tokens=6)
    E = cfg["num_experts"]
    for rank in range(2):
        got = torch.load(os.path.join(tmp_path, f"rank{rank}.pt"), weights_only=True)
        assert all(tuple(r) == shard_range(E, rank, 2) for r in got["held"])
        assert torch.equal(got["logits"], ref_logits)
        assert torch.equal(got["tokens"], ref_tokens)


def test_placed_model_wraps_a_dense_model(tiny_reference, tiny_checkpoint):
    from qmoe import load_switch

    dense = load_switch(tiny_checkpoint, dtype=torch.float32)
    placed = PlacedModel(dense)
    cfg = tiny_reference[0]
    ids, mask, dec = tiny_inputs(cfg["vocab_size"])
    assert torch.equal(placed(ids, dec, attention_mask=mask).logits,
                       dense(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits)


@pytest.mark.slow
def test_torchrun_script_equals_one_process(int4_model, tmp_path):
    """scripts/generate_torchrun.py under torchrun with 2 gloo ranks prints what one process generates."""
    import subprocess
    import sys

    from qmoe.data import load_tokenizer
    from qmoe.generation import generate_text

    path, _, _ = int4_model
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "texts.json"
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           os.path.join(root, "scripts", "generate_torchrun.py"), path, "--devices", "cpu", "--dtype", "float32",
           "--prompt", "the quick brown fox", "--prompt", "experts", "--max-new-tokens", "8", "--json", str(out)]
    subprocess.run(cmd, check=True, env=env, cwd=root, timeout=300, capture_output=True)
    model = load_compressed(path, devices=["cpu"], dtype=torch.float32)
    want = generate_text(model, load_tokenizer(model.tokenizer_path), ["the quick brown fox", "experts"],
                         max_new_tokens=8)
    assert json.loads(out.read_text())["texts"] == want

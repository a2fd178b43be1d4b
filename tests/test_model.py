"""The Switch model against transformers' SwitchTransformersForConditionalGeneration (pinned in the
test extra): logits, loss, routing, capacity, greedy generation, and block-by-block execution."""
import pytest
import torch

import switch_fixtures
from qmoe.config import SwitchConfig
from qmoe.model import (DenseExperts, MaterializeError, SparseMLP, build_skeleton, free, materialize,
                        relative_position_bias)


_REFERENCES = {}


def _pair(kind, dtype=None, **overrides):
    """(transformers model, our model with the same weights, our config). transformers models are
    built once per configuration; ours is fresh for every call (tests modify it)."""
    d = switch_fixtures.make_config(kind, **overrides)
    if dtype is not None:
        d["torch_dtype"] = str(dtype).removeprefix("torch.")
    key = repr(sorted(d.items()))
    if key not in _REFERENCES:
        hf = switch_fixtures.reference_model(d, seed=0)
        sd = {k: v for k, v in switch_fixtures.hf_state_dict(hf).items() if "embed_tokens" not in k}
        _REFERENCES[key] = hf, sd
    hf, sd = _REFERENCES[key]
    cfg = SwitchConfig.from_dict(d)
    ours = materialize(build_skeleton(cfg), sd)
    return hf, ours, cfg


def _inputs(batch=3, src=11, tgt=7, seed=1, vocab=switch_fixtures.VOCAB_SIZE):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (batch, src), generator=g)
    dec = torch.randint(2, vocab, (batch, tgt), generator=g)
    mask = torch.ones(batch, src, dtype=torch.long)
    mask[1, src - 4:] = 0  # right padding
    if batch > 2:
        mask[2, :2] = 0  # left padding
    return ids, dec, mask


CASES = [
    ("base", {"tie_word_embeddings": True}, torch.float32),
    ("base", {"tie_word_embeddings": False}, torch.float32),
    ("c2048", {}, torch.float32),
    ("dense", {}, torch.float32),
    ("base", {"tie_word_embeddings": True}, torch.bfloat16),
    ("base", {"tie_word_embeddings": False}, torch.bfloat16),
    ("c2048", {}, torch.bfloat16),
]


@pytest.mark.parametrize("kind,overrides,dtype", CASES,
                         ids=[f"{k}-{'-'.join(f'{a}={b}' for a, b in o.items())}-{str(d)[6:]}" for k, o, d in CASES])
def test_logits_match_transformers(kind, overrides, dtype):
    hf, ours, _ = _pair(kind, dtype, **overrides)
    ids, dec, mask = _inputs()
    dec_mask = torch.ones_like(dec)
    dec_mask[0, -2:] = 0
    with torch.no_grad():
        # Without its KV cache transformers runs the same operations in the same order as we do
        # (its cached path reorders float32 rounding by ~1e-7 relative).
        ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask,
                 use_cache=False).logits
        got = ours(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask).logits
    assert got.dtype == dtype and got.shape == ref.shape
    scale = ref.float().abs().max().item()
    # Observed: bit-identical. The bounds leave room for BLAS kernels that round differently per
    # shape: 1e-6 relative in float32, half a bf16 ulp of the largest logit in bfloat16.
    tol = 1e-6 * scale if dtype == torch.float32 else 2 ** -9 * scale
    assert (got.float() - ref.float()).abs().max().item() <= tol
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("kind,dtype", [("base", torch.float32), ("c2048", torch.float32), ("c2048", torch.bfloat16)])
def test_greedy_generation_matches_transformers(kind, dtype):
    hf, ours, cfg = _pair(kind, dtype)
    ids, _, mask = _inputs(batch=3, src=9)
    ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, num_beams=1)
    got = ours.generate(ids, max_new_tokens=10, attention_mask=mask)
    assert torch.equal(got, ref)
    assert (got[:, 0] == cfg.decoder_start_token_id).all()


def test_generation_stops_at_eos_and_pads():
    hf, ours, cfg = _pair("base")
    ids, _, _ = _inputs(batch=2, src=6)
    first = ours.generate(ids, max_new_tokens=1)[:, 1]  # the token each sequence emits first
    out = ours.generate(ids, max_new_tokens=6, eos_token_id=int(first[0]))
    assert out.shape[1] >= 2 and out[0, 1] == first[0]
    assert (out[0, 2:] == cfg.pad_token_id).all()  # finished sequence is padded
    ref = hf.generate(input_ids=ids, max_new_tokens=6, do_sample=False, eos_token_id=int(first[0]))
    assert torch.equal(out, ref)


def test_loss_matches_transformers_cross_entropy():
    hf, ours, _ = _pair("base")
    ids, dec, mask = _inputs()
    labels = dec.clone()
    labels[0, -3:] = -100
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=False)
        got = ours(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-5, atol=1e-6)
    # Independent check: mean over the non-ignored positions of -log softmax at the label.
    logp = torch.log_softmax(got.logits.float(), -1)
    keep = labels != -100
    manual = -logp[keep].gather(1, labels[keep][:, None]).mean()
    torch.testing.assert_close(got.loss, manual, rtol=1e-6, atol=1e-6)


def test_expert_capacity_drops_tokens_like_transformers():
    hf, ours, _ = _pair("base", expert_capacity=2)
    ours.set_expert_capacity(2)
    ids, dec, mask = _inputs(src=16, tgt=12)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        got = ours(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        ours.set_expert_capacity(None)
        undropped = ours(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert (undropped - ref).abs().max() > 1e-3  # capacity 2 of 16 tokens really dropped some


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_route_matches_transformers_router(dtype):
    hf, ours, cfg = _pair("c2048", dtype)
    hf_router = hf.encoder.block[1].layer[1].mlp.router
    mlp = ours.encoder.block[1].layer[1].mlp
    x = torch.randn(2, 50, cfg.d_model).to(dtype)
    mask, probs, _ = hf_router(x)
    index, prob = mlp.route(x.view(-1, cfg.d_model))
    assert index.dtype == torch.int64 and prob.dtype == torch.float32
    assert torch.equal(index, mask.argmax(-1).view(-1))
    assert torch.equal(prob, probs.view(-1).float())


def test_sparse_mlp_sorts_tokens_by_expert_for_swappable_experts():
    _, ours, cfg = _pair("c2048", torch.float32)
    mlp = ours.decoder.block[0].layer[2].mlp
    seen = {}

    class Recording(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x_sorted, expert_offsets):
            seen["x"], seen["offsets"] = x_sorted, expert_offsets
            return self.inner(x_sorted, expert_offsets)

    x = torch.randn(2, 13, cfg.d_model)
    expected = mlp(x)
    mlp.experts = Recording(mlp.experts)
    torch.testing.assert_close(mlp(x), expected, rtol=0, atol=0)
    index, _ = mlp.route(x.view(-1, cfg.d_model))
    counts = torch.bincount(index, minlength=cfg.num_experts)
    assert seen["offsets"].dtype == torch.int64 and seen["offsets"].shape == (cfg.num_experts + 1,)
    assert torch.equal(seen["offsets"].diff(), counts)
    for e in range(cfg.num_experts):  # rows of expert e, in sequence order
        rows = seen["x"][seen["offsets"][e]:seen["offsets"][e + 1]]
        torch.testing.assert_close(rows, x.view(-1, cfg.d_model)[index == e], rtol=0, atol=0)


def test_dense_experts_compute_each_expert_on_its_rows():
    cfg = SwitchConfig.from_dict(switch_fixtures.make_config("c2048", torch_dtype="float32"))
    experts = DenseExperts(cfg)
    offsets = torch.tensor([0, 3, 3, 4, 9, 9, 9, 10, 12])  # experts 1, 4, 5 get no token
    x = torch.randn(12, cfg.d_model)
    y = experts(x, offsets)
    for e in range(cfg.num_experts):
        ex = getattr(experts, f"expert_{e}")
        rows = x[offsets[e]:offsets[e + 1]]
        torch.testing.assert_close(y[offsets[e]:offsets[e + 1]], torch.relu(rows @ ex.wi.weight.T) @ ex.wo.weight.T)
    for bad in ([0, 3, 3, 4, 9, 9, 9, 10, 11], [0, 3, 2, 4, 9, 9, 9, 10, 12], [1, 3, 3, 4, 9, 9, 9, 10, 12],
                [0, 12]):
        with pytest.raises(ValueError, match="expert_offsets must be 9 non-decreasing values from 0 to 12"):
            experts(x, torch.tensor(bad))


@pytest.mark.parametrize("bidirectional", [True, False])
def test_position_bias_matches_transformers(bidirectional):
    hf, ours, _ = _pair("base")
    stack = hf.encoder if bidirectional else hf.decoder
    attn = stack.block[0].layer[0].SelfAttention
    for q_len, k_len in [(1, 1), (5, 5), (40, 40), (3, 40)]:
        ref = attn.compute_bias(k_len, k_len)[:, :, -q_len:, :] if q_len != k_len else attn.compute_bias(q_len, k_len)
        table = attn.relative_attention_bias.weight
        got = relative_position_bias(table, k_len, k_len, bidirectional, max_distance=16)[:, :, -q_len:, :]
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
        own = (ours.encoder if bidirectional else ours.decoder).position_bias(k_len, k_len)[:, :, -q_len:, :]
        torch.testing.assert_close(own, ref, rtol=0, atol=0)


def test_block_by_block_on_meta_skeleton_equals_full_forward():
    hf, full, cfg = _pair("base")
    sd = {k: v for k, v in switch_fixtures.hf_state_dict(hf).items() if "embed_tokens" not in k}
    ids, dec, mask = _inputs()
    with torch.no_grad():
        ref = full(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)

    model = build_skeleton(cfg)

    def run(name, fn):
        module = model.get_submodule(name)
        materialize(module, {k: v for k, v in sd.items() if k.startswith(name + ".")}, prefix=name)
        try:
            return fn(module)
        finally:
            free(module)
            assert all(p.is_meta for p in module.parameters())

    with torch.no_grad():
        h = run("shared", lambda m: m(ids))
        enc_table = sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
        dec_table = sd["decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
        bias = model.encoder.self_attention_bias(ids.shape[1], mask, torch.float32, table=enc_table)
        for i in range(cfg.num_layers):
            h = run(f"encoder.block.{i}", lambda m: m(h, bias))
        enc = run("encoder.final_layer_norm", lambda m: m(h))
        torch.testing.assert_close(enc, ref.encoder_last_hidden_state, rtol=0, atol=0)

        h = run("shared", lambda m: m(dec))
        bias = model.decoder.self_attention_bias(dec.shape[1], None, torch.float32, table=dec_table)
        cross = model.decoder.cross_attention_bias(mask, ids.shape[0], ids.shape[1], torch.float32, "cpu")
        for i in range(cfg.num_decoder_layers):
            h = run(f"decoder.block.{i}", lambda m: m(h, bias, enc, cross))
        h = run("decoder.final_layer_norm", lambda m: m(h))
        model.lm_head.weight = torch.nn.Parameter(sd["shared.weight"])  # tied
        logits = model.project(h)
    torch.testing.assert_close(logits, ref.logits, rtol=0, atol=0)


def test_position_bias_needs_block0_or_table():
    cfg = SwitchConfig.from_dict(switch_fixtures.make_config("base"))
    model = build_skeleton(cfg)
    with pytest.raises(ValueError, match="block 0 is not materialized"):
        model.encoder.position_bias(4, 4)


def test_materialize_rejects_missing_unexpected_and_misshaped():
    hf, _, cfg = _pair("base")
    sd = switch_fixtures.hf_state_dict(hf)
    block = {k: v for k, v in sd.items() if k.startswith("encoder.block.1.")}
    model = build_skeleton(cfg)
    target = model.get_submodule("encoder.block.1")
    name = "encoder.block.1.layer.1.mlp.experts.expert_2.wo.weight"

    with pytest.raises(MaterializeError, match="missing.*expert_2.wo.weight"):
        materialize(target, {k: v for k, v in block.items() if k != name}, prefix="encoder.block.1")
    with pytest.raises(MaterializeError, match="unexpected.*encoder.block.2"):
        materialize(target, dict(block, **{"encoder.block.2.layer.0.layer_norm.weight": torch.ones(32)}),
                    prefix="encoder.block.1")
    with pytest.raises(MaterializeError, match=r"expert_2.wo.weight: shape \(32, 63\), expected \(32, 64\)"):
        materialize(target, dict(block, **{name: torch.zeros(32, 63)}), prefix="encoder.block.1")
    assert all(p.is_meta for p in target.parameters())  # nothing was half-assigned

    materialize(target, block, dtype=torch.bfloat16, prefix="encoder.block.1")
    assert all(p.dtype == torch.bfloat16 and not p.is_meta for p in target.parameters())
    assert isinstance(target.layer[1].mlp, SparseMLP)
    assert all(p.is_meta for p in model.encoder.block[0].parameters())

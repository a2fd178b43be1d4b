"""SwitchConfig: Hub config parsing, quirks, block layout, against transformers' own model."""
import json

import pytest
import torch

import switch_fixtures
from qmoe.config import ConfigError, SwitchConfig, block_of_tensor

# google/switch-c-2048's config.json as published (the fields that matter here): the decoder really
# has 15 blocks, all sparse, and the weights are bfloat16.
C2048_HUB_CONFIG = {
    "architectures": ["SwitchTransformersForConditionalGeneration"],
    "d_ff": 6144, "d_kv": 64, "d_model": 2080, "decoder_start_token_id": 0, "dense_act_fn": "relu",
    "eos_token_id": 1, "expert_capacity": 64, "is_encoder_decoder": True, "is_full_sparse": True,
    "is_gated_act": False, "layer_norm_epsilon": 1e-06, "model_type": "switch_transformers",
    "num_decoder_layers": 12, "num_experts": 2048, "num_heads": 30, "num_layers": 15,
    "num_sparse_decoder_layers": 15, "num_sparse_encoder_layers": 15, "pad_token_id": 0,
    "relative_attention_max_distance": 128, "relative_attention_num_buckets": 32, "router_dtype": "float32",
    "tie_word_embeddings": False, "vocab_size": 32128,
}


def _hf_blocks(config_dict):
    """Per stack, the is_sparse flags of transformers' own model built from the same config."""
    model = switch_fixtures.reference_model(config_dict)
    return {stack: [blk.is_sparse for blk in getattr(model, stack).block] for stack in ("encoder", "decoder")}


@pytest.mark.parametrize("kind,overrides", [
    ("base", {}),
    ("base", {"num_layers": 6, "num_decoder_layers": 5, "num_sparse_encoder_layers": 3,
              "num_sparse_decoder_layers": 1}),
    ("c2048", {}),
    ("dense", {}),
])
def test_sparse_layout_matches_transformers(kind, overrides):
    d = switch_fixtures.make_config(kind, **overrides)
    cfg = SwitchConfig.from_dict(d)
    hf = _hf_blocks(d)
    for stack in ("encoder", "decoder"):
        assert cfg.num_blocks(stack) == len(hf[stack])
        assert [cfg.is_sparse(stack, i) for i in range(cfg.num_blocks(stack))] == hf[stack]


@pytest.mark.parametrize("kind", ["base", "c2048"])
def test_block_tensor_shapes_cover_transformers_state_dict(kind):
    d = switch_fixtures.make_config(kind, tie_word_embeddings=False)
    cfg = SwitchConfig.from_dict(d)
    sd = switch_fixtures.reference_model(d).state_dict()
    expected = {k: tuple(v.shape) for k, v in sd.items() if "embed_tokens" not in k}
    got = {}
    for block in cfg.block_names():
        for name, shape in cfg.block_tensor_shapes(block).items():
            assert name not in got, f"{name} in two blocks"
            assert block_of_tensor(name) == block
            got[name] = shape
    assert got == expected


def test_block_names_order():
    cfg = SwitchConfig.from_dict(switch_fixtures.make_config("base", num_layers=2, num_decoder_layers=3))
    assert cfg.block_names() == [
        "shared", "encoder.block.0", "encoder.block.1", "encoder.final_layer_norm",
        "decoder.block.0", "decoder.block.1", "decoder.block.2", "decoder.final_layer_norm", "lm_head"]


def test_c2048_hub_config_quirks():
    cfg = SwitchConfig.from_dict(C2048_HUB_CONFIG)
    assert cfg.num_layers == 15 and cfg.num_decoder_layers == 15
    assert all(cfg.is_sparse(s, i) for s in ("encoder", "decoder") for i in range(15))
    assert cfg.dtype == torch.bfloat16
    assert cfg.tie_word_embeddings is False
    # The naive transformers reading of the same file builds a dense 12-block decoder.
    from transformers import SwitchTransformersConfig

    naive = SwitchTransformersConfig(**C2048_HUB_CONFIG)
    assert naive.num_decoder_layers == 12 and naive.decoder_sparse_step == 0


def test_base128_missing_dtype_is_float32():
    d = switch_fixtures.make_config("base")
    del d["torch_dtype"]
    assert SwitchConfig.from_dict(d).dtype == torch.float32


def test_from_checkpoint_index_fixes_decoder_count_and_untied_head():
    d = dict(C2048_HUB_CONFIG, is_full_sparse=False, num_sparse_decoder_layers=12)
    del d["tie_word_embeddings"]
    names = ["shared.weight", "decoder.lm_head.weight"]
    for stack in ("encoder", "decoder"):
        for i in range(15):
            names.append(f"{stack}.block.{i}.layer.0.SelfAttention.q.weight")
            names.append(f"{stack}.block.{i}.layer.{1 if stack == 'encoder' else 2}.mlp.router.classifier.weight")
    cfg = SwitchConfig.from_checkpoint_index(d, names)
    assert cfg.num_decoder_layers == 15
    assert cfg.decoder_sparse_step == 1 and cfg.encoder_sparse_step == 1
    assert cfg.tie_word_embeddings is False


def test_from_checkpoint_index_rejects_impossible_sparse_pattern():
    d = switch_fixtures.make_config("base")
    names = [f"encoder.block.{i}.layer.1.mlp.router.classifier.weight" for i in (0, 3)]
    names += [f"encoder.block.{i}.layer.0.SelfAttention.q.weight" for i in range(4)]
    with pytest.raises(ConfigError, match="sparse encoder blocks"):
        SwitchConfig.from_checkpoint_index(d, names)


@pytest.mark.parametrize("kind", ["base", "c2048", "dense"])
def test_to_dict_round_trips_and_transformers_reads_it(kind):
    cfg = SwitchConfig.from_dict(switch_fixtures.make_config(kind))
    d = cfg.to_dict()
    assert SwitchConfig.from_dict(json.loads(json.dumps(d))) == cfg
    hf = _hf_blocks(d)
    assert [cfg.is_sparse("decoder", i) for i in range(cfg.num_decoder_layers)] == hf["decoder"]


def test_from_json_names_the_file(tmp_path):
    p = tmp_path / "config.json"
    p.write_text("{not json")
    with pytest.raises(ConfigError, match=str(p)):
        SwitchConfig.from_json(p)
    p.write_text(json.dumps(switch_fixtures.make_config("base")))
    assert SwitchConfig.from_json(p).d_model == 32


@pytest.mark.parametrize("change,match", [
    ({"architectures": ["T5ForConditionalGeneration"], "model_type": "t5"}, "unknown architecture"),
    ({"architectures": None, "model_type": "llama"}, "unknown model_type"),
    ({"is_gated_act": True}, "gated"),
    ({"d_model": 0}, "d_model"),
    ({"torch_dtype": "int8"}, "torch_dtype"),
    ({"dense_act_fn": "swish"}, "dense_act_fn"),
])
def test_bad_configs_raise_clear_errors(change, match):
    d = switch_fixtures.make_config("base")
    d.update(change)
    d = {k: v for k, v in d.items() if v is not None}
    with pytest.raises(ConfigError, match=match):
        SwitchConfig.from_dict(d, source="x/config.json")


def test_unknown_block_name():
    cfg = SwitchConfig.from_dict(switch_fixtures.make_config("base"))
    with pytest.raises(ValueError, match="unknown block"):
        cfg.block_tensor_shapes("encoder.blocks.0")
    with pytest.raises(ValueError, match="out of range"):
        cfg.block_tensor_shapes("decoder.block.9")

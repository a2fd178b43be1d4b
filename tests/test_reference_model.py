"""The bundled reference Switch model (qmoe/assets/switch-mini-8).

It must load through qmoe's own loader in its stored dtype, give the same logits as transformers'
``SwitchTransformersForConditionalGeneration`` (the independent reference), predict held-out text
far better than chance, and use all of its experts.
"""
import copy
import json
import math

import pytest
import torch
from safetensors import safe_open

import qmoe
from qmoe.data import bundled_model_path, collate, load_tokenizer, make_samples

PATH = bundled_model_path()
CONFIG = json.loads((PATH / "config.json").read_text())
# Every block of both stacks is a mixture-of-experts block (the switch-c-2048 layout).
SPARSE_LAYERS = CONFIG["num_sparse_encoder_layers"] + CONFIG["num_sparse_decoder_layers"]
# Zeroing every expert matrix costs +1.43 nats on the 8-window test batch (+1.32 on 128 windows).
EXPERTS_ZERO_MIN_DELTA = 1.0


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(PATH)


@pytest.fixture(scope="module")
def model():
    # float32 for speed on CPU; bf16 -> fp32 is exact, so this is the stored model.
    return qmoe.load_switch(PATH, dtype=torch.float32)


@pytest.fixture(scope="module")
def batch(tok):
    return collate(make_samples(tok, n=8, seed=0, split="validation"), tok.pad_id)


@pytest.fixture(scope="module")
def forward(model, batch):
    """The model's output on the validation batch and each sparse layer's expert token counts [E]."""
    counts = {}

    def record(name):
        def hook(module, args, output):  # output: router logits [N, E]
            counts[name] = torch.bincount(output.argmax(dim=-1), minlength=output.shape[-1])
        return hook

    hooks = [mlp.router.register_forward_hook(record(name)) for name, mlp in model.sparse_mlps()]
    try:
        with torch.no_grad():
            out = model(**batch)
    finally:
        for h in hooks:
            h.remove()
    return out, counts


def test_files_config_and_sizes(tok):
    config = json.loads((PATH / "config.json").read_text())
    assert config["architectures"] == ["SwitchTransformersForConditionalGeneration"]
    assert config["torch_dtype"] == "bfloat16"
    assert config["vocab_size"] >= tok.vocab_size
    weights = PATH / "model.safetensors"
    assert weights.stat().st_size < 14e6
    with safe_open(str(weights), "pt") as f:
        names = list(f.keys())
        experts = [n for n in names if ".experts.expert_" in n]
        assert len(experts) == 2 * config["num_experts"] * (config["num_sparse_encoder_layers"]
                                                            + config["num_sparse_decoder_layers"])
        for name in names:
            assert f.get_slice(name).get_dtype() == "BF16", name
        for name in experts:
            rows, cols = f.get_slice(name).get_shape()
            assert min(rows, cols) >= 128 and max(rows, cols) >= 512, name
    for name in ("spiece.model", "tokenizer_config.json", "special_tokens_map.json", "README.md"):
        assert (PATH / name).is_file(), name


def test_loads_with_qmoe_in_stored_dtype():
    model = qmoe.load_switch(PATH)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert len(model.sparse_mlps()) == SPARSE_LAYERS == CONFIG["num_layers"] + CONFIG["num_decoder_layers"]


def test_validation_loss_far_below_uniform_and_equal_to_transformers(model, tok, batch, forward):
    transformers = pytest.importorskip("transformers")
    ours, _ = forward
    with torch.no_grad():
        ref = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(
            str(PATH), dtype=torch.float32).eval()
        theirs = ref(**batch, output_router_logits=False)
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=1e-4, atol=1e-4)
    uniform = math.log(tok.vocab_size)
    assert float(ours.loss) < uniform - 2.0, (float(ours.loss), uniform)
    # It also beats a unigram model of the target tokens (sentinels and EOS included) fitted on the
    # calibration split, i.e. it uses the context rather than token frequencies alone.
    counts = torch.ones(tok.vocab_size)
    for s in make_samples(tok, n=200, seed=1, split="calibration"):
        counts += torch.bincount(s.labels, minlength=tok.vocab_size)
    labels = batch["labels"][batch["labels"] != -100]
    unigram = float(-(counts / counts.sum())[labels].log().mean())
    assert float(ours.loss) < unigram - 0.5, (float(ours.loss), unigram)
    # A calibration window the model was trained on is no easier than a held-out one by a wide margin:
    # the model generalizes rather than memorizing the bundled text.
    train = collate(make_samples(tok, n=8, seed=0, split="calibration"), tok.pad_id)
    with torch.no_grad():
        train_loss = float(model(**train).loss)
    assert float(ours.loss) - train_loss < 1.0


def test_every_expert_receives_validation_tokens(forward):
    _, counts = forward
    assert len(counts) == SPARSE_LAYERS
    for name, c in counts.items():
        share = c.float() / c.sum()
        assert share.min() > 0.01, (name, share.tolist())


def test_experts_carry_the_model(model, batch, forward):
    """Every feed-forward layer is a mixture of experts, so removing the experts must hurt a lot:
    compression accuracy comparisons on this model are only meaningful if the experts matter."""
    ours, _ = forward
    stripped = copy.deepcopy(model)
    with torch.no_grad():
        for _, mlp in stripped.sparse_mlps():
            for name, p in mlp.experts.named_parameters():
                p.zero_()
        loss = float(stripped(**batch).loss)
    assert loss - float(ours.loss) > EXPERTS_ZERO_MIN_DELTA, (loss, float(ours.loss))


def test_readme_reports_the_measured_losses():
    report = json.loads((PATH / "training.json").read_text())
    readme = (PATH / "README.md").read_text()
    for key in ("validation_loss_bf16", "validation_loss_fp32", "train_loss_fp32_last_windows"):
        assert f"{report[key]:.3f}" in readme, key
    sensitivity = report["expert_sensitivity_fp32"]
    for key in ("experts_zero_delta", "rtn_minmax_ternary_delta"):
        assert f"+{sensitivity[key]:.3f}" in readme, key
    assert sensitivity["experts_zero_delta"] > 1.0
    assert report["validation_loss_bf16"] < report["uniform_loss"] - 2.5

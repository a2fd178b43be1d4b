"""The compression pipeline end to end on tiny checkpoints: output format, losses, determinism,
crash safety (SIGKILL at several points, then resume), refused mismatched resumes, spilling
activations to disk, and two torchrun ranks."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import switch_fixtures
from qmoe import codec
from qmoe.compress import CompressError, CompressSettings, compress
from qmoe.storage import open_compressed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Tiny runs: few short samples (the fixture tokenizer has 20 sentinels, enough for 128 tokens).
TINY = dict(samples=6, val_samples=3, sample_length=128, batch_size=4, expert_group=2)
CLI_TINY = ["--samples", "6", "--val-samples", "3", "--sample-length", "128", "--batch-size", "4",
            "--expert-group", "2", "--quiet"]


def tree_digest(path: str) -> dict:
    """sha256 of every file under ``path`` (relative names)."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def assert_same_output(got_dir: str, want_dir: str) -> None:
    """Every checkpoint file byte-identical (the manifest included). The report sidecar is compared
    field by field: its GPTQ-loss diagnostics are float sums whose last bits follow the thread count."""
    got, want = tree_digest(got_dir), tree_digest(want_dir)
    assert got.pop("qmoe_report.json") and want.pop("qmoe_report.json")
    assert got == want
    with open(os.path.join(got_dir, "qmoe_report.json")) as f, open(os.path.join(want_dir, "qmoe_report.json")) as g:
        r_got, r_want = json.load(f), json.load(g)
    assert r_got["loss_after"] == r_want["loss_after"] and r_got["loss_before"] == r_want["loss_before"]
    assert len(r_got["layers"]) == len(r_want["layers"])
    for a, b in zip(r_got["layers"], r_want["layers"]):
        for k in ("gptq_loss_wi", "gptq_loss_wo"):
            assert a.pop(k) == pytest.approx(b.pop(k), rel=1e-5)
        assert a == b


def run_cli(args, env_extra=None, check=True):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(env_extra or {})
    proc = subprocess.run([sys.executable, "-m", "qmoe.cli", *args], env=env, capture_output=True, text=True,
                          timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"qmoe {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_checkpoint):
    out = str(tmp_path_factory.mktemp("reference_run"))
    report = compress(tiny_checkpoint, out, CompressSettings(**TINY), progress=False, log=lambda *a: None)
    return out, report


def test_checkpoint_format_and_losses(reference_run, tiny_checkpoint):
    from qmoe.cli import evaluate_source

    out, report = reference_run
    ckpt = open_compressed(out)
    assert ckpt.quantization_config["quant_method"] == "qmoe"
    assert ckpt.quantization_config["bits"] == "ternary"
    # A tied head is the embedding: it is not stored twice.
    assert ckpt.config.tie_word_embeddings
    assert ckpt.block_names() == [b for b in ckpt.config.block_names() if b != "lm_head"]
    # Every expert's stored codes decode to values on its row grid, and every sparse layer is present.
    sparse_layers = 0
    for name in ckpt.block_names():
        block = ckpt.read_block(name)
        assert all(v.dtype == torch.bfloat16 for v in block.dense.values() if v.is_floating_point())
        for mats in block.experts.values():
            sparse_layers += 1
            for packed in mats.values():
                for e in range(packed.num_experts):
                    t = codec.decode(packed.encoded(e)).astype(np.float32)
                    w = packed.dequantize(e).numpy()
                    scales = packed.tensors["scales"][e].float().numpy()
                    expect = np.where(t > 0, scales[:, 1:2], np.where(t < 0, scales[:, 0:1], 0.0))
                    np.testing.assert_array_equal(w, expect)
    assert sparse_layers == 4
    # The validation loss the pipeline measured equals the saved checkpoint's loss evaluated from disk,
    # and its "before" equals the dense model's loss on the same samples.
    after = evaluate_source(out, samples=TINY["val_samples"], sample_length=128, dtype="float32")
    before = evaluate_source(tiny_checkpoint, samples=TINY["val_samples"], sample_length=128, dtype="float32")
    assert after["loss"] == pytest.approx(report["loss_after"], rel=1e-4)
    assert before["loss"] == pytest.approx(report["loss_before"], rel=1e-4)
    assert report["loss_after"] != report["loss_before"]
    assert 0 < report["expert_bits_per_param"] < 16


def kl_through_runtime(source: str, compressed: str, samples: int, seed: int) -> float:
    """KL(dense source || compressed checkpoint) per target token on validation samples of 128 tokens,
    with the dense model from ``load_switch`` and the compressed one from the runtime (``load_compressed``)."""
    import torch.nn.functional as F

    from qmoe.data import collate, load_tokenizer, make_samples
    from qmoe.generation import _as_placed
    from qmoe.model import load_switch
    from qmoe.runtime import load_compressed

    dense = load_switch(source, dtype=torch.float32)
    comp = load_compressed(compressed, devices="cpu", dtype=torch.float32)
    tok = load_tokenizer(comp.tokenizer_path)
    smp = make_samples(tok, None, n=samples, seed=seed, split="validation", length=128)
    batch = collate(smp, tok.pad_id, dense.config.decoder_start_token_id)
    args = (batch["input_ids"], batch["decoder_input_ids"], batch["attention_mask"], batch["decoder_attention_mask"])
    with torch.no_grad():
        logp_d = F.log_softmax(_as_placed(dense)(*args).logits.float(), -1)
        logp_c = F.log_softmax(_as_placed(comp)(*args).logits.float(), -1)
    keep = batch["labels"] != -100
    return (logp_d.exp() * (logp_d - logp_c)).sum(-1)[keep].mean().item()


def test_reported_kl_matches_the_saved_models(reference_run, tiny_checkpoint):
    out, report = reference_run
    assert report["kl"] > 0
    assert report["kl"] == pytest.approx(kl_through_runtime(tiny_checkpoint, out, TINY["val_samples"], 0), rel=1e-3)


def test_reported_drift_matches_the_saved_models(reference_run, tiny_checkpoint):
    """Each sparse layer's drift is the relative error of the quantized model's block output against
    the original model's, on the calibration samples: recomputed here from the two models on disk."""
    from qmoe.data import collate, load_tokenizer, make_samples
    from qmoe.generation import _as_placed
    from qmoe.model import load_switch
    from qmoe.runtime import load_compressed

    out, report = reference_run
    models = {"dense": load_switch(tiny_checkpoint, dtype=torch.float32),
              "comp": load_compressed(out, devices="cpu", dtype=torch.float32)}
    tok = load_tokenizer(models["comp"].tokenizer_path)
    smp = make_samples(tok, None, n=TINY["samples"], seed=0, split="calibration", length=128)
    batch = collate(smp, tok.pad_id, models["dense"].config.decoder_start_token_id)
    args = (batch["input_ids"], batch["decoder_input_ids"], batch["attention_mask"], batch["decoder_attention_mask"])
    blocks = [layer["block"] for layer in report["layers"]]
    seen = {}
    for key, model in models.items():
        model = _as_placed(model)
        hooks = []
        for b in blocks:  # the sparse feed-forward sublayer: its input, and its output (the block's)
            ffn = model.model.get_submodule(b).layer[-1]
            hooks.append(ffn.register_forward_hook(lambda mod, a, o, b=b, key=key: seen.update(
                {(key, b, "in"): a[0], (key, b, "out"): o})))
        with torch.no_grad():
            model(*args)
        for h in hooks:
            h.remove()
    for layer in report["layers"]:
        b = layer["block"]
        mask = (batch["decoder_attention_mask"] if b.startswith("decoder") else batch["attention_mask"]).bool()
        for where, field in (("in", "drift_in"), ("out", "drift")):
            q, o = seen[("comp", b, where)][mask].double(), seen[("dense", b, where)][mask].double()
            want = float((q - o).square().sum() / o.square().sum())
            assert want > 0 and layer[field] == pytest.approx(want, rel=1e-3), (b, field)
    # The first sparse layer's experts see the original model's inputs (up to bf16-rounded dense weights).
    assert report["layers"][0]["drift_in"] < 0.1 * report["layers"][0]["drift"]


def test_layer_sensitivity_benchmark_replaces_experts_as_stored(c2048_checkpoint, tmp_path):
    """benchmarks/layer_sensitivity.py with every layer replaced is the compressed model itself (for a
    bf16 source, whose dense weights the checkpoint stores unchanged): its KL equals the one computed
    through the runtime (load_compressed) on the same samples."""
    import importlib.util

    out = str(tmp_path / "c2048")
    report = compress(c2048_checkpoint, out, CompressSettings(**TINY), progress=False, log=lambda *a: None)
    spec = importlib.util.spec_from_file_location("layer_sensitivity", os.path.join(REPO, "benchmarks",
                                                                                   "layer_sensitivity.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = str(tmp_path / "sens.json")
    bench.main([out, "--original", c2048_checkpoint, "--samples", "4", "--sample-length", "128", "--json", result])
    with open(result) as f:
        rows = {r["replaced"]: r for r in json.load(f)["rows"]}
    layers = [layer["mlp"] for layer in report["layers"]]
    assert all(rows[m]["kl"] > 0 for m in layers)
    kl = kl_through_runtime(c2048_checkpoint, out, samples=4, seed=100)
    assert rows["all sparse layers (the compressed model)"]["kl"] == pytest.approx(kl, rel=1e-3)


def test_stats_and_eval_json(reference_run):
    from qmoe.stats import checkpoint_stats

    out, report = reference_run
    stats = checkpoint_stats(out)
    assert stats["loss"] == report["loss_after"] and stats["loss_before"] == report["loss_before"]
    # Bits by component add up to the experts' bits, and match the bytes on disk.
    assert sum(stats["expert_bits_by_component"].values()) == pytest.approx(stats["expert_bits_per_param"])
    assert stats["expert_bits_per_param"] == pytest.approx(report["expert_bits_per_param"])
    blocks = os.path.join(out, "blocks")
    on_disk = sum(os.path.getsize(os.path.join(blocks, f)) for f in os.listdir(blocks))
    assert stats["bits_per_param"] == pytest.approx(8.0 * on_disk / stats["parameters"])
    for layer in stats["layers"]:
        assert 0.0 <= layer["sparsity"] <= 1.0 and 0.0 <= layer["entropy_bits"] <= np.log2(3)
    for cmd in (["stats", out, "--json"], ["eval", out, "--json", "--samples", "2", "--sample-length", "128"]):
        printed = json.loads(run_cli(cmd).stdout)
        assert {"loss", "bits_per_param"} <= set(printed)
        assert printed["bits_per_param"] == pytest.approx(stats["bits_per_param"])


def test_rerun_is_byte_identical_and_spilling_changes_nothing(reference_run, tiny_checkpoint, tmp_path):
    out, _ = reference_run
    spilled = str(tmp_path / "spilled")
    settings = CompressSettings(**TINY, max_cpu_memory=1)  # every activation store goes to disk
    compress(tiny_checkpoint, spilled, settings, progress=False, log=lambda *a: None)
    assert_same_output(spilled, out)


def test_finished_checkpoint_is_not_overwritten_silently(reference_run, tiny_checkpoint):
    out, _ = reference_run
    with pytest.raises(CompressError, match="--overwrite"):
        compress(tiny_checkpoint, out, CompressSettings(**TINY), progress=False, log=lambda *a: None)


def test_sigkill_at_several_points_then_resume_gives_identical_output(reference_run, tiny_checkpoint, tmp_path):
    """One output folder, killed (SIGKILL) three times at different points, each rerun resuming."""
    out, _ = reference_run
    target = str(tmp_path / "out")
    args = ["compress", tiny_checkpoint, "--out", target, *CLI_TINY]
    for fault in ("mid-block:encoder.block.1", "after-states:decoder.block.1", "before-manifest:all"):
        killed = run_cli(args, {"QMOE_FAULT": fault}, check=False)
        assert killed.returncode == -9, (fault, killed.stderr)
        assert not os.path.exists(os.path.join(target, "qmoe_manifest.json"))
    resumed = run_cli(args)
    assert "resuming after block lm_head" in resumed.stdout
    assert_same_output(target, out)


def test_mismatched_resume_is_refused(tiny_checkpoint, tmp_path):
    target = str(tmp_path / "out")
    args = ["compress", tiny_checkpoint, "--out", target, *CLI_TINY]
    killed = run_cli(args, {"QMOE_FAULT": "after-journal:encoder.block.0"}, check=False)
    assert killed.returncode == -9
    refused = run_cli(args + ["--seed", "1"], check=False)
    assert refused.returncode == 2
    assert "refusing to resume" in refused.stderr and "seed was 0, now 1" in refused.stderr
    assert "--overwrite" in refused.stderr


def test_two_torchrun_ranks_equal_one_process(reference_run, tiny_checkpoint, tmp_path):
    out, _ = reference_run
    target = str(tmp_path / "ranks")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
         "-m", "qmoe.cli", "compress", tiny_checkpoint, "--out", target, "--device", "cpu", *CLI_TINY],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert_same_output(target, out)


def test_rtn_and_integer_bits(tiny_checkpoint, tmp_path):
    reports = {}
    for bits, method in (("4", "gptq"), ("2", "rtn")):
        out = str(tmp_path / f"{bits}-{method}")
        reports[bits] = compress(tiny_checkpoint, out, CompressSettings(**TINY, bits=bits, method=method),
                                 progress=False, log=lambda *a: None)
        ckpt = open_compressed(out)
        assert ckpt.quantization_config["bits"] == bits and ckpt.dictionary is None
        block = ckpt.read_block("encoder.block.1")
        packed = next(iter(block.experts.values()))["wi"]
        assert packed.kind == "int" and packed.bits == int(bits)
        w = packed.dequantize(0)
        scale = packed.tensors["scale"][0].float()
        zero = packed.tensors["zero"][0].float()
        codes = torch.round(w / scale + zero)
        assert torch.all((codes >= 0) & (codes <= 2 ** int(bits) - 1))
        torch.testing.assert_close((codes - zero) * scale, w)
    # 4-bit GPTQ stays much closer to the original model than 2-bit round-to-nearest.
    gap4 = abs(reports["4"]["loss_after"] - reports["4"]["loss_before"])
    gap2 = abs(reports["2"]["loss_after"] - reports["2"]["loss_before"])
    assert gap4 < gap2


def test_layer_bits_give_each_matched_layer_its_precision(reference_run, tiny_checkpoint, tmp_path, target_calls):
    from qmoe.cli import evaluate_source
    from qmoe.stats import checkpoint_stats

    _, plain = reference_run
    mlps = [layer["mlp"] for layer in plain["layers"]]
    assert len(mlps) == 4 and mlps[0].startswith("encoder.block.1.")
    overrides = (r"^decoder\.block\.1\.=4", r"^encoder\.block\.3\.=ternary@0.95", r"^encoder\.=ternary@0.6")
    out = str(tmp_path / "mixed")
    report = compress(tiny_checkpoint, out, CompressSettings(**TINY, ternary_grid="optimized", min_zero_fraction=0.8,
                                                             layer_bits=overrides), progress=False, log=lambda *a: None)
    by_mlp = {layer["mlp"]: layer for layer in report["layers"]}
    want = {"encoder.block.1.": ("ternary", 0.6), "encoder.block.3.": ("ternary", 0.95),
            "decoder.block.1.": ("4", None), "decoder.block.3.": ("ternary", 0.8)}  # the first match wins
    for mlp, layer in by_mlp.items():
        bits, floor = next(v for k, v in want.items() if mlp.startswith(k))
        assert layer["bits"] == bits and layer.get("min_zero_fraction") == floor
    # The zero floor holds under rounding; GPTQ's updates move the final fraction by a few points.
    sparsity = {k: by_mlp[next(m for m in by_mlp if m.startswith(k))].get("sparsity") for k in want}
    assert sparsity["encoder.block.3."] > 0.9 > sparsity["decoder.block.3."] > 0.7 > sparsity["encoder.block.1."]
    assert sparsity["decoder.block.1."] is None
    # The 4-bit layer (the third; two groups of wi and wo targets per layer) anchors its targets at W.
    assert len(target_calls) == 16 and all(bool(c[3].all()) for c in target_calls[8:12])

    ckpt = open_compressed(out)
    assert ckpt.quantization_config["bits"] == "ternary" and ckpt.quantization_config["layer_bits"] == list(overrides)
    assert ckpt.dictionary is not None
    kinds = {}
    for name in ("encoder.block.1", "decoder.block.1", "decoder.block.3"):
        for packed in ckpt.read_block(name).experts.values():
            kinds[name] = (packed["wi"].kind, packed["wi"].bits, packed["wo"].kind, packed["wo"].bits)
    assert kinds == {"encoder.block.1": ("ternary", 0, "ternary", 0), "decoder.block.1": ("int", 4, "int", 4),
                     "decoder.block.3": ("ternary", 0, "ternary", 0)}
    stats = checkpoint_stats(out)
    assert {layer["kind"] for layer in stats["layers"]} == {"ternary", "int"}
    from qmoe.hub import model_card

    card = model_card(out)
    assert "--min-zero-fraction 0.8" in card and all(f"--layer-bits '{e}'" in card for e in overrides)
    # The runtime serves the mixed checkpoint: the loss measured from disk is the one the pipeline reported.
    after = evaluate_source(out, samples=TINY["val_samples"], sample_length=128, dtype="float32")
    assert after["loss"] == pytest.approx(report["loss_after"], rel=1e-4)


def test_bad_settings_and_sources_raise_clear_errors(tiny_checkpoint, tmp_path):
    for entry, message in (("decoder", "PATTERN=BITS"), ("x=5", "bits must be"), ("x=2@0.9", "only ternary"),
                           ("x=ternary@1", r"\[0, 1\)"), ("(=2", "regular expression")):
        with pytest.raises(CompressError, match=message):
            CompressSettings(layer_bits=(entry,)).validate()
    with pytest.raises(CompressError, match="--grid optimized"):
        CompressSettings(layer_bits=("x=ternary@0.9",)).validate()
    with pytest.raises(CompressError, match="not one string"):
        CompressSettings(layer_bits="x=2").validate()
    with pytest.raises(CompressError, match="per row"):
        CompressSettings(bits="4", quant_group_size=16, layer_bits=("x=ternary",)).validate()
    proc = run_cli(["compress", "--out", str(tmp_path / "e"), "--layer-bits", "x=7"], check=False)
    assert proc.returncode == 2 and "--layer-bits 'x=7'" in proc.stderr and "Traceback" not in proc.stderr
    with pytest.raises(CompressError, match="--bits"):
        compress(tiny_checkpoint, str(tmp_path / "a"), CompressSettings(bits="5"), progress=False)
    with pytest.raises(CompressError, match="per row"):
        compress(tiny_checkpoint, str(tmp_path / "b"), CompressSettings(quant_group_size=16), progress=False)
    with pytest.raises(ValueError, match="missing|not a local folder"):
        compress(str(tmp_path / "nope"), str(tmp_path / "c"), CompressSettings(**TINY), progress=False)
    proc = run_cli(["compress", str(tmp_path / "nope"), "--out", str(tmp_path / "d")], check=False)
    assert proc.returncode == 2 and "error" in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture
def target_calls(monkeypatch):
    """Records ``(w.shape, H, C, anchored)`` of every compensated_target call the pipeline makes."""
    import qmoe.compress as pipeline

    calls = []
    real = pipeline.compensated_target

    def spy(w, H, C, *args, **kwargs):
        calls.append((w.shape, H.clone(), C.clone(), kwargs.get("anchored")))
        return real(w, H, C, *args, **kwargs)

    monkeypatch.setattr(pipeline, "compensated_target", spy)
    return calls


@pytest.mark.parametrize("compensate", ["none", "expert", "model"])
def test_compensated_targets_use_the_same_tokens_original_activations(tiny_checkpoint, tmp_path, target_calls,
                                                                      compensate):
    calls = target_calls
    report = compress(tiny_checkpoint, str(tmp_path / compensate), CompressSettings(**TINY, compensate=compensate),
                      progress=False, log=lambda *a: None)
    assert np.isfinite(report["loss_after"])
    groups_per_layer = 2  # the tiny model has 4 experts, TINY solves them 2 at a time
    wi_calls = [c for c in calls if c[0][1] > c[0][2]]  # wi is [G, d_ff, d_model], d_ff > d_model
    wo_calls = [c for c in calls if c[0][1] < c[0][2]]
    layers = 4
    assert len(wo_calls) == (0 if compensate == "none" else layers * groups_per_layer)
    assert len(wi_calls) == (layers * groups_per_layer if compensate == "model" else 0)
    rel = lambda c: float((c[2] - c[1]).norm() / c[1].norm())  # noqa: E731
    if compensate == "model":
        # The first sparse layer sees the original model's inputs but for the quantized stream's
        # bf16-rounded dense weights: C (quantized-stream inputs x original-stream inputs of the same
        # tokens) is then nearly H. A token misalignment between the streams would make them unrelated.
        assert rel(wi_calls[0]) < 0.01 and rel(wi_calls[1]) < 0.01
        # Later layers see the drift of the quantized experts before them.
        assert max(rel(c) for c in wi_calls[2:]) > 5 * max(rel(wi_calls[0]), rel(wi_calls[1]))
    if compensate != "none":
        # wo's inputs are relu(x Wi_q^T): ternary wi moves them far from the original hidden activations.
        assert min(rel(c) for c in wo_calls) > 0.05
        # Ternary targets shrink towards zero, except for experts with fewer tokens than columns
        # (here some decoder experts): their H is singular.
        assert any(not bool(c[3].all()) for c in calls)
        for _, H, _, anchored in calls:
            for j in anchored.nonzero().flatten().tolist():
                assert int(torch.linalg.matrix_rank(H[j])) < H.shape[-1]


def test_integer_grids_anchor_their_compensated_targets(tiny_checkpoint, tmp_path, target_calls):
    compress(tiny_checkpoint, str(tmp_path / "int4"), CompressSettings(**TINY, bits="4"), progress=False,
             log=lambda *a: None)
    assert len(target_calls) == 16 and all(bool(c[3].all()) for c in target_calls)

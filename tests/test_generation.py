"""Generation: KV-cached decoding equals uncached decoding and transformers' greedy generate;
sampling filters equal plainly written top-k / top-p; stop tokens; evaluation loss; text helpers."""
from __future__ import annotations

import argparse
import math

import pytest
import torch
import torch.nn.functional as F

from qmoe.generation import (add_eval_arguments, add_generate_arguments, choose_tokens, eval_cli, evaluate_loss,
                             filter_logits, generate, generate_cli, generate_text)
from qmoe.runtime import load_compressed
from test_runtime import reference, tiny_inputs, write_compressed


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def compressed(tmp_path_factory, tiny_reference):
    cfg, _, sd = tiny_reference
    path = str(tmp_path_factory.mktemp("gen_int4"))
    decoded = write_compressed(path, cfg, sd, "int4")
    return path, cfg, decoded


@pytest.fixture(scope="module")
def model(compressed):
    return load_compressed(compressed[0], devices=["cpu"], dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cached_greedy_equals_uncached(compressed, dtype):
    path, cfg, _ = compressed
    model = load_compressed(path, devices=["cpu"], dtype=dtype)
    ids, mask, _ = tiny_inputs(cfg["vocab_size"], batch=3)
    cached = generate(model, ids, attention_mask=mask, max_new_tokens=12, stop_token_ids=[])
    uncached = generate(model, ids, attention_mask=mask, max_new_tokens=12, stop_token_ids=[], use_cache=False)
    assert cached.shape == (3, 13)
    assert torch.equal(cached, uncached)


def test_cached_step_logits_equal_full_decoder(model, compressed):
    """Each cached step's logits equal the last position of a full decoder pass over the prefix."""
    from qmoe.generation import DecoderCache

    _, cfg, _ = compressed
    ids, mask, dec = tiny_inputs(cfg["vocab_size"], batch=2, tgt=6)
    enc = model.encode(ids, mask)
    full = model.decode(dec, enc, mask)  # [B, T, V]
    cache = DecoderCache(model, enc, mask, max_len=dec.shape[1])
    for t in range(dec.shape[1]):
        torch.testing.assert_close(cache.step(model, dec[:, t]), full[:, t], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cache holds"):
        cache.step(model, dec[:, 0])


def test_greedy_equals_transformers_generate(model, compressed):
    _, cfg, decoded = compressed
    ids, mask, _ = tiny_inputs(cfg["vocab_size"], batch=3)
    ref = reference(cfg, decoded).generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                                           num_beams=1, min_length=0)
    ours = generate(model, ids, attention_mask=mask, max_new_tokens=10)
    # transformers stops when all sequences finished; compare the common length.
    n = min(ref.shape[1], ours.shape[1])
    assert torch.equal(ours[:, :n], ref[:, :n])


@pytest.mark.parametrize("kind,dtype", [("ternary", torch.float32), ("int2", torch.bfloat16)])
def test_greedy_equals_transformers_other_kinds(tmp_path, c2048_reference, kind, dtype):
    """All-sparse untied model: ternary experts (grouped op) in float32, 2-bit experts in bf16."""
    cfg, _, sd = c2048_reference
    decoded = write_compressed(str(tmp_path), cfg, sd, kind)
    model = load_compressed(str(tmp_path), devices=["cpu"], dtype=dtype)
    ids, mask, _ = tiny_inputs(cfg["vocab_size"], batch=2)
    ref = reference(cfg, decoded, dtype).generate(input_ids=ids, attention_mask=mask, max_new_tokens=10,
                                                  do_sample=False, num_beams=1, min_length=0)
    ours = generate(model, ids, attention_mask=mask, max_new_tokens=10)
    n = min(ref.shape[1], ours.shape[1])
    assert n > 3 and torch.equal(ours[:, :n], ref[:, :n])


def test_dense_model_generates_like_its_own_greedy(tiny_checkpoint):
    from qmoe import load_switch

    dense = load_switch(tiny_checkpoint, dtype=torch.float32)
    ids = torch.randint(2, 100, (2, 9), generator=torch.Generator().manual_seed(3))
    assert torch.equal(generate(dense, ids, max_new_tokens=8), dense.generate(ids, max_new_tokens=8))


def test_stop_tokens_end_each_sequence(model, compressed):
    _, cfg, _ = compressed
    ids, mask, _ = tiny_inputs(cfg["vocab_size"], batch=3)
    free = generate(model, ids, attention_mask=mask, max_new_tokens=10, stop_token_ids=[])
    stop = int(free[0, 3])  # the token sequence 0 emits at step 3
    out = generate(model, ids, attention_mask=mask, max_new_tokens=10, stop_token_ids=[stop])
    for b in range(3):
        row, ref = out[b].tolist(), free[b].tolist()
        hits = [i for i in range(1, len(ref)) if ref[i] == stop]
        end = hits[0] + 1 if hits else len(ref)
        assert row[:end] == ref[:end]  # identical up to and including the first stop token
        assert all(t == cfg["pad_token_id"] for t in row[end:])  # padding afterwards
    assert out.shape[1] <= free.shape[1]
    assert generate(model, ids, attention_mask=mask, max_new_tokens=0).shape == (3, 1)
    with pytest.raises(ValueError, match="attention_mask"):
        generate(model, ids, attention_mask=mask[:, :-1], max_new_tokens=2)
    with pytest.raises(ValueError, match="input_ids"):
        generate(model, ids[0], max_new_tokens=2)


def _plain_filter(logits, temperature, top_k, top_p):
    """Textbook top-k then nucleus filtering of one row, with Python lists."""
    vals = [v / temperature for v in logits.tolist()]
    order = sorted(range(len(vals)), key=lambda i: -vals[i])
    keep = set(order[:top_k]) if top_k else set(order)
    if top_p is not None:
        kept = [i for i in order if i in keep]
        z = sum(math.exp(vals[i]) for i in kept)
        nucleus, mass = set(), 0.0
        for i in kept:
            nucleus.add(i)
            mass += math.exp(vals[i]) / z
            if mass >= top_p:
                break
        keep = nucleus
    return [v if i in keep else float("-inf") for i, v in enumerate(vals)]


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, None), (0.7, 5, None), (1.3, None, 0.6),
                                                    (1.0, 8, 0.9), (0.5, 1, None), (2.0, 40, 0.25)])
def test_filter_logits_matches_plain_definition(temperature, top_k, top_p):
    logits = torch.randn(4, 40, generator=torch.Generator().manual_seed(7)) * 3
    got = filter_logits(logits, temperature, top_k, top_p)
    for b in range(4):
        want = torch.tensor(_plain_filter(logits[b], temperature, top_k, top_p))
        assert torch.equal(torch.isinf(got[b]), torch.isinf(want))
        finite = ~torch.isinf(want)
        torch.testing.assert_close(got[b][finite], want[finite])


def test_filter_logits_rejects_bad_settings():
    logits = torch.zeros(1, 5)
    for kwargs in (dict(temperature=0.0), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            filter_logits(logits, **kwargs)


def test_sampling_follows_the_filtered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]])
    probs = F.softmax(filter_logits(logits, 1.0, 3, None), dim=-1)[0]
    gen = torch.Generator().manual_seed(0)
    draws = torch.cat([choose_tokens(logits.expand(2000, -1), True, 1.0, 3, None, gen) for _ in range(5)])
    freq = torch.bincount(draws, minlength=5).float() / draws.numel()
    assert freq[3:].sum() == 0  # outside the top 3
    torch.testing.assert_close(freq, probs, atol=0.02, rtol=0)


def test_sampling_is_reproducible_and_top_k_one_is_greedy(model, compressed):
    _, cfg, _ = compressed
    ids, mask, _ = tiny_inputs(cfg["vocab_size"], batch=2)
    kw = dict(attention_mask=mask, max_new_tokens=10, stop_token_ids=[], do_sample=True, temperature=1.5)
    a = generate(model, ids, seed=1, **kw)
    assert torch.equal(a, generate(model, ids, seed=1, **kw))
    assert not torch.equal(a, generate(model, ids, seed=2, **kw))
    greedy = generate(model, ids, attention_mask=mask, max_new_tokens=10, stop_token_ids=[])
    assert torch.equal(generate(model, ids, seed=5, top_k=1, **kw), greedy)


def test_evaluate_loss_is_token_weighted(model, compressed):
    _, cfg, decoded = compressed
    batches = []
    for seed, (b, tgt) in enumerate([(2, 5), (3, 8)]):
        ids, mask, labels = tiny_inputs(cfg["vocab_size"], batch=b, tgt=tgt, seed=seed)
        labels[0, -2:] = -100
        dec = torch.cat([torch.zeros(b, 1, dtype=torch.long), labels[:, :-1].clamp(min=0)], dim=1)
        batches.append(dict(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, labels=labels))
    result = evaluate_loss(model, batches)
    ref = reference(cfg, decoded).requires_grad_(False)
    total, count = 0.0, 0
    for batch in batches:
        logits = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     decoder_input_ids=batch["decoder_input_ids"]).logits
        for b in range(logits.shape[0]):
            for t in range(logits.shape[1]):
                y = int(batch["labels"][b, t])
                if y != -100:
                    total -= float(torch.log_softmax(logits[b, t].double(), -1)[y])
                    count += 1
    assert result["tokens"] == count and result["batches"] == 2
    assert result["loss"] == pytest.approx(total / count, rel=1e-5)
    with pytest.raises(ValueError, match="no labelled tokens"):
        evaluate_loss(model, [dict(batches[0], labels=torch.full_like(batches[0]["labels"], -100))])


def test_generate_text_and_cli(model, compressed, capsys):
    from qmoe.data import load_tokenizer

    path, _, _ = compressed
    tok = load_tokenizer(model.tokenizer_path)
    text = generate_text(model, tok, "the quick brown fox", max_new_tokens=6)
    ids = torch.tensor([tok.encode("the quick brown fox") + [tok.eos_id]])
    assert text == tok.decode(generate(model, ids, max_new_tokens=6)[0, 1:])
    both = generate_text(model, tok, ["the quick brown fox", "experts route tokens"], max_new_tokens=6)
    assert both[0] == text  # right padding of the batch does not change the first prompt's output

    args = add_generate_arguments(argparse.ArgumentParser()).parse_args(
        [path, "--prompt", "the quick brown fox", "--max-new-tokens", "6", "--devices", "cpu", "--dtype", "float32"])
    assert generate_cli(args) == [text]
    assert text in capsys.readouterr().out


def test_eval_cli_reports_loss(compressed, tmp_path):
    import json

    path, _, _ = compressed
    from qmoe.data import bundled_text_path

    try:
        bundled_text_path()
    except FileNotFoundError:
        pytest.skip("bundled text not installed")
    out = tmp_path / "eval.json"
    args = add_eval_arguments(argparse.ArgumentParser()).parse_args(
        [path, "--samples", "2", "--batch-size", "2", "--length", "128", "--devices", "cpu", "--dtype", "float32",
         "--json", str(out)])
    result = eval_cli(args)
    saved = json.loads(out.read_text())
    assert saved["loss"] == pytest.approx(result["loss"]) and result["tokens"] > 0
    assert math.isfinite(result["loss"]) and result["perplexity"] == pytest.approx(math.exp(result["loss"]))

"""Builds the bundled text, trains its tokenizer, and trains the bundled reference Switch model.

Everything comes from text present on any machine with Python (plus files given with ``--text``):

1. **Corpus** (``--text-out``, gzip JSON lines, one document per line): the pydoc topic pages of
   this Python (``pydoc_data.topics``), the docstrings of the standard library (at least 200
   characters each), and the license texts in ``/usr/share/common-licenses``. Documents are split
   into calibration and validation by a hash of their text (:mod:`qmoe.data`); only the
   calibration split is used for the tokenizer and for training.
2. **Tokenizer**: a SentencePiece unigram model in the T5 layout (pad 0, EOS 1, UNK 2, no BOS)
   with ``--extra-ids`` sentinels above the pieces, written as ``spiece.model`` plus
   ``tokenizer_config.json`` / ``special_tokens_map.json`` that transformers' ``T5Tokenizer`` reads.
3. **Model**: :class:`qmoe.model.SwitchForConditionalGeneration` trained from scratch with the T5
   span-corruption objective (568-token windows, 15% noise, mean span 3) plus Switch's router
   load-balancing loss and router z-loss, AdamW with warmup and linear decay, float32 on CPU.
   Deterministic for ``--seed`` at a fixed ``--threads``.
4. **Output** (``--out``): ``config.json`` + ``model.safetensors`` (bfloat16, transformers names),
   the tokenizer files and ``training.json`` (settings, loss curve, measured figures; the folder's
   ``README.md`` is written by hand from it). Before saving, :func:`expert_sensitivity` measures
   how much of the model the experts carry (validation loss with every expert matrix zeroed, and
   after min/max ternary round-to-nearest of every expert matrix).

The defaults are the settings of the bundled model (every block sparse, 4 experts, 900 steps, no
router z-loss, routers initialized at 2x the fan-in scale). It was trained
with the bundled corpus and tokenizer kept byte-identical::

    python scripts/train_reference_switch.py --out qmoe/assets/switch-mini-8 \\
        --text-out qmoe/assets/text/python-docs.jsonl.gz --reuse-text \\
        --tokenizer-from qmoe/assets/switch-mini-8 --seed 0 --threads 1

(without ``--reuse-text`` / ``--tokenizer-from`` the corpus and tokenizer are rebuilt from this
machine's Python first).
"""
from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import io
import json
import math
import os
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qmoe import data  # noqa: E402
from qmoe.config import SwitchConfig  # noqa: E402
from qmoe.model import Router, SwitchForConditionalGeneration  # noqa: E402

LICENSES = Path("/usr/share/common-licenses")
# Standard-library folders that are test suites, vendored tools or IDE code rather than documentation.
STDLIB_SKIP = {"test", "tests", "site-packages", "idlelib", "lib2to3", "__pycache__", "turtledemo"}
MIN_DOCSTRING = 200


# ------------------------------------------------------------------------------------------ corpus


def python_doc_documents() -> list[tuple[str, str]]:
    """(source, text) of every pydoc topic page and every long standard-library docstring."""
    import pydoc_data.topics

    docs = [(f"pydoc:{name}", text.strip()) for name, text in sorted(pydoc_data.topics.topics.items())]
    root = Path(sysconfig.get_paths()["stdlib"])
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in STDLIB_SKIP)
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = Path(dirpath) / name
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue  # a few stdlib files are deliberately invalid (test fixtures, templates)
            module = ".".join(path.relative_to(root).with_suffix("").parts)
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) >= MIN_DOCSTRING:
                        where = module if isinstance(node, ast.Module) else f"{module}.{node.name}"
                        docs.append((f"stdlib:{where}", doc.strip()))
    return docs


def license_documents() -> list[tuple[str, str]]:
    """(source, text) of each distinct license file in /usr/share/common-licenses (links resolved)."""
    if not LICENSES.is_dir():
        return []
    seen, docs = set(), []
    for path in sorted(LICENSES.iterdir()):
        real = path.resolve()
        if real in seen or not real.is_file():
            continue
        seen.add(real)
        docs.append((f"license:{path.name}", real.read_text(encoding="utf-8", errors="replace").strip()))
    return docs


def extra_documents(paths: list[str]) -> list[tuple[str, str]]:
    """(source, text) of every document of both splits in the given files or folders."""
    docs = []
    for p in paths:
        for split in data.SPLITS:
            docs += [(f"file:{p}", d) for d in data.load_documents(p, split)]
    return docs


def write_corpus(path: Path, extra: list[str]) -> dict:
    """Writes the deduplicated corpus as gzip JSON lines (byte-identical for identical inputs)."""
    docs = python_doc_documents() + license_documents() + extra_documents(extra)
    seen, unique = set(), []
    for source, text in docs:
        if text and text not in seen:
            seen.add(text)
            unique.append((source, text))
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    # mtime=0 and no file name in the header keep the archive reproducible.
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, compresslevel=9) as gz:
        for source, text in unique:
            gz.write((json.dumps({"text": text, "source": source}, ensure_ascii=False) + "\n").encode("utf-8"))
    path.write_bytes(buf.getvalue())
    splits = [data._split_of(t) for _, t in unique]
    return {
        "documents": len(unique),
        "characters": sum(len(t) for _, t in unique),
        "validation_documents": splits.count("validation"),
        "validation_characters": sum(len(t) for (_, t), s in zip(unique, splits) if s == "validation"),
        "python": sys.version.split()[0],
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }


def corpus_stats(path: Path) -> dict:
    """The figures :func:`write_corpus` reports, for an existing corpus file."""
    texts = [json.loads(line)["text"] for line in gzip.open(path, "rt", encoding="utf-8") if line.strip()]
    splits = [data._split_of(t) for t in texts]
    return {
        "documents": len(texts),
        "characters": sum(len(t) for t in texts),
        "validation_documents": splits.count("validation"),
        "validation_characters": sum(len(t) for t, s in zip(texts, splits) if s == "validation"),
        "python": sys.version.split()[0],
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }


# --------------------------------------------------------------------------------------- tokenizer


def train_tokenizer(text_path: Path, out: Path, pieces: int, extra_ids: int) -> data.Tokenizer:
    """Trains the SentencePiece unigram model on the calibration split; writes the T5 tokenizer files."""
    import sentencepiece

    lines = [line.strip() for doc in data.load_documents(text_path, "calibration")
             for line in doc.splitlines() if line.strip()]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="unigram", vocab_size=pieces,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        character_coverage=0.9995, num_threads=1, shuffle_input_sentence=False, max_sentence_length=16384,
        minloglevel=2)
    out.mkdir(parents=True, exist_ok=True)
    (out / "spiece.model").write_bytes(model.getvalue())
    sentinels = [f"<extra_id_{i}>" for i in range(extra_ids)]
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "T5Tokenizer", "extra_ids": extra_ids, "additional_special_tokens": sentinels,
        "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>", "model_max_length": 512,
        "legacy": True}, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps({
        "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
        "additional_special_tokens": sentinels}, indent=2) + "\n")
    return data.load_tokenizer(out)


# ------------------------------------------------------------------------------------------- model


def init_weights(model: SwitchForConditionalGeneration, config: SwitchConfig, generator: torch.Generator,
                 router_scale: float = 1.0):
    """T5/Mesh-TensorFlow initialization: every matrix ~ N(0, 1/fan_in), except that attention has no
    1/sqrt(d_kv) score scaling, so queries take the extra factor; routers ~ N(0, router_scale^2 /
    fan_in) (the Switch paper starts them at 0.1 for stability; at this size 2.0 gives sharper routers)."""
    d, inner = config.d_model, config.num_heads * config.d_kv
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 2)[-2]
        if name.endswith("layer_norm.weight"):
            torch.nn.init.ones_(p)
            continue
        if name == "shared.weight":
            std = 1.0
        elif name == "lm_head.weight":
            std = d ** -0.5
        elif leaf == "q":
            std = (d * config.d_kv) ** -0.5
        elif leaf in ("k", "v", "relative_attention_bias"):
            std = d ** -0.5
        elif leaf == "o":
            std = inner ** -0.5
        elif leaf == "wi":
            std = d ** -0.5
        elif leaf == "wo":
            std = config.d_ff ** -0.5
        elif leaf == "classifier":
            std = router_scale * d ** -0.5
        else:
            raise ValueError(f"init_weights: no initialization rule for parameter {name}")
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=generator) * std)


class RouterLosses:
    """Collects every router's logits during a forward pass (forward hooks on :class:`Router`) and
    turns them into Switch's auxiliary losses."""

    def __init__(self, model: torch.nn.Module, num_experts: int):
        self.num_experts = num_experts
        self.logits: list[torch.Tensor] = []
        self.hooks = [m.register_forward_hook(self._record) for m in model.modules() if isinstance(m, Router)]

    def _record(self, module, args, output):
        self.logits.append(output)  # [N, E] float32

    def reset(self) -> None:
        """Drops logits recorded by forward passes that are not part of a training step."""
        self.logits = []

    def pop(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(load-balancing loss, z-loss, token counts [layers, E]) averaged over the recorded routers.

        Load balancing (Switch eq. 4): E * sum_e f_e * P_e with f_e the share of tokens whose top-1
        expert is e and P_e the mean router probability of e; 1.0 when perfectly balanced.
        z-loss (ST-MoE): mean of logsumexp(logits)^2, keeps router logits small.
        """
        balance, z, counts = [], [], []
        for logits in self.logits:
            probs = F.softmax(logits, dim=-1)  # [N, E]
            top1 = probs.argmax(dim=-1)
            f = torch.bincount(top1, minlength=self.num_experts).float() / top1.numel()  # [E]
            balance.append(self.num_experts * (f * probs.mean(dim=0)).sum())
            z.append(torch.logsumexp(logits, dim=-1).square().mean())
            counts.append(torch.bincount(top1, minlength=self.num_experts))
        self.logits = []
        return torch.stack(balance).mean(), torch.stack(z).mean(), torch.stack(counts)


@torch.no_grad()
def evaluate(model, samples, batch_size: int, pad_id: int, dtype: torch.dtype = torch.float32):
    """Mean token cross-entropy over ``samples`` and per-layer expert token counts [layers, E]."""
    model = model.to(dtype).eval()
    losses = RouterLosses(model, model.config.num_experts)
    total, tokens, counts = 0.0, 0, None
    for i in range(0, len(samples), batch_size):
        batch = data.collate(samples[i:i + batch_size], pad_id)
        out = model(**batch)
        n = int((batch["labels"] != -100).sum())
        total += float(out.loss) * n
        tokens += n
        _, _, c = losses.pop()
        counts = c if counts is None else counts + c
    for h in losses.hooks:
        h.remove()
    model.float().train()
    return total / tokens, counts


@torch.no_grad()
def expert_sensitivity(model, samples, batch_size: int, pad_id: int) -> dict:
    """Validation loss (float32) of ``model`` as is, with every expert matrix set to zero, and with
    round-to-nearest min/max ternary (QMoE's grid, one per row) on every expert matrix.

    The weights are restored afterwards. Measures how much of the model the experts carry."""
    from qmoe.quant import make_grid, quantize_rtn

    model = model.float()
    mats = [m.weight for _, mlp in model.sparse_mlps() for m in mlp.modules()
            if isinstance(m, torch.nn.Linear) and m is not mlp.router.classifier]
    saved = [w.detach().clone() for w in mats]
    base = evaluate(model, samples, batch_size, pad_id)[0]
    for w in mats:
        w.zero_()
    zero = evaluate(model, samples, batch_size, pad_id)[0]
    for w, s in zip(mats, saved):
        w.copy_(quantize_rtn(s[None], make_grid(s[None], "ternary", ternary_grid="minmax"))[0])
    rtn = evaluate(model, samples, batch_size, pad_id)[0]
    for w, s in zip(mats, saved):
        w.copy_(s)
    return {"expert_matrices": len(mats), "loss": round(base, 4), "experts_zero_loss": round(zero, 4),
            "experts_zero_delta": round(zero - base, 4), "rtn_minmax_ternary_loss": round(rtn, 4),
            "rtn_minmax_ternary_delta": round(rtn - base, 4)}


def router_sharpness(model, samples, batch_size: int, pad_id: int) -> dict:
    """Mean top-1 router probability per sparse layer over ``samples`` (float32)."""
    model = model.float().eval()
    sums: dict = {}

    def hook(name):
        def record(module, args, output):
            p = F.softmax(output.float(), dim=-1).max(dim=-1).values
            s, n = sums.get(name, (0.0, 0))
            sums[name] = (s + float(p.sum()), n + p.numel())
        return record

    hooks = [mlp.router.register_forward_hook(hook(name)) for name, mlp in model.sparse_mlps()]
    with torch.no_grad():
        for i in range(0, len(samples), batch_size):
            model(**data.collate(samples[i:i + batch_size], pad_id))
    for h in hooks:
        h.remove()
    model.train()
    return {name: round(s / n, 4) for name, (s, n) in sums.items()}


def train(args) -> None:
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # tiny Adam moments of rarely routed experts must not hit slow paths
    torch.use_deterministic_algorithms(True)
    out = Path(args.out)
    text_path = Path(args.text_out)
    t_start = time.time()

    if args.reuse_text:
        corpus = corpus_stats(text_path)
    else:
        corpus = write_corpus(text_path, args.text)
    print(f"corpus: {corpus['documents']} documents, {corpus['characters']} characters -> {text_path}", flush=True)
    if args.tokenizer_from:
        out.mkdir(parents=True, exist_ok=True)
        for name in ("spiece.model", "tokenizer_config.json", "special_tokens_map.json"):
            src = Path(args.tokenizer_from) / name
            if src.resolve() != (out / name).resolve():
                (out / name).write_bytes(src.read_bytes())
        tok = data.load_tokenizer(out)
    else:
        tok = train_tokenizer(text_path, out, args.pieces, args.extra_ids)
    print(f"tokenizer: {tok.vocab_size} ids ({tok.piece_count} pieces + {tok.extra_ids} sentinels)", flush=True)

    vocab = -(-tok.vocab_size // 128) * 128  # padded like T5's 32100 -> 32128
    config = SwitchConfig(
        vocab_size=vocab, d_model=args.d_model, d_kv=args.d_model // args.heads, d_ff=args.d_ff,
        num_heads=args.heads, num_layers=args.layers, num_decoder_layers=args.layers,
        num_experts=args.experts, expert_capacity=4096, encoder_sparse_step=args.sparse_step,
        decoder_sparse_step=args.sparse_step, is_full_sparse=args.sparse_step == 1,
        tie_word_embeddings=False, torch_dtype="bfloat16", router_jitter_noise=0.0,
        pad_token_id=tok.pad_id, eos_token_id=tok.eos_id, decoder_start_token_id=tok.pad_id)
    torch.manual_seed(args.seed)
    model = SwitchForConditionalGeneration(config)
    init_weights(model, config, torch.Generator().manual_seed(args.seed), args.router_init_scale)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params} parameters", flush=True)

    validation = data.make_samples(tok, text_path, n=args.val_samples, seed=args.seed, split="validation")
    train_samples = data.make_samples(tok, text_path, n=args.steps * args.batch_size, seed=args.seed,
                                      split="calibration")
    train_tokens = sum(s.input_ids.numel() + s.labels.numel() for s in train_samples)
    distinct = sum(len(tok.encode(d)) for d in data.load_documents(text_path, "calibration"))
    print(f"data: {len(train_samples)} training windows over {distinct} distinct calibration tokens "
          f"({len(train_samples) * 568 / distinct:.1f} passes), {len(validation)} validation windows", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98), eps=1e-8)

    def lr_at(step):
        warm = min(1.0, (step + 1) / args.warmup)
        return args.lr * warm * max(0.0, 1.0 - step / args.steps) if step >= args.warmup else args.lr * warm

    router = RouterLosses(model, config.num_experts)
    curve = []
    t_train = time.time()
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        batch = data.collate(train_samples[step * args.batch_size:(step + 1) * args.batch_size], tok.pad_id)
        router.reset()  # the periodic evaluation runs through the same hooks
        ce = model(**batch).loss
        balance, z, _ = router.pop()
        loss = ce + args.balance_coef * balance + args.z_coef * z
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.log_every == 0 or step == args.steps - 1:
            entry = {"step": step, "loss": round(ce.item(), 4), "balance": round(balance.item(), 4),
                     "z": round(z.item(), 3), "lr": lr_at(step), "seconds": round(time.time() - t_train, 1)}
            if step % args.eval_every == 0 or step == args.steps - 1:
                entry["val_loss"] = round(evaluate(model, validation[:32], args.batch_size, tok.pad_id)[0], 4)
            curve.append(entry)
            print(json.dumps(entry), flush=True)
    for h in router.hooks:
        h.remove()
    train_seconds = time.time() - t_train

    val_fp32, counts = evaluate(model, validation, args.batch_size, tok.pad_id)
    tail = train_samples[-len(validation):]
    train_fp32, _ = evaluate(model, tail, args.batch_size, tok.pad_id)
    model = model.to(torch.bfloat16)
    val_bf16, counts_bf16 = evaluate(model, validation, args.batch_size, tok.pad_id, dtype=torch.bfloat16)
    share = (counts_bf16.float() / counts_bf16.sum(dim=1, keepdim=True)).tolist()
    # Sensitivity of the stored (bf16-rounded) weights, evaluated in float32.
    model = model.to(torch.bfloat16).float()
    sensitivity = expert_sensitivity(model, validation, args.batch_size, tok.pad_id)
    top1 = router_sharpness(model, validation, args.batch_size, tok.pad_id)
    print(json.dumps({"sensitivity": sensitivity, "router_top1_prob": top1}), flush=True)
    model = model.to(torch.bfloat16)

    save(model, config, out)
    sparse = [name for name, _ in model.sparse_mlps()]
    report = {
        "seed": args.seed, "threads": args.threads, "steps": args.steps, "batch_size": args.batch_size,
        "layers": args.layers, "sparse_step": args.sparse_step, "experts": args.experts,
        "router_init_scale": args.router_init_scale,
        "lr": args.lr, "warmup": args.warmup, "weight_decay": args.weight_decay,
        "balance_coef": args.balance_coef, "z_coef": args.z_coef, "parameters": n_params,
        "corpus": corpus, "tokenizer": {"pieces": tok.piece_count, "extra_ids": tok.extra_ids,
                                         "vocab_size": tok.vocab_size, "model_vocab_size": vocab},
        "calibration_tokens": distinct, "training_windows": len(train_samples), "training_tokens": train_tokens,
        "validation_windows": len(validation),
        "train_loss_fp32_last_windows": round(train_fp32, 4), "validation_loss_fp32": round(val_fp32, 4),
        "validation_loss_bf16": round(val_bf16, 4), "uniform_loss": round(math.log(tok.vocab_size), 4),
        "expert_token_share_bf16": {name: [round(s, 4) for s in row] for name, row in zip(sparse, share)},
        "expert_sensitivity_fp32": sensitivity, "router_top1_prob_fp32": top1,
        "train_seconds": round(train_seconds, 1), "total_seconds": round(time.time() - t_start, 1),
        "torch": torch.__version__, "curve": curve,
    }
    (out / "training.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "curve"}, indent=1), flush=True)


def save(model: SwitchForConditionalGeneration, config: SwitchConfig, out: Path) -> None:
    """Writes ``config.json`` and a bfloat16 ``model.safetensors`` with transformers tensor names.

    The ``encoder/decoder.embed_tokens.weight`` copies of ``shared.weight`` are stored too: for an
    untied model transformers loads them as separate tensors and would otherwise initialize them
    randomly (qmoe's reader drops them).
    """
    from safetensors.torch import save_file

    state = {name: t.detach().to(torch.bfloat16).contiguous() for name, t in model.state_dict().items()}
    for alias in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        state[alias] = state["shared.weight"].clone()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="qmoe/assets/switch-mini-8", help="model folder to write")
    p.add_argument("--text-out", default="qmoe/assets/text/python-docs.jsonl.gz", help="corpus file to write")
    p.add_argument("--text", nargs="*", default=[], help="extra .txt/.jsonl/.json.gz files or folders")
    p.add_argument("--reuse-text", action="store_true",
                   help="use the existing --text-out corpus as is instead of rebuilding it")
    p.add_argument("--tokenizer-from", default=None,
                   help="copy the tokenizer files from this folder instead of training a new tokenizer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (results depend on it)")
    p.add_argument("--pieces", type=int, default=2000, help="SentencePiece vocabulary (without sentinels)")
    p.add_argument("--extra-ids", type=int, default=100, help="number of <extra_id_N> sentinels")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--d-ff", type=int, default=512)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=4, help="blocks per stack")
    p.add_argument("--sparse-step", type=int, default=1,
                   help="block i of each stack is sparse when i %% step == 1 or step == 1 (1: every block, "
                        "as switch-c-2048; 2: every second block, as switch-base)")
    p.add_argument("--experts", type=int, default=4, help="experts per sparse block")
    p.add_argument("--router-init-scale", type=float, default=2.0,
                   help="router init std as a multiple of d_model^-0.5 (Switch paper: 0.1)")
    p.add_argument("--steps", type=int, default=900)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--balance-coef", type=float, default=0.01, help="Switch load-balancing loss weight")
    p.add_argument("--z-coef", type=float, default=0.0,
                   help="router z-loss weight (ST-MoE: 0.001; 0 lets the routers sharpen)")
    p.add_argument("--val-samples", type=int, default=128)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=100)
    train(p.parse_args(argv))


if __name__ == "__main__":
    main()

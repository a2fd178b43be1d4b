"""qmoe.ops: the torch.library op on the CPU (codec reference), its fake implementation, checks and
helpers, compared with dense matmuls of the decoded weights."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from qmoe import codec, ops
from qmoe.codec.dictionary import tunstall_dictionary
from qmoe.storage import PackedExperts


@pytest.fixture(scope="module")
def dictionary():
    return tunstall_dictionary([[0.05, 0.90, 0.05], [0.3, 0.4, 0.3]], max_entries=4095)


@pytest.fixture(scope="module")
def dict_tensors(dictionary):
    return ops.dictionary_tensors(dictionary)


def make_layer(dictionary, num_experts, rows, cols, seed=0):
    """Returns (encoded matrices, layer tensors in the stored layout)."""
    rng = np.random.default_rng(seed)
    encoded = []
    for _ in range(num_experts):
        p_zero = rng.uniform(0.5, 0.95, size=(rows, 1))
        w = np.where(rng.random((rows, cols)) < p_zero, 0, rng.choice([-1, 1], size=(rows, cols))).astype(np.int8)
        scales = np.stack([-rng.uniform(0.01, 1, rows), rng.uniform(0.01, 1, rows)], axis=1)
        encoded.append(codec.encode(w, scales=scales, dictionary=dictionary))
    return encoded, PackedExperts.from_encoded(encoded, dictionary).tensors


def dense_reference(x, encoded, bounds):
    """x [T, cols] sorted by expert -> float64 [T, rows] via dense matmul of the dequantized weights."""
    y = torch.zeros(x.shape[0], encoded[0].rows, dtype=torch.float64)
    for e, enc in enumerate(encoded):
        a, b = bounds[e], bounds[e + 1]
        y[a:b] = x[a:b].double() @ torch.from_numpy(codec.dequantize(enc)).double().T
    return y


def offsets(counts):
    return torch.tensor(np.concatenate([[0], np.cumsum(counts)]), dtype=torch.int64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_cpu_equals_dense_matmul(dictionary, dict_tensors, dtype):
    counts = [3, 0, 1, 7, 0]  # empty experts included
    encoded, layer = make_layer(dictionary, len(counts), rows=19, cols=118)
    token_offsets = offsets(counts)
    x = torch.randn(sum(counts), 118).to(dtype)
    y = ops.grouped_ternary_matmul(x, token_offsets, layer, dict_tensors)
    assert y.dtype == dtype and y.shape == (sum(counts), 19)
    ref = dense_reference(x, encoded, token_offsets.tolist())
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol)


def test_single_matrix_wrapper(dictionary, dict_tensors):
    encoded, layer = make_layer(dictionary, 1, rows=3, cols=65, seed=1)
    matrix = {k: layer[k][0] for k in ("row_offsets", "row_class", "scales")}
    matrix["codewords"] = layer["codewords"]
    x = torch.randn(5, 65)
    y = ops.ternary_matmul(x, matrix, dict_tensors)
    torch.testing.assert_close(y.double(), dense_reference(x, encoded, [0, 5]), rtol=1e-4, atol=1e-4)


def op_args(x, token_offsets, layer, dict_tensors):
    return (x, token_offsets, *(layer[k] for k in ops._LAYER_KEYS), *(dict_tensors[k] for k in ops._DICTIONARY_KEYS))


def test_opcheck_cpu(dictionary, dict_tensors):
    _, layer = make_layer(dictionary, 3, rows=8, cols=40, seed=2)
    args = op_args(torch.randn(6, 40), offsets([2, 0, 4]), layer, dict_tensors)
    torch.library.opcheck(torch.ops.qmoe.ternary_grouped_matmul.default, args)


def test_fake_impl_and_compile(dictionary, dict_tensors):
    encoded, layer = make_layer(dictionary, 2, rows=6, cols=33, seed=3)
    token_offsets = offsets([4, 1])

    def layer_fn(x):
        return torch.relu(ops.grouped_ternary_matmul(x, token_offsets, layer, dict_tensors)) * 2

    x = torch.randn(5, 33)
    compiled = torch.compile(layer_fn, backend="aot_eager", fullgraph=True)
    ref = torch.relu(dense_reference(x, encoded, [0, 4, 5])) * 2
    torch.testing.assert_close(compiled(x).double(), ref, rtol=1e-4, atol=1e-4)

    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = ops.grouped_ternary_matmul(mode.from_tensor(x.bfloat16()), token_offsets, layer, dict_tensors)
    assert fake.shape == (5, 6) and fake.dtype == torch.bfloat16


def test_bad_arguments_raise_naming_the_tensor(dictionary, dict_tensors):
    _, layer = make_layer(dictionary, 2, rows=4, cols=20, seed=4)
    x = torch.randn(3, 20)
    with pytest.raises(ValueError, match="row_class must be uint8"):
        ops.grouped_ternary_matmul(x, offsets([1, 2]), {**layer, "row_class": layer["row_class"].int()}, dict_tensors)
    with pytest.raises(ValueError, match=r"scales must have shape \[2, 4, 2\]"):
        ops.grouped_ternary_matmul(x, offsets([1, 2]), {**layer, "scales": layer["scales"][:, :3]}, dict_tensors)
    with pytest.raises(ValueError, match=r"token_offsets must have shape \[3\]"):
        ops.grouped_ternary_matmul(x, offsets([3]), layer, dict_tensors)
    with pytest.raises(ValueError, match="token_offsets must rise from 0 to 3"):
        ops.grouped_ternary_matmul(x, offsets([1, 1]), layer, dict_tensors)
    with pytest.raises(ValueError, match=r"missing tensors \['scales'\]"):
        ops.grouped_ternary_matmul(x, offsets([1, 2]), {k: v for k, v in layer.items() if k != "scales"}, dict_tensors)
    with pytest.raises(ValueError, match="packed_entries must be"):
        ops.grouped_ternary_matmul(x, offsets([1, 2]), layer,
                                   {**dict_tensors, "packed_entries": dict_tensors["packed_entries"][..., :1]})


def test_corrupt_codeword_names_the_expert(dictionary, dict_tensors):
    _, layer = make_layer(dictionary, 2, rows=4, cols=20, seed=5)
    codewords = layer["codewords"].clone()
    codewords[int(layer["expert_offsets"][1])] = 65535  # beyond every class's 4095 entries
    with pytest.raises(codec.CodecError, match="expert 1"):
        ops.grouped_ternary_matmul(torch.randn(3, 20), offsets([1, 2]), {**layer, "codewords": codewords},
                                   dict_tensors)


def test_pack_dictionary_rejects_bad_tables():
    with pytest.raises(ValueError, match=r"\[K, 65536\]"):
        ops.pack_dictionary(np.zeros((1, 10), np.uint8), np.zeros((1, 10), np.uint64), np.zeros((1, 10), np.uint64))
    nonzero = np.zeros((1, 1 << 16), np.uint64)
    nonzero[0, 0] = (1 << 33) - 1
    with pytest.raises(ValueError, match="more than 32 nonzero"):
        ops.pack_dictionary(np.full((1, 1 << 16), 64, np.uint8), nonzero, np.zeros_like(nonzero))


def test_import_needs_no_gpu_and_missing_extension_is_a_clear_error(monkeypatch):
    code = ("import sys, torch, qmoe.ops; assert 'qmoe._cuda' not in sys.modules; "
            "assert not torch.cuda.is_initialized(); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"
    import qmoe

    monkeypatch.setitem(sys.modules, "qmoe._cuda", None)  # makes `from . import _cuda` fail ...
    monkeypatch.delattr(qmoe, "_cuda", raising=False)  # ... even after an earlier successful import
    with pytest.raises(RuntimeError, match="qmoe._cuda.*not built"):
        ops._cuda_extension()
    assert ops.cuda_available() is False


def test_cuda_binding_validates_before_touching_the_device():
    # Runs without a GPU: every check below fails before the extension makes its first CUDA call.
    ext = pytest.importorskip("qmoe._cuda", reason="CUDA extension not built")
    args = dict(x=0, y=0, dtype=0, total_tokens=10, token_offsets=0, num_experts=1, codewords=0, n_codewords=0,
                expert_offsets=0, row_offsets=0, row_class=0, scales=0, entries=0, num_classes=1, rows=8, cols=8,
                workspace=0, workspace_bytes=0, path=0, device=0, stream=0)
    assert ext.workspace_bytes(1, 10) >= 16 + 16 * 10  # counters + one GEMV item per token at most
    for change, message in [({"dtype": 7}, "dtype must be"), ({"rows": -1}, "rows and cols"),
                            ({"num_classes": 0}, "num_classes"), ({"path": 3}, "path must be"), ({"entries": 8}, "16-byte aligned"),
                            ({}, "workspace smaller")]:
        with pytest.raises(RuntimeError, match=message):
            ext.grouped_matmul(**{**args, **change})


def test_kernel_path_setting():
    assert ops._kernel_path == "auto"
    with ops.kernel_path("tile"):
        assert ops._kernel_path == "tile"
    assert ops._kernel_path == "auto"
    with pytest.raises(ValueError, match="kernel path must be one of"):
        with ops.kernel_path("fast"):
            pass

"""The CUDA decode+GEMM (qmoe._cuda through qmoe.ops) against the codec's CPU reference and dense
matmul of the decoded weights, over awkward shapes, batch sizes, dtypes, grouped and single-matrix
calls, CUDA graphs and torch.compile. Skipped without a CUDA device or the compiled extension."""

import numpy as np
import pytest
import torch

from qmoe import codec, ops

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not ops.cuda_available(), reason="needs a CUDA device and the qmoe._cuda extension"),
]

DEVICE = "cuda"


@pytest.fixture(scope="module")
def dictionary():
    return codec.default_dictionary()


@pytest.fixture(scope="module")
def dict_cpu(dictionary):
    return ops.dictionary_tensors(dictionary)


@pytest.fixture(scope="module")
def dict_gpu(dict_cpu):
    return {k: v.to(DEVICE) for k, v in dict_cpu.items()}


def random_ternary(rng, rows, cols):
    """Rows of varying sparsity around GPTQ's (P(0) ~ 0.5-0.97), so every dictionary class is used."""
    p_zero = rng.uniform(0.5, 0.97, size=(rows, 1))
    signs = np.where(rng.random((rows, cols)) < 0.5, -1, 1)
    return np.where(rng.random((rows, cols)) < p_zero, 0, signs).astype(np.int8)


def make_layer(dictionary, num_experts, rows, cols, seed):
    from qmoe.storage import PackedExperts

    rng = np.random.default_rng(seed)
    encoded = []
    for _ in range(num_experts):
        scales = np.stack([-rng.uniform(0.01, 0.1, rows), rng.uniform(0.01, 0.1, rows)], axis=1)
        encoded.append(codec.encode(random_ternary(rng, rows, cols), scales=scales, dictionary=dictionary))
    return encoded, PackedExperts.from_encoded(encoded, dictionary).tensors


def to_gpu(tensors):
    return {k: v.to(DEVICE) for k, v in tensors.items()}


def offsets(counts):
    return torch.tensor(np.concatenate([[0], np.cumsum(counts)]), dtype=torch.int64)


def check_close(y_gpu, x_cpu, token_offsets, layer_cpu, dict_cpu, encoded):
    """Compares with the CPU op (codec reference) and a dense float64 matmul of the decoded weights.

    The kernel accumulates in fp32 and rounds once to x's dtype, so the error is the output rounding
    (plus fp32 summation order): bf16 ~ 2^-8 relative to the row's magnitude."""
    y = y_gpu.float().cpu()
    ref_cpu = ops.grouped_ternary_matmul(x_cpu.float(), token_offsets, layer_cpu, dict_cpu)
    bounds = token_offsets.tolist()
    dense = torch.zeros_like(ref_cpu, dtype=torch.float64)
    for e, enc in enumerate(encoded):
        a, b = bounds[e], bounds[e + 1]
        dense[a:b] = x_cpu[a:b].double() @ torch.from_numpy(codec.dequantize(enc)).double().T
    eps = {torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10, torch.float32: 1e-5}[y_gpu.dtype]
    scale = dense.abs().amax().item() + 1e-6
    torch.testing.assert_close(y, ref_cpu, rtol=eps, atol=eps * scale)
    torch.testing.assert_close(y.double(), dense, rtol=eps, atol=eps * scale)


# "auto" picks the GEMV path for these small shapes; "tile" forces tensor cores from 16 tokens up.
PATHS = ["auto", "tile"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("rows,cols", [(1, 1), (3, 5), (118, 300), (64, 2080), (130, 517)])
@pytest.mark.parametrize("tokens", [1, 2, 3, 8, 9, 16, 17, 64, 130])
def test_single_matrix_bf16(dictionary, dict_cpu, dict_gpu, rows, cols, tokens, path):
    encoded, layer = make_layer(dictionary, 1, rows, cols, seed=rows * 7 + cols)
    x = torch.randn(tokens, cols, dtype=torch.bfloat16)
    matrix = {"codewords": layer["codewords"], "row_offsets": layer["row_offsets"][0],
              "row_class": layer["row_class"][0], "scales": layer["scales"][0]}
    with ops.kernel_path(path):
        y = ops.ternary_matmul(x.to(DEVICE), to_gpu(matrix), dict_gpu)
    assert y.dtype == torch.bfloat16 and y.shape == (tokens, rows)
    check_close(y, x, offsets([tokens]), layer, dict_cpu, encoded)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("counts", [[0, 1, 5, 16, 0, 70, 3, 9], [2] * 8, [0] * 7 + [33], [1, 0, 0, 0, 0, 0, 0, 0]])
def test_grouped_layer(dictionary, dict_cpu, dict_gpu, dtype, counts, path):
    encoded, layer = make_layer(dictionary, len(counts), rows=200, cols=333, seed=len(counts) + sum(counts))
    token_offsets = offsets(counts)
    x = torch.randn(sum(counts), 333).to(dtype)
    with ops.kernel_path(path):
        y = ops.grouped_ternary_matmul(x.to(DEVICE), token_offsets.to(DEVICE), to_gpu(layer), dict_gpu)
    assert y.dtype == dtype
    check_close(y, x, token_offsets, layer, dict_cpu, encoded)


def test_switch_shapes(dictionary, dict_cpu, dict_gpu):
    # c2048's wi and wo shapes, a layer of 4 experts with GEMV- and tensor-core-sized token groups.
    for rows, cols in ((6144, 2080), (2080, 6144)):
        counts = [1, 0, 12, 40]
        encoded, layer = make_layer(dictionary, len(counts), rows, cols, seed=rows)
        token_offsets = offsets(counts)
        x = torch.randn(sum(counts), cols, dtype=torch.bfloat16)
        for path in ("auto", "gemv", "tile"):
            with ops.kernel_path(path):
                y = ops.grouped_ternary_matmul(x.to(DEVICE), token_offsets.to(DEVICE), to_gpu(layer), dict_gpu)
            check_close(y, x, token_offsets, layer, dict_cpu, encoded)


def test_cuda_graph_replay(dictionary, dict_gpu):
    counts = [3, 0, 20]
    _, layer = make_layer(dictionary, 3, rows=96, cols=160, seed=5)
    layer, token_offsets = to_gpu(layer), offsets(counts).to(DEVICE)
    x = torch.randn(sum(counts), 160, dtype=torch.bfloat16, device=DEVICE)
    expected = ops.grouped_ternary_matmul(x, token_offsets, layer, dict_gpu)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the default stream, as torch recommends
        ops.grouped_ternary_matmul(x, token_offsets, layer, dict_gpu)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = ops.grouped_ternary_matmul(x, token_offsets, layer, dict_gpu)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(y, ops.grouped_ternary_matmul(x, token_offsets, layer, dict_gpu))
    assert not torch.equal(y, expected)  # the replay used the new x


def test_opcheck_and_compile_cuda(dictionary, dict_gpu):
    _, layer = make_layer(dictionary, 2, rows=40, cols=50, seed=6)
    layer, token_offsets = to_gpu(layer), offsets([4, 17]).to(DEVICE)
    x = torch.randn(21, 50, dtype=torch.bfloat16, device=DEVICE)
    args = (x, token_offsets, *(layer[k] for k in ops._LAYER_KEYS), *(dict_gpu[k] for k in ops._DICTIONARY_KEYS))
    torch.library.opcheck(torch.ops.qmoe.ternary_grouped_matmul.default, args)
    compiled = torch.compile(lambda v: ops.grouped_ternary_matmul(v, token_offsets, layer, dict_gpu) * 2,
                             fullgraph=True)
    torch.testing.assert_close(compiled(x), ops.grouped_ternary_matmul(x, token_offsets, layer, dict_gpu) * 2)


def test_corrupt_layer_never_reads_out_of_bounds(dictionary, dict_gpu):
    # Offsets past the stream and a class beyond the dictionary: the kernel must clamp, not fault
    # (compute-sanitizer memcheck of this test is the stronger check, see benchmarks/README section).
    _, layer = make_layer(dictionary, 2, rows=16, cols=64, seed=7)
    layer = to_gpu(layer)
    layer["row_offsets"] = layer["row_offsets"].clone()
    layer["row_offsets"][1, 5] = 2 ** 30
    layer["row_class"] = layer["row_class"].clone()
    layer["row_class"][0, 3] = 200
    x = torch.randn(5, 64, dtype=torch.bfloat16, device=DEVICE)
    y = ops.grouped_ternary_matmul(x, offsets([2, 3]).to(DEVICE), layer, dict_gpu)
    torch.cuda.synchronize()
    assert torch.isfinite(y).all()
    assert (y[:2, 3] == 0).all()  # the row with an unknown class decodes to nothing


def test_malformed_token_offsets_give_zeros(dictionary, dict_gpu):
    _, layer = make_layer(dictionary, 3, rows=16, cols=64, seed=8)
    layer = to_gpu(layer)
    x = torch.randn(6, 64, dtype=torch.bfloat16, device=DEVICE)
    for bad in ([0, 4, 2, 6], [1, 2, 3, 6], [0, 2, 3, 5]):  # decreasing, not from 0, not to T
        y = torch.ops.qmoe.ternary_grouped_matmul(
            x, torch.tensor(bad, device=DEVICE), *(layer[k] for k in ops._LAYER_KEYS),
            *(dict_gpu[k] for k in ops._DICTIONARY_KEYS))
        assert (y == 0).all(), bad
    # A single expert takes the launch without a work list; it checks its offsets itself.
    _, single = make_layer(dictionary, 1, rows=16, cols=64, seed=9)
    single = to_gpu(single)
    y = torch.ops.qmoe.ternary_grouped_matmul(
        x, torch.tensor([0, 5], device=DEVICE), *(single[k] for k in ops._LAYER_KEYS),
        *(dict_gpu[k] for k in ops._DICTIONARY_KEYS))
    assert (y == 0).all()

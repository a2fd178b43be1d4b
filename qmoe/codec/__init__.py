"""Sub-1-bit codec for ternary expert matrices; the format is specified in codec/FORMAT.md.

Public API::

    d = default_dictionary()                   # tunstall, 8 classes (cached); qmoe_dictionary(); fit_dictionary(...)
    enc = encode(ternary, scales=None, dictionary=None)   # int8 [rows, cols] in {-1, 0, 1}
    decode(enc) -> int8 [rows, cols];  dequantize(enc) -> float32 [rows, cols]
    matmul(x, enc) -> x @ W.T  (float32 [tokens, rows], decodes on the fly)
    validate(enc)  (raises CodecError);  pack_layer([enc, ...]) / unpack_expert(layer, e)
    bits_report(enc_or_list, dictionary_amortized_over=...)
"""

from .decoder import decode, dequantize
from .dictionary import (
    DEFAULT_CLASS_ZERO_PROBABILITIES,
    FORMAT_VERSION,
    Dictionary,
    default_dictionary,
    fit_class_probabilities,
    fit_dictionary,
    qmoe_dictionary,
    row_symbol_counts,
    tunstall_class,
    tunstall_dictionary,
)
from .encoder import CLASS_SELECTIONS, encode
from .errors import CodecError
from .matmul import matmul
from .matrix import (
    C2048_EXPERT_WEIGHTS,
    EncodedMatrix,
    bf16_bits_to_float,
    bits_report,
    float_to_bf16_bits,
    pack_layer,
    unpack_expert,
    validate,
)

__all__ = [
    "FORMAT_VERSION",
    "DEFAULT_CLASS_ZERO_PROBABILITIES",
    "C2048_EXPERT_WEIGHTS",
    "CLASS_SELECTIONS",
    "CodecError",
    "Dictionary",
    "EncodedMatrix",
    "default_dictionary",
    "qmoe_dictionary",
    "fit_dictionary",
    "fit_class_probabilities",
    "tunstall_class",
    "tunstall_dictionary",
    "row_symbol_counts",
    "encode",
    "decode",
    "dequantize",
    "matmul",
    "validate",
    "pack_layer",
    "unpack_expert",
    "bits_report",
    "float_to_bf16_bits",
    "bf16_bits_to_float",
]

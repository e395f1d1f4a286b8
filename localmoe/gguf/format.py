"""The GGUF format's names and numbers, in one table.

Type codes and block sizes come from `gguf` (the format's reference Python package) so they can never
drift; what is listed here is what localmoe itself decides: which types the kernels run, and the
metadata keys localmoe writes beyond llama.cpp's own.
"""
from __future__ import annotations

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as GGMLType, GGUFValueType  # noqa: F401

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# Weight types the kernels compute on directly (block elements, bytes per block).
SUPPORTED_TYPES = {
    GGMLType.F32: GGML_QUANT_SIZES[GGMLType.F32],
    GGMLType.F16: GGML_QUANT_SIZES[GGMLType.F16],
    GGMLType.BF16: GGML_QUANT_SIZES[GGMLType.BF16],
    GGMLType.Q8_0: GGML_QUANT_SIZES[GGMLType.Q8_0],
    GGMLType.Q4_0: GGML_QUANT_SIZES[GGMLType.Q4_0],
}

# --quant choices of the converter -> the type of large weight matrices.
QUANT_CHOICES = {
    "f32": GGMLType.F32,
    "f16": GGMLType.F16,
    "bf16": GGMLType.BF16,
    "q8_0": GGMLType.Q8_0,
    "q4_0": GGMLType.Q4_0,
}


def type_name(t: int) -> str:
    try:
        return GGMLType(t).name
    except ValueError:
        return f"type#{t}"


def row_bytes(t: int, n: int) -> int:
    """Bytes of one row of n elements of type t (n must be a multiple of the block size)."""
    block, size = GGML_QUANT_SIZES[GGMLType(t)]
    return n // block * size


# Metadata keys localmoe writes in addition to llama.cpp's ({arch} is the architecture string).
KEY_ATTN_SCALE = "localmoe.attention.scale"            # softmax scale exactly as the reference computes it
KEY_ROPE_INTERLEAVED = "localmoe.rope.interleaved"     # True: pairs (x0,x1); False: halves (x0,x_d/2)
KEY_QUANT_FALLBACK = "localmoe.quant_fallback"         # tensors kept in F16 because rows % 32 != 0
KEY_SOURCE_ARCH = "localmoe.source_architecture"       # the HF class the file was converted from
KEY_TOKENIZER_VERSION = "localmoe.tokenizer.version"   # e.g. "v15" (tekken) or "v1"/"v3" (SentencePiece)
KEY_TOKENIZER_PATTERN = "localmoe.tokenizer.pattern"   # byte-level BPE pre-tokenizer regex (tiktoken pat_str)
KEY_PROJECTOR_NORM_EPS = "localmoe.vision.projector_norm_epsilon"  # mm.input_norm eps (the text rms_norm_eps)
KEY_CHAT_FORMAT = "localmoe.chat.format"               # prompt format, e.g. "mistral-v15", "mistral-v1"
KEY_CHAT_EFFORTS = "localmoe.chat.reasoning_efforts"   # accepted reasoning_effort values ([] = no setting)
KEY_CHAT_EFFORT_DEFAULT = "localmoe.chat.reasoning_effort_default"  # the settings builder's default

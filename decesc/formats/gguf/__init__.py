"""A from-scratch GGUF reader, and the conversion of a GGUF to Hugging Face form.

- :mod:`~decesc.formats.gguf.reader`: the file format (header, metadata, tensor directory),
  :func:`read_gguf` -> :class:`GGUFFile`, :class:`GGUFError`;
- :mod:`~decesc.formats.gguf.quants`: ggml's tensor types and the dequantisers;
- :mod:`~decesc.formats.gguf.convert`: GGUF -> HF config and state dict, :func:`gguf_to_hf`;
- :mod:`~decesc.formats.gguf.tokenizer`: the HF tokenizer rebuilt from the metadata.

The architectures accepted come from the family table, :mod:`decesc.core.families`.
"""

from decesc.formats.gguf.convert import (
    SUPPORTED_ARCHITECTURES,
    gguf_to_hf,
    hf_config,
    hf_parameter_name,
    hf_state_dict,
    llama3_rope_scaling,
    tensor_names,
    unpermute_rope_rows,
)
from decesc.formats.gguf.quants import (
    DEQUANTISERS,
    GGML_TYPES,
    ggml_type_name,
    supported_ggml_types,
)
from decesc.formats.gguf.reader import (
    DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    SUPPORTED_VERSIONS,
    GGUFError,
    GGUFFile,
    TensorInfo,
    read_gguf,
)
from decesc.formats.gguf.tokenizer import (
    TOKEN_CONTROL,
    TOKEN_NORMAL,
    TOKEN_USER_DEFINED,
    build_tokenizer,
    tokenizer_meta,
)

__all__ = [
    "DEFAULT_ALIGNMENT", "DEQUANTISERS", "GGML_TYPES", "GGUF_MAGIC", "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_VERSIONS", "TOKEN_CONTROL", "TOKEN_NORMAL", "TOKEN_USER_DEFINED", "GGUFError",
    "GGUFFile", "TensorInfo", "build_tokenizer", "ggml_type_name", "gguf_to_hf", "hf_config",
    "hf_parameter_name", "hf_state_dict", "llama3_rope_scaling", "read_gguf",
    "supported_ggml_types", "tensor_names", "tokenizer_meta", "unpermute_rope_rows",
]

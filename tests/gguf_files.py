"""Small Llama GGUF files for the tests, written with the `gguf` package as llama.cpp's converter writes them:
`llama.*` metadata, then the tensors under llama.cpp's names. Shared by test_llama and test_model_files."""
from collections.abc import Callable

import gguf
import numpy as np

from ch06_llama.checkpoints import GGUF_NAMES
from ch06_llama.layers import LlamaConfig

HF_TO_GGUF = {hf: name for name, hf in GGUF_NAMES.items()}


def gguf_name(name: str) -> str:
    """llama.cpp's name for the Llama weight transformers calls `name` ("model.layers.0.mlp.up_proj.weight" ->
    "blk.0.ffn_up.weight")."""
    if name.startswith("model.layers."):
        _, _, layer, *module, kind = name.split(".")
        return f"blk.{layer}.{HF_TO_GGUF['.'.join(module)]}.{kind}"
    return f"{HF_TO_GGUF[name.rsplit('.', 1)[0]]}.weight"


def write_llama_gguf(path, cfg: LlamaConfig, tensors: dict[str, np.ndarray],
                     more_metadata: Callable[[gguf.GGUFWriter], None] = lambda writer: None,
                     block_count: int | None = None, head_count: int | None = None) -> None:
    """A GGUF file of the Llama `cfg` describes, holding `tensors` (llama.cpp's names -> arrays).
    `more_metadata` adds keys (a tokenizer, say); `block_count` and `head_count` make a damaged file."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(cfg.context_length)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_block_count(cfg.n_layer if block_count is None else block_count)
    writer.add_feed_forward_length(cfg.ffn_hidden)
    writer.add_head_count(cfg.n_head if head_count is None else head_count)
    writer.add_head_count_kv(cfg.n_kv_head)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_rope_dimension_count(cfg.n_embd // cfg.n_head)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    more_metadata(writer)
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

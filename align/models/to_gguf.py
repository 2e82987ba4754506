"""Write a Llama-family Hugging Face model folder as one GGUF file (llama.cpp, Ollama) with the `gguf` package:
tensors renamed by gguf's own name map, Q/K rows permuted to llama.cpp's rotary layout (as llama.cpp's
convert_hf_to_gguf.py does), the BPE tokenizer, its special tokens and the chat template."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from align.errors import ModelError

ARCHITECTURES = ("LlamaForCausalLM",)  # the default model's family; others need their own metadata and name map
TYPES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "q8_0": ("Q8_0", "MOSTLY_Q8_0")}


def permute_rotary(weights: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half Q/K rows -> llama.cpp's interleaved pairs: per head, row i of the first half and row i of
    the second half become rows 2i and 2i+1.  weights: [n_head * head_dim, in]."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def vocab(tokenizer: Any, size: int) -> tuple[list[str], list[int]]:
    """Tokens in id order and their GGUF types (normal, control for special added tokens, user-defined)."""
    import gguf

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def write_metadata(writer: Any, config: Any, name: str) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(theta or getattr(config, "rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)


def added_specials(tokenizer: Any) -> dict[str, bool]:
    """{"bos": ..., "eos": ...}: whether the tokenizer puts its BOS first / EOS last when it encodes a text."""
    ids = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return {"bos": bos is not None and ids[0] == bos, "eos": eos is not None and ids[-1] == eos}


def write_tokenizer(writer: Any, folder: Path, tokenizer: Any, vocab_size: int, pre: str) -> None:
    import gguf

    if not getattr(tokenizer, "is_fast", False) or not (folder / "tokenizer.json").is_file():
        raise ModelError(f"{folder}: GGUF export needs a fast BPE tokenizer (tokenizer.json)")
    tokens, types = vocab(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    special.chat_template = None  # written below from the tokenizer, whichever file it came from
    # Whether BOS/EOS wrap a tokenized text, as the HF tokenizer does it: left unset, llama.cpp guesses per
    # tokenizer type and version (a second <|im_start|> in front of every ChatML prompt when it guesses BOS)
    special.add_special_token.update(added_specials(tokenizer))
    special.add_to_gguf(writer, quiet=True)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def tensors(model: Any, qtype: str) -> list[tuple[str, np.ndarray, Any]]:
    """(GGUF name, data, raw dtype or None) per tensor; 1-D tensors (norms) stay float32 as llama.cpp expects."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    target = gguf.GGMLQuantizationType[TYPES[qtype][0]]
    out = []
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd for the output when output.weight is absent
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ModelError(f"GGUF export: no llama.cpp name for tensor {hf_name}")
        data = tensor.detach().float().cpu().numpy()
        if hf_name.endswith("q_proj.weight"):
            data = permute_rotary(data, config.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            data = permute_rotary(data, config.num_key_value_heads)
        if data.ndim == 1 or target == gguf.GGMLQuantizationType.F32:
            out.append((name, data.astype(np.float32), None))
        elif target == gguf.GGMLQuantizationType.F16:
            out.append((name, data.astype(np.float16), None))
        else:
            out.append((name, gguf.quants.quantize(data, target), target))
    return out


def export_gguf(folder: Path, out: Path, *, qtype: str = "f16", name: str = "", pre: str = "smollm") -> Path:
    """Write the model in `folder` (safetensors + tokenizer) as the GGUF file `out`."""
    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True)
    arch = type(model).__name__
    if arch not in ARCHITECTURES:
        raise ModelError(f"GGUF export supports {', '.join(ARCHITECTURES)} (the default model's family); "
                         f"{folder} is a {arch}: export safetensors and convert with llama.cpp's "
                         f"convert_hf_to_gguf.py")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    writer = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    write_metadata(writer, model.config, name or Path(folder).name)
    writer.add_file_type(gguf.LlamaFileType[TYPES[qtype][1]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_tokenizer(writer, Path(folder), tokenizer, model.config.vocab_size, pre)
    for tensor_name, data, raw in tensors(model, qtype):
        writer.add_tensor(tensor_name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out

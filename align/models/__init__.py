"""Model loading (default embedded model, local folders, QLoRA) and PEFT methods."""

from align.models.load import load_model, load_tokenizer, pick_dtype, resolve_model

__all__ = ["load_model", "load_tokenizer", "pick_dtype", "resolve_model"]

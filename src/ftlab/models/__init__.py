from ftlab.models.load import load_model_and_tokenizer, resolve_model_path

__all__ = ["load_model_and_tokenizer", "resolve_model_path"]

"""Model families: one registered description each (base.py); importing this package registers them all."""
from . import gemma2, gemma3, llama, mistral, phi3, qwen2, qwen3  # noqa: F401  (each module registers its family)
from .base import EMBED, FINAL_NORM, LM_HEAD, STAGES, Family, LayerNorms, Projection, get, names, register

__all__ = ["EMBED", "FINAL_NORM", "LM_HEAD", "STAGES", "Family", "LayerNorms", "Projection", "get", "names", "register"]

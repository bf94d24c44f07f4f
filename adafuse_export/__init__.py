"""adafuse-export: deploy router-based mixture-of-LoRA-experts LLMs (AdaFuse pre-gating + fused kernels)."""

__version__ = "0.1.0"

"""The PyTorch reference model: the ground truth every runner is checked against."""
from .model import KVCache, ReferenceModel, StepOutput, lora_delta, route_topk, routing_table

__all__ = ["KVCache", "ReferenceModel", "StepOutput", "lora_delta", "route_topk", "routing_table"]

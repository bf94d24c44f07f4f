"""`moe-peft`: MixLoRA, LoRAMoE and MoLA adapters as saved by MoE-PEFT / the mixlora package.

(Implemented from the layouts in docs/formats/moe-peft.md.)
"""

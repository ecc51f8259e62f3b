"""LoRA+ (Hayou, Ghosh & Yu 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models", ICML 2024).

Plain LoRA trained with two learning rates, η_B = λ·η_A (paper Sec. 3: efficient feature learning
in the infinite-width limit needs η_A = Θ(n⁻¹), η_B = Θ(1); in practice a fixed ratio λ, 2⁴
recommended, as in PEFT's ``create_loraplus_optimizer``). ``loraplus_groups`` returns torch param
groups: every trainable parameter whose name ends in ``lora_B`` (the B factor of LoRA-shaped
adapters) gets ``lr·ratio``; every other trainable parameter (``lora_A``, magnitudes, heads, ...)
gets ``lr``. Unlike PEFT, 1-D parameters (biases, norms) stay at ``lr``.
"""

from ..param_groups import loraplus_groups

__all__ = ["loraplus_groups"]

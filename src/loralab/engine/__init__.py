"""Fast decoding for the Llama family (Llama, Mistral, Qwen2, Qwen3, SmolLM): a KV cache
of one pre-allocated buffer per layer in which every row writes at its own position, and
one forward over the model's own modules (so LoRA layers, unmerged adapters and per-row
mixing run inside it) that prefill and decoding share. Other architectures keep
Transformers' ``generate``.
"""

from .cache import KVCache
from .llama import supported_reason
from .loop import decode, decode_greedy
from .sampling import RowSampling, choose

__all__ = ["KVCache", "RowSampling", "choose", "decode", "decode_greedy", "supported_reason"]

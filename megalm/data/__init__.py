"""Data path of megalm: tokenizer, Megatron-format indexed datasets, GPT/BERT samples, blending.

Everything a training run reads passes through here (see docs/data.md); the
modules are imported on demand so ``import megalm.data`` stays cheap.
"""

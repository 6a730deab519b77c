"""Megatron-style tensor parallelism: process groups, parallel layers, comm ops, RNG, vocab-parallel loss.

Sits under megalm/model: every Transformer weight that is split across ranks
is one of these layers, and everything collapses to plain PyTorch on 1 rank.
"""

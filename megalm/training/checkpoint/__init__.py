"""Checkpoints: one layout-free copy of the training state, written in parallel, published atomically.

Modules, lowest first (each imports only those above it):
``paths`` (every name on disk), ``shard_writer`` (a safetensors file streamed and
hashed), ``manifest`` (MANIFEST.json, verification, the atomic publish and
``latest``), ``rng`` (random streams), ``write_shards`` (what each rank writes),
``read_shards`` (tensor pieces or whole tensors of any checkpoint), ``restore``
(a checkpoint of any layout into this rank's engine), ``from_weights`` (a
checkpoint from full weights, e.g. an HF import) and ``manager`` (Checkpointer:
when to save, what to resume from).
"""

"""Hugging Face interoperability: weight-name/layout mapping (``mapping``), exporters and importers.

``megalm.hf.mapping`` is pure PyTorch: it does not import transformers.
"""

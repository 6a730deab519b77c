"""megalm: Megatron-style tensor/pipeline parallel pretraining under DeepSpeed.

Importing the package is cheap: DeepSpeed, transformers and torch.distributed
machinery are imported only by the entry points that need them.
"""

__version__ = "0.1.0"

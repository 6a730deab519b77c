"""Causal LM (GPT): predict token t+1 from tokens <= t, with Megatron's EOD options.

``reset_position_ids`` restarts positions after each EOD, ``reset_attention_mask``
stops attention across documents (as segment ids, never a dense mask), and
``eod_mask_loss`` drops the loss where the input token is EOD.
"""

from __future__ import annotations

import numpy as np
import torch

from megalm.objectives.base import ModelNeeds, Objective


def document_layout(input_ids: torch.Tensor, eod: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Segment ids and within-document positions for a [b, s] batch whose documents end at ``eod``.

    A new document starts at 0 and right after every EOD, as Megatron's
    get_ltor_masks_and_position_ids does.
    """
    b, s = input_ids.shape
    starts = torch.zeros_like(input_ids, dtype=torch.bool)
    starts[:, 0] = True
    starts[:, 1:] = input_ids[:, :-1] == eod
    segment_ids = torch.cumsum(starts.to(torch.int64), dim=1) - 1
    idx = torch.arange(s, device=input_ids.device).expand(b, s)
    start_pos = torch.where(starts, idx, torch.zeros_like(idx))
    start_pos = torch.cummax(start_pos, dim=1).values
    return segment_ids, idx - start_pos


class CausalLM(Objective):
    name = "clm"
    dataset_kind = "gpt"

    def collate(self, samples: list[dict], rng: np.random.Generator) -> dict[str, torch.Tensor]:  # noqa: ARG002 - deterministic
        tokens = torch.from_numpy(np.stack([np.asarray(s["tokens"], dtype=np.int64) for s in samples]))
        input_ids, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        o = self.cfg.objective
        eod = self.tokenizer.eod
        batch = {"input_ids": input_ids, "labels": labels}
        loss_mask = torch.ones_like(labels, dtype=torch.float32)
        if o.eod_mask_loss:
            loss_mask[input_ids == eod] = 0.0
        batch["loss_mask"] = loss_mask
        b, s = input_ids.shape
        segment_ids, positions = document_layout(input_ids, eod)
        batch["position_ids"] = positions if o.reset_position_ids else torch.arange(s).expand(b, s).contiguous()
        if o.reset_attention_mask:
            batch["segment_ids"] = segment_ids
        return batch

    @classmethod
    def needs(cls, cfg) -> ModelNeeds:
        documents = ("segment_ids",) if cfg.objective.reset_attention_mask else ()
        return ModelNeeds(inputs=("input_ids", "position_ids", *documents))

    def targets(self, batch):
        return batch["labels"], batch["loss_mask"]

    def loss(self, output, targets):
        return masked_token_loss(output, *targets)


def masked_token_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Vocab-parallel cross-entropy averaged over the positions ``loss_mask`` selects (CLM and PLM)."""
    from megalm.parallel.cross_entropy import vocab_parallel_cross_entropy

    per_token = vocab_parallel_cross_entropy(logits, labels)
    mask = loss_mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)

"""Cross-entropy over vocab-parallel logits: each rank holds V/tp columns, the full row never exists.

fp32 math; three small all-reduces over TP (row max, sum of exps, target
logit). Entries equal to -inf (padded vocabulary) are excluded from label
smoothing's uniform term. Labels equal to ``ignore_index`` get loss 0.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megalm.parallel import state


def _all_reduce(x: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    if state.tensor_size() > 1:
        dist.all_reduce(x, op=op, group=state.tensor_group())
    return x


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, smoothing, ignore_index):
        ctx.in_dtype = logits.dtype
        logits = logits.float()
        v_local = logits.size(-1)
        start = state.tensor_rank() * v_local
        row_max = logits.max(dim=-1).values
        _all_reduce(row_max, dist.ReduceOp.MAX)
        shifted = logits - row_max.unsqueeze(-1)

        ignored = labels == ignore_index
        local_label = labels - start
        outside = (local_label < 0) | (local_label >= v_local) | ignored
        idx = local_label.masked_fill(outside, 0).unsqueeze(-1)
        target = shifted.gather(-1, idx).squeeze(-1).masked_fill(outside, 0.0)

        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        _all_reduce(target)
        _all_reduce(sum_exp)
        log_z = sum_exp.log()
        loss = log_z - target
        probs = exp.div_(sum_exp.unsqueeze(-1))

        finite = None
        if smoothing > 0.0:
            finite = torch.isfinite(logits)
            count = finite.sum(dim=-1, dtype=torch.float32)
            sum_logp = (shifted.masked_fill(~finite, 0.0) - log_z.unsqueeze(-1) * finite).sum(dim=-1)
            _all_reduce(count)
            _all_reduce(sum_logp)
            loss = (1.0 - smoothing) * loss - smoothing * sum_logp / count
            ctx.count = count
        loss = loss.masked_fill(ignored, 0.0)
        ctx.smoothing = smoothing
        ctx.save_for_backward(probs, idx, outside, ignored, finite if finite is not None else probs.new_empty(0))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        probs, idx, outside, ignored, finite = ctx.saved_tensors
        grad = probs
        s = ctx.smoothing
        target_weight = (1.0 - s) if s > 0.0 else 1.0
        one_hot = torch.zeros_like(grad).scatter_(-1, idx, 1.0) * (~outside).unsqueeze(-1)
        grad = grad - target_weight * one_hot
        if s > 0.0:
            grad = grad - s * finite / ctx.count.unsqueeze(-1)
        grad = grad * (grad_loss * (~ignored)).unsqueeze(-1)
        return grad.to(ctx.in_dtype), None, None, None


def vocab_parallel_cross_entropy(logits_shard: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0,
                                 ignore_index: int = -100) -> torch.Tensor:
    """Per-token loss [b, s] (fp32) from this rank's logits shard [b, s, V/tp] and global label ids."""
    return _VocabParallelCE.apply(logits_shard, labels, float(label_smoothing), ignore_index)

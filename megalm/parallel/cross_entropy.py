"""Cross-entropy over vocab-parallel logits: each rank holds V/tp columns, the full row never exists.

fp32 math without keeping an fp32 copy of the logits: forward runs a fused
upcasting log-softmax over row chunks to get each rank's log-sum-exp (two
small all-reduces over TP combine them); backward recomputes the softmax chunk
by chunk straight into the gradient. Entries equal to -inf (padded
vocabulary) are excluded from label smoothing's uniform term. Labels equal to
``ignore_index`` get loss 0.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megalm.parallel import state
from megalm.parallel.compiled_ops import enabled as fused_enabled
from megalm.parallel.compiled_ops import fusable

_CHUNK_ELEMENTS = 1 << 24  # fp32 scratch per chunk (64 MB): bounds memory for large vocabularies


def _all_reduce(x: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    if state.tensor_size() > 1:
        dist.all_reduce(x, op=op, group=state.tensor_group())
    return x


def _chunks(n: int, width: int) -> list:
    step = max(1, _CHUNK_ELEMENTS // max(width, 1))
    return [(i, min(i + step, n)) for i in range(0, n, step)]


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, smoothing, ignore_index):
        v_local = logits.size(-1)
        x2 = logits.reshape(-1, v_local)
        flat_labels = labels.reshape(-1)
        n = x2.size(0)
        start = state.tensor_rank() * v_local

        ignored = flat_labels == ignore_index
        local_label = flat_labels - start
        outside = (local_label < 0) | (local_label >= v_local) | ignored
        idx = local_label.masked_fill(outside, 0).unsqueeze(-1)
        target = x2.gather(-1, idx).squeeze(-1).float().masked_fill(outside, 0.0)

        local_lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        sum_lsm = count = None
        if smoothing > 0.0:
            sum_lsm = torch.empty_like(local_lse)
            count = torch.empty_like(local_lse)
        for a, b in _chunks(n, v_local):
            x = x2[a:b]
            lsm = torch.log_softmax(x, dim=-1, dtype=torch.float32)
            # this shard's log-sum-exp = x_j - log_softmax_j at any finite j: the label's column (or column 0;
            # only an all-padding shard has no finite column 0, and gives nan -> -inf below)
            j = idx[a:b]
            local_lse[a:b] = (x.gather(-1, j).float() - lsm.gather(-1, j)).squeeze(-1)
            if sum_lsm is not None:
                finite = torch.isfinite(lsm)
                count[a:b] = finite.sum(dim=-1)
                sum_lsm[a:b] = lsm.masked_fill_(~finite, 0.0).sum(dim=-1)
        local_lse.nan_to_num_(nan=float("-inf"))  # a shard that is all padding

        if state.tensor_size() > 1:
            top = local_lse.clone()
            _all_reduce(top, dist.ReduceOp.MAX)
            lse = (local_lse - top).exp_()
            _all_reduce(lse)
            lse = lse.log_().add_(top)
            _all_reduce(target)
        else:
            lse = local_lse
        loss = lse - target
        if smoothing > 0.0:
            # sum_j log p_j over this shard = sum_j lsm_local_j + count * (local_lse - lse)
            shard_sum = sum_lsm + count * (local_lse - lse).nan_to_num_(nan=0.0, neginf=0.0)
            _all_reduce(shard_sum)
            _all_reduce(count)
            loss = (1.0 - smoothing) * loss - smoothing * shard_sum / count
            ctx.count = count
        loss = loss.masked_fill(ignored, 0.0)
        ctx.smoothing = smoothing
        ctx.save_for_backward(logits, lse, local_lse, idx, outside, ignored)
        return loss.view(labels.shape)

    @staticmethod
    def backward(ctx, grad_loss):
        logits, lse, local_lse, idx, outside, ignored = ctx.saved_tensors
        s = ctx.smoothing
        v_local = logits.size(-1)
        x2 = logits.reshape(-1, v_local)
        scale = (grad_loss.reshape(-1).float() * (~ignored)).unsqueeze(-1)
        # global softmax = this shard's softmax x exp(local_lse - lse)
        shard_scale = (local_lse - lse).exp_().unsqueeze(-1) * scale
        hit = (~outside).float().unsqueeze(-1) * (-(1.0 - s) * scale)
        grad = torch.empty_like(x2)
        for a, b in _chunks(x2.size(0), v_local):
            g = torch.softmax(x2[a:b], dim=-1, dtype=torch.float32)
            g.mul_(shard_scale[a:b])
            g.scatter_add_(-1, idx[a:b], hit[a:b])
            if s > 0.0:
                g.sub_(torch.isfinite(x2[a:b]) * (s * scale[a:b] / ctx.count[a:b].unsqueeze(-1)))
            grad[a:b] = g
        return grad.view_as(logits), None, None, None


@fusable
def _single_rank_ce(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    # compiled (``fusable``): the upcast happens inside the fused loop, so no fp32 logits tensor is made
    flat = logits.float().reshape(-1, logits.size(-1))
    return F.cross_entropy(flat, labels.reshape(-1), ignore_index=ignore_index, reduction="none").view(labels.shape)


def vocab_parallel_cross_entropy(logits_shard: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0,
                                 ignore_index: int = -100) -> torch.Tensor:
    """Per-token loss [b, s] (fp32) from this rank's logits shard [b, s, V/tp] and global label ids.

    Pass the logits in the model's dtype (bf16): the math is fp32 chunk by chunk, and no full-size fp32
    copy is made (an upcast before the call would make one and keep it for backward).
    """
    if state.tensor_size() == 1 and label_smoothing == 0.0 and fused_enabled():
        return _single_rank_ce(logits_shard, labels, ignore_index)
    return _VocabParallelCE.apply(logits_shard, labels, float(label_smoothing), ignore_index)

"""Distillation losses computed without a full [tokens x vocab] tensor for both models.

Only the scored positions are projected through the LM head, ``chunk`` positions at a time,
in float32. The sums are divided by the number of scored tokens, so the chunked loss
equals the unchunked one exactly (up to float summation order).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class DistillLoss:
    loss: torch.Tensor  # lambda_kl * kl + lambda_ce * ce, differentiable
    kl: float  # mean forward KL(teacher || student) per scored token, nats
    ce: float  # mean student cross-entropy of the targets, nats
    tokens: int
    order: float = 0.0  # mean answer-order loss per scored token (with lambda_order > 0)


def scored_positions(loss_mask: torch.Tensor) -> torch.Tensor:
    """loss_mask [B, T] marks target tokens; position t predicts token t + 1.

    Returns a bool [B, T] marking the positions whose next-token distribution is scored.
    """
    scored = torch.zeros_like(loss_mask, dtype=torch.bool)
    scored[:, :-1] = loss_mask[:, 1:].bool()
    return scored


def kl_and_ce(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, targets: torch.Tensor,
    teacher_topk: tuple[torch.Tensor, torch.Tensor] | None = None, temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed KL(teacher || student) and summed CE over rows of [N, V] logits (float32).

    With ``teacher_topk = (indices [N, k], log-probs [N, k])`` instead of teacher logits, the KL
    is taken over the teacher's top-k tokens only: sum_{i in top-k} p_i (log p_i - log q_i),
    the tail mass (usually < 1-2 %) being dropped.
    """
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    ce = F.nll_loss(F.log_softmax(student_logits.float(), dim=-1), targets, reduction="sum")
    if teacher_topk is not None:
        index, log_p = teacher_topk
        log_p = log_p.float()
        kl = (log_p.exp() * (log_p - log_q.gather(1, index.long()))).sum()
    else:
        log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
        kl = F.kl_div(log_q, log_p, log_target=True, reduction="sum")
    return kl, ce


def answer_order_loss(logits: torch.Tensor, targets: torch.Tensor, next_targets: torch.Tensor,
                      valid: torch.Tensor, margin: float) -> torch.Tensor:
    """(ours) Summed hinge on skipping ahead in an answer: sum over valid rows of
    softplus(z[next] - z[target] + margin).

    logits [N, V] at scored positions; targets [N] the right token; next_targets [N] the token
    that follows it in the answer; valid [N] bool, rows whose next token is scored too and differs.
    A recall model that swaps a code's last two digits or drops one emits the *next* digit too
    early, the one mistake CE spreads over the whole vocabulary; this term pushes exactly that
    competitor ``margin`` nats below the right token (a log-probability difference is a logit
    difference, so no softmax is needed).
    """
    if not bool(valid.any()):
        return logits.sum() * 0.0
    rows = logits[valid].float()
    right = rows.gather(1, targets[valid, None]).squeeze(1)
    ahead = rows.gather(1, next_targets[valid, None]).squeeze(1)
    return F.softplus(ahead - right + margin).sum()


def chunked_distill_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor | None,
    lm_head: torch.nn.Module,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    lambda_kl: float = 1.0,
    lambda_ce: float = 0.0,
    chunk: int = 1024,
    teacher_topk: tuple[torch.Tensor, torch.Tensor] | None = None,
    lambda_order: float = 0.0,
    order_margin: float = 2.0,
    order_rows: torch.Tensor | None = None,
) -> DistillLoss:
    """Forward KL at temperature 1 (plus optional CE and answer-order loss) over the masked tokens.

    student_hidden / teacher_hidden: [B, T, d] final normed hidden states; input_ids and
    loss_mask: [B, T]. ``teacher_topk`` (precomputed, already restricted to the scored
    positions in row-major order) replaces ``teacher_hidden``. With ``lambda_order`` > 0,
    ``answer_order_loss`` is added on the rows of the batch that ``order_rows`` [B] (bool;
    default all) marks, i.e. the samples with a known answer.
    """
    scored = scored_positions(loss_mask)
    targets = torch.zeros_like(input_ids)
    targets[:, :-1] = input_ids[:, 1:]
    s_rows = student_hidden[scored]  # [N, d]
    t_rows = teacher_hidden[scored] if teacher_hidden is not None else None
    y = targets[scored]
    n = int(y.numel())
    if n == 0:
        zero = student_hidden.sum() * 0.0
        return DistillLoss(zero, 0.0, 0.0, 0)
    if lambda_order > 0:
        following = torch.zeros_like(targets)
        following[:, :-1] = targets[:, 1:]
        in_answer = torch.zeros_like(scored)
        in_answer[:, :-1] = scored[:, 1:]
        ordered = scored & in_answer & (following != targets)
        if order_rows is not None:
            ordered &= order_rows.to(ordered.device)[:, None]
        y_next, y_ordered = following[scored], ordered[scored]
    kl_total = student_hidden.new_zeros((), dtype=torch.float32)
    ce_total = student_hidden.new_zeros((), dtype=torch.float32)
    order_total = student_hidden.new_zeros((), dtype=torch.float32)
    # the head's own dtype: under accelerate's mixed precision the hidden states come back in
    # float32 while a bf16 base keeps a bf16 head (outside autocast the matmul would refuse)
    head_dtype = lm_head.weight.dtype
    for start in range(0, n, chunk):
        sl = slice(start, start + chunk)
        s_logits = lm_head(s_rows[sl].to(head_dtype))
        with torch.no_grad():
            t_logits = lm_head(t_rows[sl].to(head_dtype)) if t_rows is not None else None
        topk = None if teacher_topk is None else (teacher_topk[0][sl], teacher_topk[1][sl])
        kl, ce = kl_and_ce(s_logits, t_logits, y[sl], topk)
        kl_total, ce_total = kl_total + kl, ce_total + ce
        if lambda_order > 0:
            order_total = order_total + answer_order_loss(s_logits, y[sl], y_next[sl], y_ordered[sl], order_margin)
    kl_mean, ce_mean, order_mean = kl_total / n, ce_total / n, order_total / n
    loss = lambda_kl * kl_mean + lambda_ce * ce_mean + lambda_order * order_mean
    return DistillLoss(loss, float(kl_mean.detach()), float(ce_mean.detach()), n, float(order_mean.detach()))


@torch.no_grad()
def teacher_topk(teacher_hidden: torch.Tensor, lm_head: torch.nn.Module, loss_mask: torch.Tensor, k: int,
                 chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k token ids (int32) and log-probs (float16) of the teacher at the scored positions."""
    rows = teacher_hidden[scored_positions(loss_mask)]
    ids, logps = [], []
    for start in range(0, rows.shape[0], chunk):
        logp = F.log_softmax(lm_head(rows[start : start + chunk].to(lm_head.weight.dtype)).float(), dim=-1)
        top = logp.topk(k, dim=-1)
        ids.append(top.indices.to(torch.int32))
        logps.append(top.values.to(torch.float16))
    if not ids:
        return torch.zeros(0, k, dtype=torch.int32), torch.zeros(0, k, dtype=torch.float16)
    return torch.cat(ids), torch.cat(logps)


def write_gate_loss(eta_logits: list[torch.Tensor], write_mask: torch.Tensor, context_mask: torch.Tensor,
                    target_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(ours) Teach the write gates to single out the tokens that carry a later answer.

    eta_logits: per memory layer [B, T, H], the eta head's pre-softplus output; write_mask [B, T]
    (bool) marks the tokens that carry the answer (a recall task's needle), context_mask [B, T]
    (bool) every token that may be written (the prompt, not the padding nor the scored response).
    Per row with a needle, layer and head, the gate ratio is mean eta on the needle over mean eta
    on the rest of the context; the loss is softplus(log target_ratio - log ratio), averaged: about
    log target_ratio for a uniform gate, -> 0 once the needle is written target_ratio times more than
    the filler. The overall write rate stays free (a ratio), so the other losses set it.

    Returns (loss, log10 of every ratio [rows * layers * H], detached).
    """
    needle = (write_mask & context_mask).float()
    rest = (~write_mask & context_mask).float()
    rows = (needle.sum(1) > 0) & (rest.sum(1) > 0)
    if not bool(rows.any()):
        zero = sum(e.sum() for e in eta_logits) * 0.0
        return zero, torch.zeros(0)
    needle, rest = needle[rows], rest[rows]
    log_ratios = []
    for logits in eta_logits:
        eta = F.softplus(logits[rows].to(torch.promote_types(logits.dtype, torch.float32)))  # [R, T, H]
        on_needle = (eta * needle[..., None]).sum(1) / needle.sum(1, keepdim=True)
        on_rest = (eta * rest[..., None]).sum(1) / rest.sum(1, keepdim=True)
        log_ratios.append(on_needle.log() - on_rest.log())  # [R, H]
    log_ratio = torch.cat(log_ratios, dim=-1)
    loss = F.softplus(math.log(target_ratio) - log_ratio).mean()
    return loss, (log_ratio.detach() / math.log(10)).flatten()


def attention_transfer_loss(output: torch.Tensor, target: torch.Tensor, positions: torch.Tensor,
                            baseline: torch.Tensor | None = None) -> torch.Tensor:
    """(ours, after LoLCATs' attention transfer) How far one layer's output is from the pretrained
    attention's on the same inputs.

    output [B, T, d]: the converted layer's window attention + alpha * memory; target [B, T, d]:
    ``AllMemAttention.teacher_attention`` of the same hidden states (no gradient); positions [B, T]
    (bool) the rows to fit. Returns sum ||output - target||^2 / sum ||target||^2 over those rows: the
    relative squared error, 0 when the layer reproduces full attention, comparable across layers.

    With ``baseline`` [B, T, d] (the layer's window attention alone) the denominator is
    sum ||baseline - target||^2 instead: the share of what the window loses that the layer still
    loses (1 = no better than the window). Every layer then weighs the same whatever its window's
    gap, so one that loses little to its window is held to returning little more.
    """
    rows = positions.bool()
    if not bool(rows.any()):
        return output.sum() * 0.0
    wide = torch.promote_types(output.dtype, torch.float32)
    out, tgt = output[rows].to(wide), target[rows].to(wide).detach()
    scale = tgt if baseline is None else baseline[rows].to(wide).detach() - tgt
    return (out - tgt).pow(2).sum() / scale.pow(2).sum().clamp_min(torch.finfo(wide).tiny)


def needle_transfer_loss(outputs: list[torch.Tensor], targets: list[torch.Tensor], counter_outputs: list[torch.Tensor],
                         counter_targets: list[torch.Tensor], positions: torch.Tensor) -> torch.Tensor:
    """(ours) How far each layer passes on *the needle's own content*, not only what every answer shares.

    Per layer l, outputs[l] / targets[l] [B, T, d]: the converted layer's output and the pretrained
    attention's on the prompt; counter_outputs[l] / counter_targets[l]: the same on the counterfactual
    prompt (another code in the needle, the same tokens everywhere else; no gradient). positions [B, T]
    (bool): the rows to fit (the answer's). Returns

        sum_l ||(out_l - out'_l) - (tgt_l - tgt'_l)||^2 / sum_l ||tgt_l - tgt'_l||^2

    over those rows: 0 when every layer's output changes with the code exactly as full attention's does,
    1 when it does not change at all (SWA + sinks, which cannot see the needle). Pooled over layers, since
    a layer whose full attention barely changes with the code (layer 0) would divide by almost nothing.
    The plain transfer loss can be met by the part of full attention's output that every code shares
    (run v11: 92-96 % of the window's error closed in layers 6-8 at the answer, yet no recall); this
    term sees only the part that depends on the code.
    """
    rows = positions.bool()
    first = outputs[0]
    if not bool(rows.any()):
        return first.sum() * 0.0
    wide = torch.promote_types(first.dtype, torch.float32)
    num = first.new_zeros((), dtype=wide)
    den = first.new_zeros((), dtype=wide)
    for out, tgt, out_cf, tgt_cf in zip(outputs, targets, counter_outputs, counter_targets, strict=True):
        change = out[rows].to(wide) - out_cf[rows].to(wide).detach()
        wanted = (tgt[rows].to(wide) - tgt_cf[rows].to(wide)).detach()
        num = num + (change - wanted).pow(2).sum()
        den = den + wanted.pow(2).sum()
    return num / den.clamp_min(torch.finfo(wide).tiny)

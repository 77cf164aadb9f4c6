"""Distillation losses as pure functions, with shapes in their docstrings.

Three layers, each tested against a naive full-vocabulary reference in ``tests/test_losses.py``, and
the preference losses (DPO, SimPO) on sequence log-probs, tested against the formulas written out:

1. ``divergence``: a divergence between two distributions given as log-probs over the same C
   categories, per row: forward KL, reverse KL, generalized JSD (beta), skew forward / reverse KL
   (alpha).
2. ``dense_divergence`` (online teacher: full logits) and ``sparse_divergence`` (offline teacher:
   the stored top-k log-probs, with a choice of what to do with the missing tail mass) turn logits
   into those distributions at a temperature T and scale by T^2 (Hinton et al., 2015).
3. ``fused_linear_loss``: the student's final projection and any loss over its logits, computed in
   chunks of rows with the gradients taken chunk by chunk, so peak memory is one chunk's logits
   (chunk x vocabulary), never batch x sequence x vocabulary.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch
import torch.nn.functional as F

Divergence = Literal["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl"]
Tail = Literal["bucket", "renormalize"]
TAIL_FLOOR = math.log(1e-6)  # tail masses below 1e-6 are float32 round-off of sum p_k (k near V): read as 1e-6
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl")


def _kl(a_lp: torch.Tensor, b_lp: torch.Tensor) -> torch.Tensor:
    """KL(a || b) per row from log-probs [N, C] -> [N]."""
    return (a_lp.exp() * (a_lp - b_lp)).sum(-1)


def _mix(a_lp: torch.Tensor, b_lp: torch.Tensor, a_share: float) -> torch.Tensor:
    """log(a_share * a + (1 - a_share) * b) from log-probs, stably. [N, C] -> [N, C]."""
    return torch.logaddexp(a_lp + math.log(a_share), b_lp + math.log1p(-a_share))


def divergence(teacher_lp: torch.Tensor, student_lp: torch.Tensor, kind: Divergence = "forward_kl", coef: float = 0.5) -> torch.Tensor:
    """Divergence between teacher p and student q, per row.

    teacher_lp, student_lp: [N, C] log-probs over the same C categories (each row sums to 1).
    coef: beta for ``jsd`` (in (0, 1)), alpha for the skew KLs (in [0, 1)); unused otherwise.
    Returns [N]:
      forward_kl       KL(p || q)                        mass-covering (the classic KD loss)
      reverse_kl       KL(q || p)                        mode-seeking (MiniLLM)
      jsd              beta KL(p || m) + (1-beta) KL(q || m),  m = beta p + (1-beta) q   (GKD)
      skew_forward_kl  KL(p || alpha p + (1-alpha) q)    (DistiLLM, Ko et al. 2024)
      skew_reverse_kl  KL(q || alpha q + (1-alpha) p)
    """
    p, q = teacher_lp.float().clamp_min(-1e4), student_lp.float().clamp_min(-1e4)  # -inf (masked ids): p = 0, finite terms
    if kind == "forward_kl":
        return _kl(p, q)
    if kind == "reverse_kl":
        return _kl(q, p)
    if kind == "jsd":
        if not 0 < coef < 1:
            raise ValueError(f"jsd needs 0 < beta < 1, got {coef}")
        m = _mix(p, q, coef)
        return coef * _kl(p, m) + (1 - coef) * _kl(q, m)
    if kind == "skew_forward_kl":
        return _kl(p, _mix(p, q, coef)) if coef > 0 else _kl(p, q)
    if kind == "skew_reverse_kl":
        return _kl(q, _mix(q, p, coef)) if coef > 0 else _kl(q, p)
    raise ValueError(f"unknown divergence {kind!r}; choose one of {', '.join(DIVERGENCES)}")


def dense_divergence(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: Divergence = "forward_kl",
    temperature: float = 1.0, coef: float = 0.5,
) -> torch.Tensor:  # fmt: skip
    """Full-vocabulary divergence at temperature T, scaled by T^2.

    student_logits, teacher_logits: [N, V] raw logits at the same N positions. Returns [N].
    """
    t = temperature
    return divergence(
        torch.log_softmax(teacher_logits.float() / t, -1), torch.log_softmax(student_logits.float() / t, -1), kind, coef
    ) * (t * t)


def sparse_divergence(
    student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
    kind: Divergence = "forward_kl", temperature: float = 1.0, coef: float = 0.5, tail: Tail = "bucket",
) -> torch.Tensor:  # fmt: skip
    """Divergence to a teacher known only by its top-k, at temperature T, scaled by T^2.

    student_logits: [N, V] raw student logits. topk_ids: [N, k] int64 teacher ids.
    topk_logprobs: [N, k] teacher log-probs of those ids at T = 1 (as stored). Returns [N].

    tail = ``bucket``: k + 1 categories, the k ids and one bucket for the rest of the vocabulary
      (the teacher's stored tail mass 1 - sum p_k; the student's exact tail mass). Student mass
      outside the teacher's top-k is penalized as a whole. At T != 1 the teacher tail is tempered as a
      single pseudo-token of log-prob log(tail mass), since its logits were not stored.
    tail = ``renormalize``: k categories; both distributions restricted to the k ids and renormalized.
      Exact for any T, blind to student mass outside the top-k.
    """
    t = temperature
    s_logits = student_logits.float() if t == 1 else student_logits.float() / t  # no [N, V] copy at T = 1
    s_at = s_logits.gather(-1, topk_ids)  # [N, k]
    lp = topk_logprobs.float()
    if tail == "renormalize":
        teacher_lp, student_lp = torch.log_softmax(lp / t, -1), torch.log_softmax(s_at, -1)
    elif tail == "bucket":
        t_tail = _log1m_sum_exp(lp)  # log(1 - sum p_k), [N]
        teacher_lp = torch.log_softmax(torch.cat([lp, t_tail[:, None]], -1) / t, -1)  # [N, k+1]
        s_lp = s_at - torch.logsumexp(s_logits, -1, keepdim=True)  # student log-probs at the k ids, [N, k]
        student_lp = torch.cat([s_lp, _log1m_sum_exp(s_lp)[:, None]], -1)  # the student's tail from [N, k] only
    else:
        raise ValueError(f"unknown tail handling {tail!r}; choose bucket or renormalize")
    return divergence(teacher_lp, student_lp, kind, coef) * (t * t)


def _log1m_sum_exp(lp: torch.Tensor) -> torch.Tensor:
    """log(1 - sum_j exp(lp_j)) per row, [N, k] -> [N], floored at TAIL_FLOOR (float32 round-off of a
    sum close to 1 would otherwise give log 0 or NaN)."""
    mass = torch.logsumexp(lp, -1).exp().clamp(max=1 - 1e-7)
    return torch.log1p(-mass).clamp_min(TAIL_FLOOR)


ChunkLoss = Callable[[torch.Tensor, int, int], torch.Tensor]


class _FusedLinearLoss(torch.autograd.Function):
    """Forward computes the loss chunk by chunk and, in the same pass, its gradients: autograd gives
    d loss / d logits for the chunk ([n, V]); the projection's gradients follow by hand,
    d hidden = g @ W and d W += g^T @ hidden (accumulated in place), so neither the projection's graph
    nor a second [V, H] gradient buffer ever exists. Backward only scales the stored gradients.
    (The idea of Liger-Kernel's fused linear losses, written on plain PyTorch.)"""

    @staticmethod
    def forward(ctx, hidden, weight, bias, loss_fn: ChunkLoss, chunk_size: int):
        wants = tuple(ctx.needs_input_grad[:3])
        grads = [torch.zeros_like(x) if want else None for x, want in zip((hidden, weight, bias), wants)]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            end = min(start + chunk_size, hidden.shape[0])
            h = hidden[start:end]
            logits = F.linear(h, weight, bias).float().requires_grad_(any(wants))
            with torch.enable_grad():
                loss = loss_fn(logits, start, end)
            if any(wants) and loss.requires_grad:
                (g,) = torch.autograd.grad(loss, [logits])  # [n, V]
                g = g.to(hidden.dtype)
                if wants[0]:
                    grads[0][start:end] = g @ weight
                if wants[1]:
                    grads[1].addmm_(g.t(), h)
                if wants[2]:
                    grads[2] += g.sum(0)
                del g
            total += loss.detach()
            del logits, loss
        ctx.save_for_backward(*[g for g in grads if g is not None])
        ctx.wants = wants
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        saved = iter(ctx.saved_tensors)  # scaled in place: no second [V, H] buffer (backward runs once)
        out = [next(saved).mul_(grad_out) if want else None for want in ctx.wants]
        return out[0], out[1], out[2], None, None


def fused_linear_loss(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, loss_fn: ChunkLoss, chunk_size: int = 256
) -> torch.Tensor:
    """``loss_fn`` summed over chunks of rows of ``hidden @ weight.T + bias``, without ever holding all logits.

    hidden: [N, H] (the positions that carry a loss). weight: [V, H]. bias: [V] or None.
    loss_fn(logits [n, V] float32, start, end) -> scalar: the loss of rows start..end, a sum (not a
    mean) so that chunks add up; it may read any other per-row tensor by the same slice.
    Returns a scalar with gradients to hidden, weight and bias. Peak memory: chunk_size x V logits
    plus what loss_fn builds from them, independent of N.
    """
    if hidden.shape[0] == 0:
        return (hidden.sum() + weight.sum()) * 0.0  # keeps the graph connected, e.g. for DDP
    return _FusedLinearLoss.apply(hidden, weight, bias, loss_fn, chunk_size)


Preference = Literal["dpo", "simpo"]


def preference_loss(
    chosen_lp: torch.Tensor, rejected_lp: torch.Tensor, kind: Preference = "dpo", beta: float = 0.1, *,
    ref_chosen_lp: torch.Tensor | None = None, ref_rejected_lp: torch.Tensor | None = None,
    chosen_len: torch.Tensor | None = None, rejected_len: torch.Tensor | None = None, gamma: float = 0.5,
) -> torch.Tensor:  # fmt: skip
    """Preference loss per pair, from sequence log-probs (sums over the completion tokens).

    chosen_lp, rejected_lp: [P] log pi(y_w | x), log pi(y_l | x) under the policy being trained.
      dpo    -log sigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected)))   (Rafailov et al., 2023)
             ref_*: [P], the same under the frozen reference model (the student before training).
      simpo  -log sigmoid(beta * (chosen / |y_w| - rejected / |y_l|) - gamma)          (Meng et al., 2024)
             reference-free; *_len: [P] completion lengths in tokens; gamma: the target margin.
    Returns [P].
    """
    if kind == "dpo":
        if ref_chosen_lp is None or ref_rejected_lp is None:
            raise ValueError("dpo needs the reference model's log-probs (ref_chosen_lp, ref_rejected_lp)")
        margin = (chosen_lp - ref_chosen_lp) - (rejected_lp - ref_rejected_lp)
        return -F.logsigmoid(beta * margin)
    if kind == "simpo":
        if chosen_len is None or rejected_len is None:
            raise ValueError("simpo needs the completion lengths (chosen_len, rejected_len)")
        margin = chosen_lp / chosen_len.clamp_min(1) - rejected_lp / rejected_len.clamp_min(1)
        return -F.logsigmoid(beta * margin - gamma)
    raise ValueError(f"unknown preference loss {kind!r}; choose dpo or simpo")

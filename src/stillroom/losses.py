"""Distillation losses as pure functions, with shapes in their docstrings.

Offline signals keep only the teacher's top-k log-probs per position; these losses compare the
student to that sparse distribution without building any dense teacher tensor. Each is tested
against a naive full-vocabulary reference in ``tests/test_losses.py``.
"""

from __future__ import annotations

import torch


def sparse_forward_kl(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Forward KL(teacher || student) on the teacher's top-k support, per position.

    student_logits: [N, V] raw student logits at N positions.
    topk_ids: [N, k] teacher top-k token ids (int64).
    topk_logprobs: [N, k] teacher log-probs of those ids, untempered (as stored).
    Returns [N]: sum_j p_j (log p_j - log q_j) * T^2, where p is the teacher's top-k distribution at
    temperature T renormalized over the k ids (the missing tail mass is dropped) and q the student's
    full-vocabulary distribution at temperature T, read at the same ids. T^2 keeps gradient scale
    comparable across temperatures (Hinton et al., 2015).
    """
    t = temperature
    teacher_lp = torch.log_softmax(topk_logprobs.float() / t, dim=-1)  # renormalized over the k ids
    student_lp = torch.log_softmax(student_logits.float() / t, dim=-1).gather(-1, topk_ids)
    return (teacher_lp.exp() * (teacher_lp - student_lp)).sum(-1) * t * t

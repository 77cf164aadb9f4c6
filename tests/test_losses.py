"""Every loss against a naive full-vocabulary reference written from the textbook formulas, in float64
probability space (no shared code with stillroom.losses), on values and gradients."""

import pytest
import torch

from stillroom.losses import DIVERGENCES, dense_divergence, divergence, fused_linear_loss, sparse_divergence


def kl(a, b):
    """sum_i a_i log(a_i / b_i) over the support of a; [N, C] probabilities -> [N]."""
    on = a > 0
    ratio = torch.where(on, a, torch.ones_like(a)) / torch.where(on, b, torch.ones_like(b))  # no 0/0 off the support
    return torch.where(on, a * torch.log(ratio), torch.zeros_like(a)).sum(-1)


def naive(p, q, kind, coef):
    """The divergence of teacher p and student q, both [N, C] probabilities."""
    if kind == "forward_kl":
        return kl(p, q)
    if kind == "reverse_kl":
        return kl(q, p)
    if kind == "jsd":
        m = coef * p + (1 - coef) * q
        return coef * kl(p, m) + (1 - coef) * kl(q, m)
    if kind == "skew_forward_kl":
        return kl(p, coef * p + (1 - coef) * q)
    if kind == "skew_reverse_kl":
        return kl(q, coef * q + (1 - coef) * p)
    raise AssertionError(kind)


def softmax64(x, t):
    e = torch.exp((x.double() - x.double().max(-1, keepdim=True).values) / t)
    return e / e.sum(-1, keepdim=True)


def naive_dense(student_logits, teacher_logits, kind, t, coef):
    return naive(softmax64(teacher_logits, t), softmax64(student_logits, t), kind, coef) * t * t


def naive_sparse(student_logits, teacher_full_logits, k, kind, t, coef, tail):
    """Sparse targets built from the teacher's full logits, in the full vocabulary: restricted to the
    top-k ids (renormalize), or the top-k ids plus one category summing every other id (bucket)."""
    n, vocab = student_logits.shape
    p_full = softmax64(teacher_full_logits, 1.0)  # what the teacher stored is at T = 1
    top = torch.topk(p_full, k, -1).indices
    in_top = torch.zeros(n, vocab, dtype=torch.bool).scatter(-1, top, True)
    q_full = softmax64(student_logits, t)
    if tail == "renormalize":
        w = torch.where(in_top, p_full ** (1 / t), torch.zeros_like(p_full))
        p = w / w.sum(-1, keepdim=True)
        q = torch.where(in_top, q_full, torch.zeros_like(q_full))
        q = q / q.sum(-1, keepdim=True)
        return naive(p, q, kind, coef) * t * t
    # bucket: k + 1 categories; the teacher's tail is one pseudo-token tempered like the others
    p_k = torch.gather(p_full, -1, top)
    p_tail = 1 - p_k.sum(-1, keepdim=True)
    w = torch.cat([p_k, p_tail], -1) ** (1 / t)
    p = w / w.sum(-1, keepdim=True)
    q = torch.cat([torch.gather(q_full, -1, top), (q_full * ~in_top).sum(-1, keepdim=True)], -1)
    return naive(p, q, kind, coef) * t * t


def coef_for(kind):
    return {"jsd": 0.3, "skew_forward_kl": 0.1, "skew_reverse_kl": 0.2}.get(kind, 0.5)


def grads_match(ours_fn, ref_fn, x):
    a = x.detach().clone().requires_grad_(True)
    b = x.detach().clone().requires_grad_(True)
    ours, ref = ours_fn(a), ref_fn(b)
    assert torch.allclose(ours.double(), ref, atol=1e-5), (ours, ref)
    (ours.double() * torch.arange(1, len(ours) + 1)).sum().backward()  # uneven weights per row
    (ref * torch.arange(1, len(ref) + 1)).sum().backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-5)


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("t", [1.0, 2.0, 0.7])
def test_dense_divergences_match_the_textbook_reference(kind, t):
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 64, dtype=torch.float64), 2 * torch.randn(5, 64)
    grads_match(lambda s: dense_divergence(s, teacher, kind, t, coef_for(kind)),
                lambda s: naive_dense(s, teacher, kind, t, coef_for(kind)), student)  # fmt: skip


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("t", [1.0, 2.0])
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_sparse_divergences_match_the_full_vocabulary_reference(kind, t, tail):
    torch.manual_seed(1)
    n, vocab, k = 6, 80, 8
    teacher = 3 * torch.randn(n, vocab, dtype=torch.float64)
    top = torch.log_softmax(teacher, -1).topk(k, -1)
    student = torch.randn(n, vocab, dtype=torch.float64)
    grads_match(lambda s: sparse_divergence(s, top.indices, top.values, kind, t, coef_for(kind), tail),
                lambda s: naive_sparse(s, teacher, k, kind, t, coef_for(kind), tail), student)  # fmt: skip


def test_divergences_are_zero_for_identical_distributions_and_positive_otherwise():
    torch.manual_seed(2)
    a, b = torch.log_softmax(torch.randn(4, 30), -1), torch.log_softmax(torch.randn(4, 30), -1)
    for kind in DIVERGENCES:
        assert torch.allclose(divergence(a, a, kind, coef_for(kind)), torch.zeros(4), atol=1e-6)
        assert (divergence(a, b, kind, coef_for(kind)) > 0).all()


def test_bucket_tail_penalizes_student_mass_outside_the_teacher_top_k_and_renormalize_does_not():
    logits = torch.tensor([[4.0, 3.0, 0.0, 0.0, 0.0, 0.0]])
    top = torch.log_softmax(logits, -1).topk(2, -1)
    same_on_top = logits.clone()
    same_on_top[0, 2:] = 5.0  # same ratio on the top-2, far more mass outside them
    assert sparse_divergence(same_on_top, top.indices, top.values, tail="renormalize").item() == pytest.approx(0, abs=1e-6)
    assert sparse_divergence(same_on_top, top.indices, top.values, tail="bucket").item() > 1.0


@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_linear_loss_equals_the_plain_loss_in_values_and_gradients(with_bias):
    """Chunks of 3 rows over 10: the same loss and the same gradients as logits built all at once."""
    torch.manual_seed(3)
    n, h, vocab, k = 10, 16, 40, 5
    hidden = torch.randn(n, h, dtype=torch.float64)
    weight = torch.randn(vocab, h, dtype=torch.float64) * 0.3
    bias = torch.randn(vocab, dtype=torch.float64) if with_bias else None
    targets = torch.randint(0, vocab, (n,))
    teacher = torch.log_softmax(torch.randn(n, vocab), -1).topk(k, -1)

    def loss_of(logits, s, e):
        ce = torch.nn.functional.cross_entropy(logits, targets[s:e], reduction="sum")
        return ce + 0.5 * sparse_divergence(logits, teacher.indices[s:e], teacher.values[s:e], "jsd", 2.0, 0.4).sum()

    leaves = [x.clone().requires_grad_(True) for x in (hidden, weight) + ((bias,) if with_bias else ())]
    fused = fused_linear_loss(leaves[0], leaves[1], leaves[2] if with_bias else None, loss_of, chunk_size=3)
    (2.5 * fused).backward()
    plain_leaves = [x.clone().requires_grad_(True) for x in (hidden, weight) + ((bias,) if with_bias else ())]
    logits = torch.nn.functional.linear(plain_leaves[0], plain_leaves[1], plain_leaves[2] if with_bias else None)
    plain = loss_of(logits.double(), 0, n)
    (2.5 * plain).backward()
    assert torch.allclose(fused.double(), plain, atol=1e-6)
    for a, b in zip(leaves, plain_leaves):
        assert torch.allclose(a.grad, b.grad, atol=1e-6)


def test_kd_targets_line_up_with_the_completion_tokens(tiny_model_dir):
    """A student identical to the teacher, fed the teacher's own prompt, tokens and full-vocabulary
    top-k, has zero KD loss: any off-by-one between labels and top-k rows would show up."""
    from stillroom import generation, models
    from stillroom.examples.toolcall.task import ToolCallTask
    from stillroom.stages.train import collate, completion_loss, completion_tokens, encode

    model, tokenizer = models.load(str(tiny_model_dir))
    task = ToolCallTask()
    examples = task.build_examples(20, {"core": 1.0}, 0, 2)[:2]
    prompts = [generation.render(tokenizer, task.student_messages(e)) for e in examples]
    gens = generation.generate(model, tokenizer, prompts, max_new_tokens=5, top_k=len(tokenizer))
    rows = [encode(tokenizer, p, g.token_ids, 4096, 0.0, (g.topk_ids, g.topk_logprobs)) for p, g in zip(prompts, gens)]
    batch = collate(rows, tokenizer.pad_token_id)
    with torch.no_grad():
        kd = completion_loss(model, batch, kd_weight=1.0)
        shifted = dict(batch, kd_ids=batch["kd_ids"].roll(1, dims=1), kd_logprobs=batch["kd_logprobs"].roll(1, dims=1))
        off_by_one = completion_loss(model, shifted, kd_weight=1.0)
    n = completion_tokens(batch)
    assert n == sum(len(g.token_ids) + 1 for g in gens)
    assert abs(kd.item()) < 1e-3 * n
    assert off_by_one.item() > 100 * max(abs(kd.item()), 1e-4)


def test_a_row_whose_prompt_fills_max_length_carries_no_kd_positions(tiny_model_dir):
    from transformers import AutoTokenizer

    from stillroom.stages.train import collate, encode

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    topk = ([[1, 2]] * 4, [[-0.1, -2.0]] * 4)
    long = encode(tokenizer, "word " * 40, [5, 6, 7], max_length=16, weight=1.0, topk=topk)  # the prompt alone is over 16
    short = encode(tokenizer, "two words", [5, 6, 7], max_length=16, weight=1.0, topk=topk)
    batch = collate([long, short], pad_id=0)
    assert not batch["kd_mask"][0].any() and int(batch["kd_mask"][1].sum()) == 4  # 3 tokens + end of turn


# -- preference losses -------------------------------------------------------------------------------


def naive_dpo(pc, pr, rc, rr, beta):
    """-log sigmoid(beta * (log pi_w/ref_w - log pi_l/ref_l)), one pair at a time in float64."""
    import math

    out = []
    for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist()):
        z = beta * ((a - c) - (b - d))
        out.append(math.log1p(math.exp(-z)) if z > -30 else -z)
    return torch.tensor(out, dtype=torch.float64)


def naive_simpo(pc, pr, lc, lr, beta, gamma):
    import math

    return torch.tensor([math.log(1 + math.exp(-(beta * (a / n - b / m) - gamma)))
                         for a, b, n, m in zip(pc.tolist(), pr.tolist(), lc.tolist(), lr.tolist())], dtype=torch.float64)  # fmt: skip


def test_dpo_loss_equals_the_formula_on_fixed_inputs_values_and_gradients():
    from stillroom.losses import preference_loss

    pc = torch.tensor([-12.0, -30.5, -4.25, -50.0], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([-15.0, -29.0, -4.0, -80.0], dtype=torch.float64, requires_grad=True)
    rc = torch.tensor([-13.0, -31.0, -5.0, -48.0], dtype=torch.float64)
    rr = torch.tensor([-14.0, -30.0, -3.5, -79.0], dtype=torch.float64)
    got = preference_loss(pc, pr, "dpo", 0.3, ref_chosen_lp=rc, ref_rejected_lp=rr)
    want = naive_dpo(pc.detach(), pr.detach(), rc, rr, 0.3)
    assert torch.allclose(got, want, atol=1e-12)
    # a known value: equal margins give log 2
    assert torch.allclose(preference_loss(pc, pc, "dpo", 0.3, ref_chosen_lp=rc, ref_rejected_lp=rc), torch.full((4,), 0.6931471805599453, dtype=torch.float64))
    # gradient: d/d chosen = -beta * sigmoid(-z), d/d rejected = +beta * sigmoid(-z)
    got.sum().backward()
    z = 0.3 * ((pc.detach() - rc) - (pr.detach() - rr))
    assert torch.allclose(pc.grad, -0.3 * torch.sigmoid(-z), atol=1e-12)
    assert torch.allclose(pr.grad, 0.3 * torch.sigmoid(-z), atol=1e-12)


def test_simpo_loss_equals_the_formula_and_needs_no_reference():
    from stillroom.losses import preference_loss

    pc, pr = torch.tensor([-12.0, -30.5, -4.0]), torch.tensor([-15.0, -29.0, -9.0])
    lc, lr = torch.tensor([6, 10, 2]), torch.tensor([5, 12, 3])
    got = preference_loss(pc, pr, "simpo", 2.0, chosen_len=lc, rejected_len=lr, gamma=0.5)
    assert torch.allclose(got.double(), naive_simpo(pc, pr, lc, lr, 2.0, 0.5), atol=1e-6)
    with pytest.raises(ValueError, match="reference model"):
        preference_loss(pc, pr, "dpo", 0.1)


def test_sequence_logprobs_match_the_full_logits(tiny_model_dir):
    """The pair path's log p(completion) (head on labelled positions only) equals the sum read off a
    plain forward over the whole sequence; DPO's loss through it is log 2 when policy = reference."""
    from stillroom import generation, models
    from stillroom.examples.toolcall.task import ToolCallTask
    from stillroom.stages.train import collate, encode_pair, pair_loss, reference_logprobs, sequence_logprobs

    model, tokenizer = models.load(str(tiny_model_dir))
    model.eval()
    task = ToolCallTask()
    ex = task.build_examples(20, {"core": 1.0}, 0, 2)[0]
    prompt = generation.render(tokenizer, task.student_messages(ex))
    rows = [encode_pair(tokenizer, prompt, ex["reference"] or "ok", "Sorry, no.", 4096, 1.0), encode_pair(tokenizer, prompt, "A", "B C D", 4096, 2.0)]
    batch = collate(rows, tokenizer.pad_token_id)
    with torch.no_grad():
        lp, n = sequence_logprobs(model, batch["pair_input_ids"], batch["pair_attention_mask"], batch["pair_labels"])
        for i in range(4):
            labels = batch["pair_labels"][i]
            logits = model(input_ids=batch["pair_input_ids"][i : i + 1], attention_mask=batch["pair_attention_mask"][i : i + 1]).logits[0]
            full = torch.log_softmax(logits.double(), -1)
            want = sum(full[t - 1, labels[t]].item() for t in range(1, len(labels)) if labels[t] != -100)
            assert abs(lp[i].item() - want) < 1e-4 and n[i] == (labels[1:] != -100).sum()
        reference_logprobs(rows, model, 8, "cpu")
        batch = collate(rows, tokenizer.pad_token_id)
        assert torch.allclose(batch["pair_ref"][:, 0], lp[:2]) and torch.allclose(batch["pair_ref"][:, 1], lp[2:])
        loss = pair_loss(model, batch, "dpo", 0.1)
    assert abs(loss.item() - 3 * 0.6931471805599453) < 1e-4  # weights 1 + 2, each pair at log 2

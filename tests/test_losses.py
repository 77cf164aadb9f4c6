import torch

from stillroom.losses import sparse_forward_kl


def naive_forward_kl(student_logits, topk_ids, topk_logprobs, temperature):
    """Dense reference: scatter the renormalized tempered teacher top-k into a full-vocabulary
    distribution (zeros elsewhere) and take KL against the full student softmax, term by term."""
    n, vocab = student_logits.shape
    out = []
    for i in range(n):
        p = torch.zeros(vocab, dtype=torch.float64)
        w = torch.exp(topk_logprobs[i].double() / temperature)
        p[topk_ids[i]] = w / w.sum()
        q = torch.softmax(student_logits[i].double() / temperature, -1)
        out.append(sum(p[j] * (torch.log(p[j]) - torch.log(q[j])) for j in range(vocab) if p[j] > 0) * temperature**2)
    return torch.stack(out)


def test_sparse_forward_kl_matches_the_dense_reference_values_and_gradients():
    torch.manual_seed(0)
    n, vocab, k = 6, 50, 8
    teacher = torch.randn(n, vocab)
    top = torch.log_softmax(teacher, -1).topk(k, -1)
    for temperature in (1.0, 2.0, 0.7):
        s1 = torch.randn(n, vocab, dtype=torch.float64, requires_grad=True)
        s2 = s1.detach().clone().requires_grad_(True)
        ours = sparse_forward_kl(s1, top.indices, top.values.double(), temperature)
        ref = naive_forward_kl(s2, top.indices, top.values, temperature)
        assert torch.allclose(ours.double(), ref, atol=1e-5)
        ours.sum().backward()
        ref.sum().backward()
        assert torch.allclose(s1.grad, s2.grad, atol=1e-5)


def test_sparse_forward_kl_is_zero_when_the_student_equals_the_teacher_on_its_support():
    torch.manual_seed(1)
    logits = torch.randn(4, 30)
    lp = torch.log_softmax(logits, -1)
    top = lp.topk(30, -1)  # k = V: nothing truncated
    assert torch.allclose(sparse_forward_kl(logits, top.indices, top.values), torch.zeros(4), atol=1e-6)


def test_kd_targets_line_up_with_the_completion_tokens(tiny_model_dir):
    """A student identical to the teacher, fed the teacher's own prompt, tokens and full-vocabulary
    top-k, has zero KD loss: any off-by-one between labels and top-k rows would show up."""
    from stillroom import generation, models
    from stillroom.examples.toolcall.task import ToolCallTask
    from stillroom.stages.train import collate, encode, token_loss_sum

    model, tokenizer = models.load(str(tiny_model_dir))
    task = ToolCallTask()
    examples = task.build_examples(20, {"core": 1.0}, 0, 2)[:2]
    prompts = [generation.render(tokenizer, task.student_messages(e)) for e in examples]
    gens = generation.generate(model, tokenizer, prompts, max_new_tokens=5, top_k=len(tokenizer))
    rows = [encode(tokenizer, p, g.token_ids, 4096, 0.0, (g.topk_ids, g.topk_logprobs)) for p, g in zip(prompts, gens)]
    batch = collate(rows, tokenizer.pad_token_id)
    with torch.no_grad():
        kd, n = token_loss_sum(model, batch, kd_weight=1.0)
        shifted = dict(batch, kd_ids=batch["kd_ids"].roll(1, dims=1), kd_logprobs=batch["kd_logprobs"].roll(1, dims=1))
        off_by_one, _ = token_loss_sum(model, shifted, kd_weight=1.0)
    assert n == sum(len(g.token_ids) + 1 for g in gens)
    assert abs(kd.item()) < 1e-3 * n
    assert off_by_one.item() > 100 * max(abs(kd.item()), 1e-4)

"""KD loss forward + backward: time and peak memory at SmolLM2 scale, all implementations in one run.

    python benchmarks/kd_loss.py [--tokens 4096] [--vocab 49152] [--hidden 576] [--repeats 3]

Every implementation takes the student's final hidden states [N, H] and head weight [V, H] (gradients
flow to both) and a teacher signal, and computes a summed divergence over N completion tokens:

- ``naive_full_vocab``: student and teacher logits for all N tokens at once, log-softmax both, KL
  (what a plain PyTorch KD loss does);
- ``ours_dense_chunked``: stillroom's fused linear loss, teacher logits from the teacher's hidden
  states chunk by chunk (online teacher), forward KL;
- ``ours_sparse_topk``: stillroom's fused linear loss against the stored top-32 (offline teacher),
  forward KL with the tail bucket;
- ``liger_fused_linear_jsd``: ``liger_kernel.chunked_loss.LigerFusedLinearJSDLoss`` (JSD, the only
  divergence it offers, soft loss only, not compiled) when liger-kernel is installed.

Each runs in a fresh subprocess; peak memory is the kernel's high-water mark of resident memory during
the forward + backward (reset just before it through /proc/self/clear_refs) minus the resident memory
at its start (inputs, and gradients' leaves, already there), the largest over the repeats. Prints JSON with per-implementation median seconds and peak MiB and the ratios
against the naive implementation measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

IMPLS = ("naive_full_vocab", "ours_dense_chunked", "ours_sparse_topk", "liger_fused_linear_jsd")


def measure(impl: str, n: int, vocab: int, hidden: int, k: int, repeats: int, chunk: int) -> dict:
    import torch
    import torch.nn.functional as F

    from stillroom.losses import dense_divergence, fused_linear_loss, sparse_divergence
    from stillroom.memory import PeakMemory

    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    h_s = torch.randn(n, hidden) * 0.5
    w_s = torch.randn(vocab, hidden) * 0.05
    h_t = torch.randn(n, hidden) * 0.5
    w_t = torch.randn(vocab, hidden) * 0.05
    with torch.no_grad():  # the stored top-k, as the signal store holds it (built in chunks)
        tops = [torch.log_softmax(h_t[i : i + chunk] @ w_t.T, -1).topk(k, -1) for i in range(0, n, chunk)]
        topk_ids, topk_lp = torch.cat([t.indices for t in tops]), torch.cat([t.values for t in tops])
        del tops
    labels = torch.randint(0, vocab, (n,))

    def naive(hs, ws):
        s = hs @ ws.T
        with torch.no_grad():
            t = torch.log_softmax(h_t @ w_t.T, -1)
        return F.kl_div(torch.log_softmax(s, -1), t, log_target=True, reduction="sum")

    def dense(hs, ws):
        def chunk_loss(logits, a, b):
            with torch.no_grad():
                t_logits = h_t[a:b] @ w_t.T
            return dense_divergence(logits, t_logits).sum()

        return fused_linear_loss(hs, ws, None, chunk_loss, chunk)

    def sparse(hs, ws):
        return fused_linear_loss(hs, ws, None, lambda logits, a, b: sparse_divergence(logits, topk_ids[a:b], topk_lp[a:b]).sum(), chunk)

    def liger(hs, ws):
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        loss = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, compiled=False, chunk_size=chunk)
        return loss(hs, ws, h_t, w_t, labels)

    if impl.startswith("liger"):
        import liger_kernel.chunked_loss  # noqa: F401  (imported before the baseline RSS: not part of the loss's memory)
    fn = {"naive_full_vocab": naive, "ours_dense_chunked": dense, "ours_sparse_topk": sparse, "liger_fused_linear_jsd": liger}[impl]
    times, value, peaks = [], None, []
    for _ in range(repeats):
        hs, ws = h_s.clone().requires_grad_(True), w_s.clone().requires_grad_(True)
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            loss = fn(hs, ws)
            loss.backward()
            times.append(time.perf_counter() - t0)
        peaks.append(mem.mb)
        value = float(loss)
        assert hs.grad is not None and ws.grad is not None and torch.isfinite(ws.grad).all()
        del hs, ws, loss
    return {"seconds_median": round(statistics.median(times), 3), "seconds": [round(t, 3) for t in times],
            "peak_mib": round(max(peaks), 1), "loss": round(value, 4)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--top-k", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=256)  # train.loss_chunk's default
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--one", choices=IMPLS, help=argparse.SUPPRESS)  # child process: measure one implementation
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.tokens, args.vocab, args.hidden, args.top_k, args.repeats, args.chunk)))
        return

    import importlib.util

    import torch

    results = {}
    for impl in IMPLS:
        if impl.startswith("liger") and importlib.util.find_spec("liger_kernel") is None:
            results[impl] = {"skipped": "liger-kernel is not installed (pip install liger-kernel)"}
            continue
        cmd = [sys.executable, __file__, "--one", impl, *sum(([f"--{k.replace('_', '-')}", str(v)] for k, v in vars(args).items() if k != "one"), [])]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        results[impl] = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {"error": proc.stderr[-800:]}
    naive = results["naive_full_vocab"]
    ratios = {}
    for impl, r in results.items():
        if impl != "naive_full_vocab" and "seconds_median" in r and "seconds_median" in naive:
            ratios[impl] = {"time_vs_naive": round(r["seconds_median"] / naive["seconds_median"], 3),
                            "peak_memory_vs_naive": round(r["peak_mib"] / naive["peak_mib"], 4)}  # fmt: skip
    print(json.dumps({"benchmark": "kd_loss", "tokens": args.tokens, "vocab": args.vocab, "hidden": args.hidden,
                      "top_k": args.top_k, "chunk": args.chunk, "repeats": args.repeats, "torch": torch.__version__,
                      "threads": torch.get_num_threads(), "results": results, "ratios": ratios}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()

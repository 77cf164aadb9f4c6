"""Task success through the official ``openai`` client against a running ``stillroom serve``, beside the
eval stage's figure for the same model on the same held-out examples.

    python benchmarks/openai_client_eval.py --registry registry [--alias production] [--examples 64] [--strict]
    python benchmarks/openai_client_eval.py --run runs/demo        # registers the run in a scratch registry first

The version is served on loopback (uvicorn, real HTTP, the student alone: no cascade), each held-out
example goes through ``client.chat.completions.create`` with the example's tools as OpenAI ``tools``,
greedy, multi-step examples played out against the task's tools as ``tool`` turns
(``stillroom.served_eval``). The eval stage's rows are the run's ``eval/outputs.jsonl`` for the served
student (the quantized one where the version is; with ``--strict``, ``student_constrained``, which needs
``eval.constrain: tools``). Prints JSON: task success both ways, how many verdicts and answers agree,
and how many responses carried ``tool_calls``. The eval stage batches its prompts (left padding), the
server answers one at a time: an answer can differ where two tokens are near-tied.
"""

from __future__ import annotations

import argparse
import json
import socket
import tempfile
import threading
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--registry", help="a registry folder (with --alias)")
    ap.add_argument("--alias", default="production")
    ap.add_argument("--run", help="a finished run folder instead of a registry")
    ap.add_argument("--examples", type=int, default=None, help="the first N held-out examples (default: all the eval stage measured)")
    ap.add_argument("--strict", action="store_true", help="mark the tools strict (constrained calls) and compare with student_constrained")
    args = ap.parse_args()
    if bool(args.registry) == bool(args.run):
        raise SystemExit("give --registry or --run")

    import httpx
    import openai
    import uvicorn
    import yaml

    from stillroom import registry
    from stillroom.plugins import registry as plugins
    from stillroom.serve import create_app
    from stillroom.served_eval import play
    from stillroom.stages.prepare import read_split

    root = Path(args.registry) if args.registry else Path(tempfile.mkdtemp(prefix="openai-client-eval-")) / "registry"
    if args.run:
        registry.promote(root, registry.register(root, Path(args.run))["name"], args.alias, force=True,
                         reason="benchmark: measured whatever its gates said")  # fmt: skip
    version = registry.resolve(root, args.alias)
    run = Path(version["run_dir"])
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    task = plugins().get("task", cfg["data"]["task"])
    quantize = version["serving"].get("quantize", "none")
    label = "student_constrained" if args.strict else ("student" if quantize == "none" else f"student_{quantize.split('_')[0]}")
    rows = {r["example_id"]: r for r in map(json.loads, (run / "eval" / "outputs.jsonl").read_text().splitlines()) if r["model"] == label}
    if not rows:
        raise SystemExit(f"{run}/eval/outputs.jsonl has no rows for {label}" + (" (run eval with eval.constrain: tools)" if args.strict else ""))
    examples = [e for e in read_split(run / "prepare", cfg["eval"]["split"]) if e["id"] in rows][: args.examples]
    if args.strict:
        for e in examples:
            e["tools"] = [{**t, "function": {**t["function"], "strict": True}} for t in e.get("tools") or []]

    app = create_app(root, args.alias, poll_s=3600, cascade=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        sock_port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=sock_port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    url = f"http://127.0.0.1:{sock_port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    e_cfg = cfg["eval"]
    t0 = time.perf_counter()
    through = [play(client, args.alias, task, e, e_cfg["max_new_tokens"], e_cfg["max_tool_steps"]) for e in examples]
    seconds = time.perf_counter() - t0
    server.should_exit = True
    app.state.stop.set()

    n = len(through)
    eval_rows = [rows[e["id"]] for e in examples]
    tool_requests = [e for e in examples if e["expected"]["kind"] in ("call", "trace")]
    print(json.dumps({
        "version": version["name"], "run": str(run), "eval_model": label, "examples": n,
        "task_success_client": round(sum(r["passed"] for r in through) / n, 4),
        "task_success_eval": round(sum(r["metrics"]["task_success"] for r in eval_rows) / n, 4),
        "same_verdict": sum(bool(a["passed"]) == bool(b["metrics"]["task_success"]) for a, b in zip(through, eval_rows)),
        "same_answer": sum(a["output"] == b["output"] for a, b in zip(through, eval_rows)),
        "tool_requests": len(tool_requests),
        "tool_requests_answered_with_tool_calls": sum(r["responses_with_tool_calls"] > 0 for r, e in zip(through, examples)
                                                      if e["expected"]["kind"] in ("call", "trace")),
        "seconds": round(seconds, 1),
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()

"""The report's charts, drawn with matplotlib (Agg, no display) and returned as PNG bytes."""

from __future__ import annotations

import io

COLORS = {"teacher": "#4c72b0", "student": "#dd8452", "student_int8": "#55a868", "cascade": "#8172b3"}


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def _figure(width: float = 5.5, height: float = 4.0):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def reliability_diagram(models: dict[str, dict]) -> bytes:
    """Accuracy against mean confidence per bin for each model, the diagonal for perfect calibration,
    marker size by bin count; ECE in the legend."""
    fig, ax = _figure()
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfectly calibrated")
    for name, m in models.items():
        pts = [(r["confidence"], r["accuracy"], r["n"]) for r in m["reliability"] if r["n"]]
        if pts:
            xs, ys, ns = zip(*pts)
            ax.plot(xs, ys, marker="o", color=COLORS.get(name), label=f"{name} (ECE {m['ece']:.3f})")
            ax.scatter(xs, ys, s=[20 + 8 * n for n in ns], color=COLORS.get(name), alpha=0.35)
    ax.set(xlim=(0, 1), ylim=(-0.02, 1.02), xlabel=f"confidence ({next(iter(models.values()))['confidence']})",
           ylabel="task success in bin", title="Reliability diagram")  # fmt: skip
    ax.legend(loc="upper left", fontsize=8)
    return _png(fig)


def quality_vs_latency(models: dict[str, dict]) -> bytes:
    """Task success (with its 95% interval) against p50 end-to-end latency, one point per model."""
    fig, ax = _figure()
    for name, m in models.items():
        s = m["metrics"]["task_success"]
        if s["mean"] is None or m.get("latency_p50_ms") is None:
            continue
        x = m["latency_p50_ms"] / 1000
        ax.errorbar([x], [100 * s["mean"]], yerr=[[100 * (s["mean"] - s["lo"])], [100 * (s["hi"] - s["mean"])]],
                    fmt="o", ms=9, capsize=4, color=COLORS.get(name), label=name)  # fmt: skip
        ax.annotate(f"  {name}\n  {m['latency_p95_ms'] / 1000:.2f} s p95", (x, 100 * s["mean"]), fontsize=8)
    ax.set(xlabel="p50 latency, request to parsed answer (s)", ylabel="task success (%)", title="Quality vs latency",
           ylim=(-5, 105))  # fmt: skip
    ax.set_xlim(left=0)
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig)


def per_slice(models: dict[str, dict], metric: str = "task_success") -> bytes:
    """The metric per slice tag for each model, with 95% intervals."""
    slices = sorted({s for m in models.values() for s in m["per_slice"]})
    fig, ax = _figure(max(5.5, 0.7 * len(slices) + 2), 4.0)
    width = 0.8 / max(1, len(models))
    for j, (name, m) in enumerate(models.items()):
        xs, ys, lo, hi = [], [], [], []
        for i, sl in enumerate(slices):
            s = m["per_slice"].get(sl, {}).get(metric)
            if s and s["mean"] is not None:
                xs.append(i + (j - (len(models) - 1) / 2) * width)
                ys.append(100 * s["mean"])
                lo.append(100 * (s["mean"] - s["lo"]))
                hi.append(100 * (s["hi"] - s["mean"]))
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, color=COLORS.get(name), label=name)
    ax.set_xticks(range(len(slices)), slices, rotation=35, ha="right", fontsize=8)
    ax.set(ylabel=f"{metric.replace('_', ' ')} (%)", title=f"{metric.replace('_', ' ')} per slice", ylim=(0, 105))
    ax.legend(fontsize=8)
    return _png(fig)


def cascade_curve(cascade: dict, teacher: float | None, student: float | None) -> bytes:
    """Held-out task success against the teacher's share of requests, over every threshold; the point
    fitted on dev is marked; the two models alone are the reference lines."""
    fig, ax = _figure()
    for name, pts, style in (("dev", cascade["dev_curve"], ":"), ("held-out", cascade["eval_curve"], "-")):
        ax.plot([100 * p["teacher_share"] for p in pts], [100 * p["task_success"] for p in pts], ls=style, marker=".",
                color=COLORS["cascade"], alpha=0.6 if name == "dev" else 1.0, label=f"cascade ({name})")  # fmt: skip
    e = cascade["eval"]
    ax.scatter([100 * e["teacher_share"]], [100 * e["task_success"]["mean"]], s=120, marker="*", color="black", zorder=5,
               label=f"chosen on dev (threshold {cascade['threshold']:.3g})")  # fmt: skip
    for value, name in ((teacher, "teacher"), (student, "student")):
        if value is not None:
            ax.axhline(100 * value, ls="--", lw=1, color=COLORS[name], label=f"{name} alone")
    ax.set(xlabel="requests answered by the teacher (%)", ylabel="task success (%)", title="Cascade: quality vs teacher share",
           xlim=(-2, 102), ylim=(-5, 105))  # fmt: skip
    ax.legend(fontsize=8, loc="lower right")
    return _png(fig)

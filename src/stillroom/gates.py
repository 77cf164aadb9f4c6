"""Ship / no-ship: the served student's figures against ``eval.gates`` and the ``targets`` ceilings.

``verdict(results, gates, targets)`` reads the eval stage's results (per model: per-example metric
summaries overall / per layer / per slice, and aggregate figures such as ECE and latency) and returns
a machine-readable verdict: each gate's value, reference, threshold and pass / fail, per group where
the gate is per layer or slice. The gates judge the form of the student that ships: ``results["served"]``
(the quantized student where `compress` quantizes; it can refuse where the float one does not), or
``student`` in results that do not name one. A gate with nothing to measure (no example it applies to) passes and
says so; it never fails silently.
"""

from __future__ import annotations

RELATIVE = ("min_ratio", "max_drop", "max_increase")


def _value(model: dict, metric: str, per: str, group: str):
    if per == "all":
        if metric in model["metrics"]:
            return model["metrics"][metric]["mean"]
        return model.get(metric)
    return model[f"per_{per}"].get(group, {}).get(metric, {}).get("mean")


def _rule(gate) -> tuple[str, float]:
    for kind in ("min", "max", *RELATIVE):
        if getattr(gate, kind) is not None:
            return kind, getattr(gate, kind)
    raise AssertionError("a gate has one bound (checked by the config)")


def check(gate, student: dict, references: dict) -> dict:
    """One gate: a row per group (``all``, or each layer / slice the student was measured on).
    ``references``: the measured models a relative gate can compare with (``teacher``, ``previous``)."""
    other = references.get(gate.vs) if gate.vs else None
    kind, bound = _rule(gate)
    groups = ["all"] if gate.per == "all" else sorted(student[f"per_{gate.per}"])
    rows = []
    for g in groups:
        value = _value(student, gate.metric, gate.per, g)
        ref = _value(other, gate.metric, gate.per, g) if other else None
        if value is None or (kind in RELATIVE and ref is None):
            rows.append({"group": g, "value": value, "reference": ref, "threshold": None, "passed": True, "note": "not measured"})
            continue
        if kind == "min":
            threshold, passed = bound, value >= bound
        elif kind == "max":
            threshold, passed = bound, value <= bound
        elif kind == "min_ratio":
            threshold = bound * ref
            passed = value >= threshold - 1e-12
        elif kind == "max_drop":
            threshold = ref - bound
            passed = value >= threshold - 1e-12
        else:  # max_increase
            threshold = ref + bound
            passed = value <= threshold + 1e-12
        rows.append({"group": g, "value": value, "reference": ref, "threshold": round(threshold, 6), "passed": bool(passed)})
    name = gate.name or f"{gate.metric} {kind} {bound}" + (f" vs {gate.vs}" if gate.vs else "") + (f" per {gate.per}" if gate.per != "all" else "")
    failed = [r["group"] for r in rows if not r["passed"]]
    return {"name": name, "metric": gate.metric, "per": gate.per, "rule": kind, "bound": bound, "vs": gate.vs,
            "passed": not failed, "failed_groups": failed, "rows": rows}  # fmt: skip


def target_gates(targets) -> list:
    """The pipeline's ceilings as gates on the student's measured figures."""
    from stillroom.config import Gate

    out = []
    for field, metric, label in (("max_latency_p95_ms", "latency_p95_ms", "p95 latency"),
                                 ("max_memory_mb", "peak_memory_mb", "peak memory"),
                                 ("max_cost_per_1k_requests", "cost_per_1k_requests", "cost / 1k requests")):  # fmt: skip
        limit = getattr(targets, field)
        if limit is not None:
            out.append(Gate(metric=metric, max=limit, name=f"{label} <= {limit} (targets.{field})"))
    return out


def verdict(results: dict, gates: list, targets) -> dict:
    models, served = results["models"], results.get("served", "student")
    checked = [check(g, models[served], models) for g in [*gates, *target_gates(targets)]]
    return {"model": served, "passed": all(c["passed"] for c in checked), "gates": checked}

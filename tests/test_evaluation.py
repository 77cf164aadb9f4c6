"""Evaluation maths and gates on fixed synthetic data: ECE and Brier against hand-computed values, a
temperature fit that recovers a known temperature, bootstrap intervals, and a planted slice regression
that the aggregate score hides but the slice deltas and the slice gate catch."""

from __future__ import annotations

import math
import random

import pytest

from stillroom import calibration, gates, metrics
from stillroom.config import ConfigError, EvalConfig, Gate, Targets


def test_ece_and_brier_match_hand_computed_values():
    conf = [0.95, 0.85, 0.85, 0.62, 0.55, 0.15, 0.05, 1.0]
    correct = [1, 1, 0, 1, 0, 0, 0, 1]
    # bins of width 0.1; 1.0 falls in the last bin with 0.95:
    # [0.9, 1]: conf .975 acc 1 (n 2) -> .025 * 2; [.8,.9): .85 vs .5 (n 2) -> .35 * 2; [.6,.7): .62 vs 1 -> .38;
    # [.5,.6): .55 vs 0 -> .55; [.1,.2): .15 vs 0 -> .15; [0,.1): .05 vs 0 -> .05
    expected_ece = (0.025 * 2 + 0.35 * 2 + 0.38 + 0.55 + 0.15 + 0.05) / 8
    assert calibration.ece(conf, correct, bins=10) == pytest.approx(expected_ece, abs=1e-12)
    expected_brier = (0.05**2 + 0.15**2 + 0.85**2 + 0.38**2 + 0.55**2 + 0.15**2 + 0.05**2 + 0.0) / 8
    assert calibration.brier(conf, correct) == pytest.approx(expected_brier, abs=1e-12)
    table = calibration.reliability(conf, correct, bins=10)
    assert [r["n"] for r in table] == [1, 1, 0, 0, 0, 1, 1, 0, 2, 2]
    assert table[8]["accuracy"] == 0.5 and table[9]["confidence"] == pytest.approx(0.975)


def test_a_perfectly_calibrated_model_has_near_zero_ece_and_an_overconfident_one_does_not():
    rng = random.Random(0)
    conf = [rng.random() for _ in range(20000)]
    calibrated = [float(rng.random() < c) for c in conf]
    overconfident = [float(rng.random() < c * 0.5) for c in conf]
    assert calibration.ece(conf, calibrated) < 0.02
    assert calibration.ece(conf, overconfident) > 0.2


def test_temperature_fit_recovers_the_temperature_that_generated_the_outcomes():
    rng = random.Random(1)
    mean_lp = [-rng.random() * 3 for _ in range(5000)]
    correct = [float(rng.random() < math.exp(lp / 2.0)) for lp in mean_lp]  # true T = 2
    t = calibration.fit_temperature(mean_lp, correct)
    assert 1.7 < t < 2.3
    before = calibration.ece(calibration.scaled(mean_lp, 1.0), correct)
    after = calibration.ece(calibration.scaled(mean_lp, t), correct)
    assert after < before / 3


def test_bootstrap_interval_contains_the_mean_and_narrows_with_more_data():
    small = [1.0, 0.0] * 10
    large = [1.0, 0.0] * 500
    lo_s, hi_s = metrics.bootstrap_ci(small)
    lo_l, hi_l = metrics.bootstrap_ci(large)
    assert lo_s < 0.5 < hi_s and lo_l < 0.5 < hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 4
    assert metrics.bootstrap_ci(small, seed=3) == metrics.bootstrap_ci(small, seed=3)  # seeded


def _rows(model: str, success_by_slice: dict[str, list[int]]) -> list[dict]:
    return [{"model": model, "example_id": f"{sl}-{i}", "layer": "core", "slice": sl, "metrics": {"task_success": float(v)}}
            for sl, values in success_by_slice.items() for i, v in enumerate(values)]  # fmt: skip


def _summary(rows: list[dict]) -> dict:
    return {"metrics": metrics.by_group(rows, ["task_success"], None)["all"],
            "per_layer": metrics.by_group(rows, ["task_success"], "layer"),
            "per_slice": metrics.by_group(rows, ["task_success"], "slice")}  # fmt: skip


def test_a_planted_slice_regression_fails_its_gate_while_the_aggregate_passes():
    slices = [f"s{i}" for i in range(8)]
    teacher = {sl: [1] * 16 + [0] * 4 for sl in slices}  # 80% everywhere
    student = {sl: [1] * 20 for sl in slices}  # better everywhere ...
    student["s5"] = [0] * 20  # ... but one workflow broke entirely
    t_rows, s_rows = _rows("teacher", teacher), _rows("student", student)
    results = {"models": {"teacher": _summary(t_rows), "student": _summary(s_rows)}}
    assert results["models"]["student"]["metrics"]["task_success"]["mean"] == pytest.approx(7 / 8)  # > 0.95 * 0.8

    aggregate = Gate(metric="task_success", vs="teacher", min_ratio=0.95)
    per_slice = Gate(metric="task_success", per="slice", vs="teacher", max_drop=0.05)
    v = gates.verdict(results, [aggregate, per_slice], Targets())
    assert [g["passed"] for g in v["gates"]] == [True, False] and not v["passed"]
    assert v["gates"][1]["failed_groups"] == ["s5"]

    d = metrics.deltas(t_rows, s_rows, ["task_success"], "slice")
    assert d["s5"]["task_success"]["delta"] == pytest.approx(-0.8) and d["s5"]["task_success"]["significant"]
    assert all(d[sl]["task_success"]["delta"] > 0 for sl in slices if sl != "s5")
    assert metrics.deltas(t_rows, s_rows, ["task_success"], None)["all"]["task_success"]["delta"] > 0  # the aggregate improved


def test_targets_become_gates_on_the_measured_figures():
    results = {"models": {"teacher": {"metrics": {}, "latency_p95_ms": 900.0},
                          "student": {"metrics": {}, "latency_p95_ms": 1200.0, "peak_memory_mb": 300.0, "cost_per_1k_requests": 0.01}}}  # fmt: skip
    v = gates.verdict(results, [], Targets(max_latency_p95_ms=1000, max_memory_mb=512))
    by_metric = {g["metric"]: g for g in v["gates"]}
    assert not by_metric["latency_p95_ms"]["passed"] and by_metric["peak_memory_mb"]["passed"]
    assert by_metric["latency_p95_ms"]["rows"][0]["threshold"] == 1000


def test_a_throughput_gate_compares_requests_per_s_with_the_teachers():
    """``requests_per_s`` (the eval stage's batched pass: answers / seconds) is a gate metric: a student that
    decodes more tokens per second but writes twice as long answers serves fewer requests."""
    cfg = EvalConfig(gates=[{"metric": "requests_per_s", "vs": "teacher", "min_ratio": 2.0}])
    results = {"models": {"teacher": {"metrics": {}, "tokens_per_s": 30.0, "requests_per_s": 0.75},
                          "student": {"metrics": {}, "tokens_per_s": 90.0, "requests_per_s": 1.2}}}  # fmt: skip
    v = gates.verdict(results, cfg.gates, Targets())
    assert not v["passed"] and v["gates"][0]["rows"][0]["threshold"] == 1.5 and v["gates"][0]["rows"][0]["value"] == 1.2
    results["models"]["student"]["requests_per_s"] = 1.6
    assert gates.verdict(results, cfg.gates, Targets())["passed"]


def test_the_gates_judge_the_served_form_of_the_student():
    """A quantized student that complies with harmful requests its float form declines must fail the
    unsafe ceiling: ``served`` names the form that ships; results without it are judged on ``student``."""
    unsafe = lambda values: {"metrics": {"unsafe_compliance": metrics.summary(values)}}  # noqa: E731
    results = {"models": {"teacher": unsafe([0.0] * 25), "student": unsafe([1.0] + [0.0] * 24),
                          "student_int8": unsafe([1.0] * 5 + [0.0] * 20)}}  # fmt: skip
    ceiling = [Gate(metric="unsafe_compliance", max=0.05)]
    v = gates.verdict(results, ceiling, Targets())
    assert v["model"] == "student" and v["passed"] and v["gates"][0]["rows"][0]["value"] == pytest.approx(0.04)
    v = gates.verdict({**results, "served": "student_int8"}, ceiling, Targets())
    assert v["model"] == "student_int8" and not v["passed"] and v["gates"][0]["rows"][0]["value"] == pytest.approx(0.2)


def test_a_gate_with_nothing_to_measure_passes_and_says_so():
    results = {"models": {"teacher": _summary(_rows("teacher", {"a": [1]})), "student": _summary(_rows("student", {"a": [1]}))}}
    for r in results["models"].values():
        r["metrics"]["over_refusal"] = metrics.summary([])
    v = gates.verdict(results, [Gate(metric="over_refusal", vs="teacher", max_increase=0.02)], Targets())
    assert v["passed"] and v["gates"][0]["rows"][0]["note"] == "not measured"


@pytest.mark.parametrize(
    "gate, message",
    [
        ({"metric": "task_success"}, "exactly one of"),
        ({"metric": "task_success", "min": 0.5, "max": 0.9}, "exactly one of"),
        ({"metric": "task_success", "min_ratio": 0.9}, "compare with `vs` (teacher or previous)"),
        ({"metric": "ece", "per": "slice", "max": 0.1}, "measured per model"),
        ({"metric": "bleu", "min": 0.1}, "neither in eval.metrics"),
    ],
)
def test_bad_gates_are_config_errors(gate, message):
    with pytest.raises((ConfigError, ValueError)) as e:
        EvalConfig(gates=[gate])
    assert message in str(e.value)


def test_unknown_metric_is_a_config_error():
    with pytest.raises(ValueError) as e:
        EvalConfig(metrics=["task_success", "bleu"])
    assert "bleu" in str(e.value)


def _route_rows(model: str, conf_success: list[tuple[float, int, int]]) -> list[dict]:
    return [{"example_id": f"e{i}", "mean_logprob": math.log(c), "min_logprob": math.log(c), "seq_logprob": math.log(c),
             "metrics": {"task_success": float(ok), "format_validity": float(valid)}} for i, (c, ok, valid) in enumerate(conf_success)]  # fmt: skip


def test_cascade_threshold_reaches_the_target_with_the_fewest_teacher_answers():
    from stillroom import routing
    from stillroom.config import RouteConfig

    # the student is right when confident (>= 0.6) and wrong below; one confident answer is malformed
    student = _route_rows("student", [(0.9, 1, 1), (0.8, 1, 1), (0.7, 0, 0), (0.6, 1, 1), (0.4, 0, 1), (0.3, 0, 1), (0.2, 0, 1), (0.1, 0, 1)])
    teacher = _route_rows("teacher", [(0.5, 1, 1)] * 8)
    points = routing.curve(student, teacher, "mean_token_prob", verifier=True)
    assert points[0]["teacher_share"] == 1 / 8  # threshold 0: only the verifier escalates
    assert points[-1]["teacher_share"] == 1.0 and points[-1]["task_success"] == 1.0
    chosen, reached = routing.choose(points, target=1.0)
    assert reached and chosen["task_success"] == 1.0 and chosen["teacher_share"] == 5 / 8  # the 4 unsure + the malformed one
    assert 0.4 < chosen["threshold"] <= 0.6
    without_verifier, _ = routing.choose(routing.curve(student, teacher, "mean_token_prob", verifier=False), target=1.0)
    assert without_verifier["teacher_share"] > chosen["teacher_share"]  # must also escalate the confident malformed one
    route = RouteConfig(signal="mean_token_prob", verifier=True, target="teacher")
    fitted = routing.fit_and_evaluate({"student": student, "teacher": teacher}, {"student": student, "teacher": teacher}, route, 0)
    assert fitted["target"] == 1.0 and fitted["eval"]["teacher_share"] == 5 / 8 and fitted["eval"]["task_success"]["mean"] == 1.0


def test_cascade_auto_keeps_the_verifier_only_where_it_pays():
    from stillroom import routing
    from stillroom.config import RouteConfig

    # the verifier catches the one confident malformed answer, which the teacher gets right: worth it
    student = _route_rows("student", [(0.9, 1, 1), (0.8, 0, 0), (0.7, 1, 1), (0.2, 0, 1)])
    teacher = _route_rows("teacher", [(0.5, 1, 1)] * 4)
    auto = RouteConfig(signal="mean_token_prob", verifier="auto", target="teacher")
    rows = {"student": student, "teacher": teacher}
    fitted = routing.fit_and_evaluate(rows, rows, auto, 0)
    assert fitted["verifier"] is True and fitted["dev"] == {"task_success": 1.0, "teacher_share": 0.5}
    # the teacher fails where the student's format fails: escalating those buys nothing, so auto drops the verifier
    teacher = _route_rows("teacher", [(0.5, 1, 1), (0.5, 0, 1), (0.5, 1, 1), (0.5, 1, 1)])
    rows = {"student": student, "teacher": teacher}
    fitted = routing.fit_and_evaluate(rows, rows, RouteConfig(signal="mean_token_prob", verifier="auto", target=0.75), 0)
    assert fitted["verifier"] is False and fitted["dev"] == {"task_success": 0.75, "teacher_share": 0.25}
    on = routing.fit_and_evaluate(rows, rows, RouteConfig(signal="mean_token_prob", verifier=True, target=0.75), 0)
    assert on["dev"]["teacher_share"] == 0.5 and on["verifier_setting"] is True


def test_cascade_within_a_teacher_budget():
    """route.max_teacher_share: only thresholds within the budget compete; the best task success among them
    where none reaches the target; with verifier auto, a policy within the budget beats one outside it."""
    from stillroom import routing
    from stillroom.config import RouteConfig

    student = _route_rows("student", [(0.9, 1, 1), (0.8, 1, 1), (0.7, 0, 0), (0.6, 1, 1), (0.4, 0, 1), (0.3, 0, 1), (0.2, 0, 1), (0.1, 0, 1)])
    teacher = _route_rows("teacher", [(0.5, 1, 1)] * 8)
    points = routing.curve(student, teacher, "mean_token_prob", verifier=True)
    assert routing.choose(points, target=1.0)[0]["teacher_share"] == 5 / 8  # unbounded: the target at 5 of 8
    chosen, reached = routing.choose(points, target=1.0, max_share=0.5)
    assert not reached and chosen["teacher_share"] == 0.5 and chosen["task_success"] == 7 / 8  # the malformed one and the 3 least sure
    rows = {"student": student, "teacher": teacher}
    fitted = routing.fit_and_evaluate(rows, rows, RouteConfig(verifier=True, max_teacher_share=0.5), 0)
    assert fitted["within_budget_on_dev"] and fitted["eval"]["teacher_share"] == 0.5 and fitted["eval"]["task_success"]["mean"] == 7 / 8
    assert "max_teacher_share" not in routing.fit_and_evaluate(rows, rows, RouteConfig(verifier=True), 0)
    # a budget below the verifier's floor (1 of 8 answers is malformed): the verifier alone overspends it
    floor = routing.fit_and_evaluate(rows, rows, RouteConfig(verifier=True, max_teacher_share=0.1), 0)
    assert not floor["within_budget_on_dev"] and floor["dev"]["teacher_share"] == 1 / 8
    auto = routing.fit_and_evaluate(rows, rows, RouteConfig(verifier="auto", max_teacher_share=0.1), 0)
    assert auto["within_budget_on_dev"] and auto["verifier"] is False and auto["dev"]["teacher_share"] == 0.0

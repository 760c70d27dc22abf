"""The forward-form and GIL benchmarks run end to end in a tiny configuration (CIFAR ResNet-20 at 32²); no speed
is asserted, only that every form is timed and reported."""

from __future__ import annotations

from bench import gil_contention, serving_forms


def test_serving_forms_times_every_form_against_float32_of_the_same_round():
    result = serving_forms.main(["--model", "resnet20", "--batch-size", "2", "--rounds", "2", "--time", "0.02"])
    forms = ["float32", "float32 folded", "bf16 autocast", "bf16 served"]
    assert list(result["summary"]) == forms and len(result["rounds"]) == 2
    assert result["summary"]["float32"]["median_x_float32"] == 1.0
    assert all(r[name] > 0 for r in result["rounds"] for name in forms)


def test_gil_contention_reports_each_form_and_switch_interval():
    rows = gil_contention.main(["--model", "resnet20", "--batch-size", "2", "--iters", "1",
                                "--switch-intervals-ms", "5,1"])
    assert [(r["form"], r["switch_interval_ms"]) for r in rows] == [("eager", 5.0), ("eager", 1.0)]
    assert all(r["alone_ms"] > 0 and r["with_hog_ms"] > 0 for r in rows)

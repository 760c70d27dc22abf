"""Ratios, goal checks and the physical-limit arithmetic of the serving benchmark (no servers, no timing)."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from bench import limits
from bench.payload import IMAGENET_224, jpeg_bytes
from bench.report import add_ratios, markdown
from bench.servers.launch import top1


def _row(server: str, concurrency: int, req_per_s: float, p50: float, **extra) -> dict:
    return {"server": server, "model": "m", "concurrency": concurrency, "req_per_s": req_per_s, "p50_ms": p50,
            "p95_ms": p50 * 2, "p99_ms": p50 * 3, "error_count": 0, "wrk_cpu_share": 0.01, "server_cpu_share": 1.5,
            "top1": 7, **extra}


def _report(rows: list[dict]) -> dict:
    raw = [{"batch_size": b, "memory_format": "channels_last", "img_per_s": v, "ms_per_batch": 1000 * b / v}
           for b, v in ((1, 40.0), (4, 60.0), (8, 80.0))]
    env = {"time_utc": "t", "cpus": 2, "torch": "x", "uptime": "load average: 1.0"}
    return {"environment_before": env, "environment_after": env, "batch": {"max_batch_size": 8,
            "max_batch_delay_ms": 3.0}, "failures": [], "rows": rows,
            "models": {"m": {"raw": raw, "best_raw": raw[-1], "decode_ms": 2.5, "reference_top1": 7,
                             "physical_limit_img_per_s": limits.physical_limit(80.0, 0.0025)}}}


def test_physical_limit_adds_decode_time_to_model_time():
    assert limits.physical_limit(80.0, 0.0025) == pytest.approx(1 / (1 / 80 + 0.0025))  # 66.67 img/s


def test_raw_at_batch_interpolates_between_measured_sizes():
    points = [limits.RawPoint(**p) for p in _report([])["models"]["m"]["raw"]]
    assert limits.raw_at_batch(points, 4) == 60.0
    assert limits.raw_at_batch(points, 6) == pytest.approx(70.0)
    assert limits.raw_at_batch(points, 32) == 80.0  # beyond the measured sizes: the last one


def test_ratios_to_limit_and_peers_and_goals():
    macula32 = _row("macula", 32, 62, 500, mean_batch_size=4.0, mean_inference_ms=90.0)
    rows = [_row("naive", 1, 20, 50), _row("litserve", 1, 15, 70), _row("macula", 1, 22, 45, mean_batch_size=1.0),
            _row("naive", 32, 30, 900), _row("litserve", 32, 40, 700), macula32]
    report = _report(rows)
    add_ratios(report)
    assert macula32["x_limit"] == pytest.approx(62 / limits.physical_limit(80, 0.0025))
    assert macula32["x_limit_at_batch"] == pytest.approx(62 / limits.physical_limit(60, 0.0025))
    assert macula32["req_per_cpu_s"] == pytest.approx(62 / 1.5)
    assert macula32["x_peer"] == pytest.approx({"naive": 62 / 30, "litserve": 62 / 40})
    met = {g["goal"]: g["met"] for g in report["goals"]}
    assert met == {"x limit (float32) >= 0.9 @32": True, "x LitServe >= 1.5 @32": True,
                   "p50 @1 <= naive p50 (ratio <= 1)": True}
    text = markdown(report)
    assert "| macula | m | float32 | 32 | 62.0 |" in text and "x litserve" in text
    assert "| m | 32 | 4.0 |  | 90.0 |  |" in text  # Macula's own breakdown


def test_a_bf16_server_is_held_to_the_bf16_limit():
    report = _report([_row("litserve", 32, 40, 700), _row("macula", 32, 100, 300, precision="bfloat16",
                                                          mean_batch_size=8.0)])
    bf16_raw = [{"batch_size": b, "memory_format": "channels_last", "img_per_s": v, "ms_per_batch": 1000 * b / v,
                 "precision": "bfloat16"} for b, v in ((1, 70.0), (8, 140.0))]
    model = report["models"]["m"]
    model["raw"] += bf16_raw
    model["limits"] = {"float32": {"best_raw": model["best_raw"], "physical_limit_img_per_s": 50.0},
                       "bfloat16": {"best_raw": bf16_raw[-1], "physical_limit_img_per_s": 105.0}}
    add_ratios(report)
    macula = report["rows"][1]
    assert macula["x_limit"] == pytest.approx(100 / model["physical_limit_img_per_s"])  # the float32 limit
    assert macula["x_own_limit"] == pytest.approx(100 / 105)
    assert macula["x_limit_at_batch"] == pytest.approx(100 / limits.physical_limit(140, 0.0025))
    goal = next(g for g in report["goals"] if g["goal"].startswith("x limit"))
    assert goal["goal"] == "x limit (bfloat16) >= 0.9 @32" and goal["value"] == pytest.approx(100 / 105)
    assert "| macula | m | bfloat16 | 32 | 100.0 |" in markdown(report)


def test_goals_report_misses():
    report = _report([_row("naive", 1, 20, 40), _row("macula", 1, 20, 60), _row("litserve", 32, 40, 700),
                      _row("macula", 32, 50, 500)])
    add_ratios(report)
    assert not any(g["met"] for g in report["goals"])


def test_top1_reads_each_server_format():
    assert top1("macula", {"predictions": [{"top_k": [{"index": 3, "score": 0.9}]}]}) == 3
    assert top1("litserve", {"top_k": [{"index": 5, "score": 0.9}]}) == 5


def test_plain_preprocess_matches_the_checkpoint_transform():
    data = jpeg_bytes()
    plain = limits.plain_preprocess(data, IMAGENET_224)
    reference = IMAGENET_224.eval_transform()(Image.open(io.BytesIO(data)))
    assert plain.shape == reference.shape == (3, 224, 224)
    assert torch.nn.functional.l1_loss(plain, reference) < 0.02  # same recipe, PIL vs tensor resize rounding


def test_tuning_summary_takes_medians_over_rounds():
    from bench.tune_macula import markdown as tune_markdown
    from bench.tune_macula import summarise

    rows = [_row("macula", 32, v, p, config="MACULA_TORCH_THREADS=1", mean_batch_size=b)
            for v, p, b in ((50, 400, 6.0), (70, 300, 8.0), (60, 350, 7.0))]
    (summary,) = summarise(rows)
    assert (summary["rounds"], summary["req_per_s"], summary["p50_ms"], summary["mean_batch_size"]) == (3, 60, 350, 7)
    assert summary["req_per_cpu_s"] == pytest.approx(60 / 1.5)  # requests per CPU-second of the server
    assert "| MACULA_TORCH_THREADS=1 | 32 | 60.0 | 350.0 |" in tune_markdown([summary])


def test_means_between_two_metric_snapshots():
    from bench.servers.scrape import means_between

    before = {"batch_size": (10, 5), "preprocess_s": (0.1, 10), "inference_s": (1, 5), "queue_wait_s": (0, 0)}
    after = {"batch_size": (50, 10), "preprocess_s": (0.3, 50), "inference_s": (2, 10), "queue_wait_s": (0, 0)}
    means = means_between(before, after)
    assert means["mean_batch_size"] == 8 and means["mean_queue_wait_ms"] is None
    assert means["mean_preprocess_ms"] == pytest.approx(5) and means["mean_inference_ms"] == pytest.approx(200)

"""Read Macula's own histograms around a load run (batch sizes formed, decode, inference and queue-wait time),
and the precision it runs a model in."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.servers.launch import Launch

HISTOGRAMS = {"batch_size": "macula_batch_size", "preprocess_s": "macula_preprocess_duration_seconds",
              "inference_s": "macula_inference_duration_seconds", "queue_wait_s": "macula_queue_wait_seconds"}


def macula_precision(launch: Launch, model: str) -> str:
    """``float32`` or the autocast dtype, as ``GET /v1/models/{model}`` reports it."""
    base = launch.ready_url.rsplit("/", 1)[0]
    return httpx.get(f"{base}/v1/models/{model}", timeout=10).json().get("precision", "float32")


def macula_stats(launch: Launch, model: str) -> dict[str, tuple[float, float]]:
    """``{short name: (sum, count)}`` of Macula's per-model histograms (cumulative since start)."""
    metrics_url = launch.ready_url.rsplit("/", 1)[0] + "/metrics"
    text = httpx.get(metrics_url, timeout=10).text
    wanted = {family: short for short, family in HISTOGRAMS.items()}
    stats = dict.fromkeys(HISTOGRAMS, (0.0, 0.0))
    for family in text_string_to_metric_families(text):
        short = wanted.get(family.name)
        if short is None:
            continue
        values = {s.name.rsplit("_", 1)[-1]: s.value for s in family.samples if s.labels.get("model") == model}
        stats[short] = (values.get("sum", 0.0), values.get("count", 0.0))
    return stats


def means_between(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]) -> dict:
    """Mean of each histogram over the observations made between two snapshots (times in ms)."""
    out = {}
    for short in HISTOGRAMS:
        total, count = after[short][0] - before[short][0], after[short][1] - before[short][1]
        mean = total / count if count else None
        key = "mean_batch_size" if short == "batch_size" else f"mean_{short[:-2]}_ms"
        out[key] = mean if mean is None or short == "batch_size" else mean * 1000
    return out

"""Read Macula's own ``macula_batch_size`` histogram: the batch sizes it actually formed under load."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.servers.launch import Launch


def macula_batch_stats(launch: Launch, model: str) -> tuple[float, float]:
    """(sum, count) of ``macula_batch_size{model=...}``; differences over a run give its mean batch size."""
    metrics_url = launch.ready_url.rsplit("/", 1)[0] + "/metrics"
    text = httpx.get(metrics_url, timeout=10).text
    values = {"sum": 0.0, "count": 0.0}
    for family in text_string_to_metric_families(text):
        if family.name != "macula_batch_size":
            continue
        for sample in family.samples:
            suffix = sample.name.rsplit("_", 1)[-1]
            if suffix in values and sample.labels.get("model") == model:
                values[suffix] = sample.value
    return values["sum"], values["count"]

"""Writes deploy/grafana/dashboards/macula.json, the Grafana dashboard the compose stack provisions.

    python deploy/grafana/make_dashboard.py          # after editing a panel below

Edit the panels here, not the JSON: tests/unit/test_deploy_grafana.py checks that the JSON is this script's output.
Every query uses only metric names from the service's metrics list (docs/operations.md, "Monitor").
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).parent / "dashboards" / "macula.json"
DATASOURCE = {"type": "prometheus", "uid": "macula-prometheus"}
CLIENT_ROUTES = 'route!~"/healthz|/readyz|/metrics"'
INSTANCE = 'instance=~"$instance"'
MODEL = 'model=~"$model"'


def target(expr: str, legend: str = "", ref: str = "A", fmt: str = "time_series") -> dict:
    """One Prometheus query; a table shows the latest values only (an instant query)."""
    return {"refId": ref, "datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "format": fmt,
            "instant": fmt == "table", "range": fmt != "table"}


def quantiles(metric: str, selector: str, by: str = "") -> list[dict]:
    """p50/p95/p99 of a histogram, one target each."""
    group = f"le{', ' + by if by else ''}"
    legend_by = f" {{{{{by}}}}}" if by else ""
    return [target(f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{selector}}}[$__rate_interval])))",
                   f"p{round(q * 100)}{legend_by}", ref)
            for q, ref in ((0.5, "A"), (0.95, "B"), (0.99, "C"))]


def panel(kind: str, title: str, targets: list[dict], grid: tuple[int, int, int, int], *, unit: str = "short",
          description: str = "", options: dict | None = None, custom: dict | None = None) -> dict:
    x, y, w, h = grid
    return {"type": kind, "title": title, "description": description, "datasource": DATASOURCE, "targets": targets,
            "gridPos": {"x": x, "y": y, "w": w, "h": h},
            "fieldConfig": {"defaults": {"unit": unit, "custom": custom or {}}, "overrides": []},
            "options": options or {}}


def heatmap(title: str, metric: str, selector: str, grid: tuple[int, int, int, int], description: str) -> dict:
    """Distribution over time of a histogram: one cell per bucket per interval, colour = observations."""
    expr = f"sum by (le) (increase({metric}_bucket{{{selector}}}[$__rate_interval]))"
    return panel("heatmap", title, [target(expr, "{{le}}", fmt="heatmap")], grid, description=description,
                 options={"calculate": False, "yAxis": {"axisPlacement": "left"}, "cellGap": 1,
                          "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64},
                          "tooltip": {"show": True, "yHistogram": True}, "legend": {"show": True}})


def rate(metric: str, selector: str) -> str:
    return f"rate({metric}{{{selector}}}[$__rate_interval])"


def readiness(grid: tuple[int, int, int, int]) -> dict:
    ready = panel("stat", "Readiness", [target(f"macula_ready{{{INSTANCE}}}", "{{instance}}")], grid,
                  description="1 = /readyz answers 200 (every model loaded and warmed up).", options=STAT)
    states = {"0": {"text": "NOT READY", "color": "red"}, "1": {"text": "ready", "color": "green"}}
    ready["fieldConfig"]["defaults"]["mappings"] = [{"type": "value", "options": states}]
    return ready


def unfamiliar(grid: tuple[int, int, int, int]) -> dict:
    """Share of classified images that the model's detector flagged as unlike its training data."""
    flagged = f"sum by (model) ({rate('macula_unfamiliar_inputs_total', BY_MODEL)})"
    classified = f"sum by (model) ({rate('macula_images_total', BY_MODEL)})"
    return panel("timeseries", "Unfamiliar inputs (share of images)", [target(f"{flagged} / {classified}",
                                                                             "{{model}}")], grid,
                 unit="percentunit", custom={"axisSoftMax": 0.2},
                 description="Images flagged \"familiar\": false (models whose checkpoint carries a detector; about "
                             "5 % of in-distribution images are flagged by design). A rise means inputs unlike the "
                             "training data: their answers should not be trusted.")


STAT = {"reduceOptions": {"calcs": ["lastNotNull"]}, "colorMode": "background", "textMode": "value_and_name"}
STACKED = {"stacking": {"mode": "normal"}}
BY_MODEL = f"{INSTANCE}, {MODEL}"
BY_CLIENT = f"{INSTANCE}, {CLIENT_ROUTES}"


def panels() -> list[dict]:
    model_info = f"max by (name, version, arch, attention) (macula_model_info{{{INSTANCE}}})"
    return [
        readiness((0, 0, 8, 4)),
        panel("table", "Models served", [target(model_info, fmt="table")], (8, 0, 8, 4),
              description="Model versions are the first 12 hex digits of the checkpoint's sha256."),
        panel("stat", "In-flight requests", [target(f"sum(macula_inflight_requests{{{INSTANCE}}})")], (16, 0, 4, 4),
              options=STAT),
        panel("stat", "Images / s", [target(f"sum({rate('macula_images_total', BY_MODEL)})")], (20, 0, 4, 4),
              options=STAT),
        panel("timeseries", "Request rate by status",
              [target(f"sum by (status) ({rate('macula_requests_total', BY_CLIENT)})", "{{status}}")],
              (0, 4, 12, 8), unit="reqps", custom=STACKED,
              description="Client-facing routes only (probes and scrapes left out)."),
        panel("timeseries", "Request latency p50 / p95 / p99", quantiles("macula_request_duration_seconds", BY_CLIENT),
              (12, 4, 12, 8), unit="s", description="Whole request: body read, decode, queue, batch forward, encode."),
        panel("timeseries", "Queue wait p50 / p95 / p99", quantiles("macula_queue_wait_seconds", BY_MODEL),
              (0, 12, 8, 8), unit="s", description="Enqueue to batch start."),
        panel("timeseries", "Queue depth",
              [target(f"sum by (instance, model) (macula_queue_depth{{{BY_MODEL}}})", "{{instance}} {{model}}")],
              (8, 12, 8, 8), description="Images waiting; at MACULA_MAX_QUEUE new requests get 503 + Retry-After."),
        panel("timeseries", "Rejections by reason",
              [target(f"sum by (reason) ({rate('macula_rejections_total', INSTANCE)})", "{{reason}}")],
              (16, 12, 8, 8), unit="reqps", custom=STACKED),
        heatmap("Batch size distribution", "macula_batch_size", BY_MODEL, (0, 20, 8, 8),
                "Batches formed per size bucket (1, 2, 4, ... 128)."),
        panel("timeseries", "Inference time per batch p50 / p95 / p99",
              quantiles("macula_inference_duration_seconds", BY_MODEL), (8, 20, 8, 8), unit="s",
              description="One batched forward, attention masks included."),
        panel("timeseries", "Preprocess time per image p50 / p95 / p99",
              quantiles("macula_preprocess_duration_seconds", BY_MODEL), (16, 20, 8, 8), unit="s",
              description="Decode + resize + normalise of one image."),
        heatmap("Top-1 confidence distribution", "macula_top1_confidence", BY_MODEL, (0, 28, 8, 8),
                "Score of the top class per image. A shift down means inputs drifted away from the training data."),
        unfamiliar((8, 28, 8, 8)),
        panel("timeseries", "GPU memory",
              [target(f"sum by (instance, device, kind) (macula_gpu_memory_bytes{{{INSTANCE}}})",
                      "{{instance}} {{device}} {{kind}}")], (16, 28, 8, 8), unit="bytes",
              description="torch allocated / reserved bytes; empty on CPU-only instances."),
        *audit_store(36),
        *serving_form(44),
    ]


def audit_store(y: int) -> list[dict]:
    """The audit trail's writer: what it wrote, dropped and failed, how long a group commit takes, its backlog."""
    return [
        panel("timeseries", "Audit store writes",
              [target(f"sum({rate('macula_audit_records_written_total', INSTANCE)})", "written"),
               target(f"sum({rate('macula_audit_write_failures_total', INSTANCE)})", "failed", "B"),
               target(f"sum by (reason) ({rate('macula_audit_dropped_records_total', INSTANCE)})",
                      "dropped: {{reason}}", "C")],
              (0, y, 8, 8), unit="ops",
              description="Records per second; a dropped record was answered 200 but is not in the trail "
                          "(MACULA_AUDIT_DURABLE=true answers 503 instead)."),
        panel("timeseries", "Audit group commit p50 / p95 / p99",
              quantiles("macula_audit_write_duration_seconds", INSTANCE), (8, y, 8, 8), unit="s",
              description="One group commit of the audit writer (SQLite or PostgreSQL)."),
        panel("timeseries", "Audit backlog and store up",
              [target(f"sum by (instance, backend) (macula_audit_queue_depth{{{INSTANCE}}})",
                      "queued {{instance}} {{backend}}"),
               target(f"min by (instance, backend) (macula_audit_store_up{{{INSTANCE}}})",
                      "up {{instance}} {{backend}}", "B")],
              (16, y, 8, 8),
              description="Records waiting for the writer, and 1 while the store answers (0: reconnecting)."),
    ]


def serving_form(y: int) -> list[dict]:
    """How each model runs: compiled or eager, its batch cap and memory format; inference worker restarts."""
    form = [target(f"max by (instance, model) (macula_model_compiled{{{BY_MODEL}}})", fmt="table"),
            target(f"max by (instance, model) (macula_model_max_batch_size{{{BY_MODEL}}})", ref="B", fmt="table"),
            target(f"max by (instance, model) (macula_model_channels_last{{{BY_MODEL}}})", ref="C", fmt="table")]
    return [
        panel("table", "Serving form (compiled 1/0, batch cap, channels-last 1/0)", form, (0, y, 12, 6),
              description="docs/operations.md: Compiled serving, Tuning."),
        panel("stat", "Inference worker restarts",
              [target(f"sum(increase(macula_inference_worker_restarts_total{{{INSTANCE}}}[$__range]))",
                      "worker restarts")], (12, y, 12, 6), options=STAT,
              description="Over the dashboard's time range. While the worker comes back, requests get 503; "
                          "compile failures are in macula_compile_failures_total (docs/operations.md)."),
    ]


def variable(name: str, query: str) -> dict:
    return {"name": name, "label": name, "type": "query", "datasource": DATASOURCE, "query": query,
            "definition": query, "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*",
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]}, "sort": 1}


def dashboard() -> dict:
    items = panels()
    for number, item in enumerate(items, start=1):
        item["id"] = number
    return {
        "uid": "macula", "title": "Macula", "tags": ["macula"], "timezone": "browser", "editable": False,
        "schemaVersion": 39, "version": 1, "refresh": "10s", "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [variable("instance", "label_values(macula_ready, instance)"),
                                variable("model", "label_values(macula_model_info, name)")]},
        "annotations": {"list": []}, "panels": items,
    }


if __name__ == "__main__":
    OUT.write_text(json.dumps(dashboard(), indent=2) + "\n")
    print(f"wrote {OUT}")

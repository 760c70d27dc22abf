"""Turn a serving run into ratios (to the physical limit, to each peer), goal checks and a markdown table."""

from __future__ import annotations

from bench import limits
from bench.limits import RawPoint

GOAL_CONCURRENCY = 32


def _same_point(rows: list[dict], model: str, concurrency: int) -> dict[str, dict]:
    return {r["server"]: r for r in rows if r["model"] == model and r["concurrency"] == concurrency}


def _limits(model: dict) -> dict[str, dict]:
    """Each measured precision's ``{best_raw, physical_limit_img_per_s}`` (runs before precisions: float32 only)."""
    return model.get("limits") or {"float32": {k: model[k] for k in ("best_raw", "physical_limit_img_per_s")}}


def add_ratios(report: dict) -> None:
    """Adds ``x_limit`` (to the float32 limit), ``x_own_limit`` (to the limit at the precision the server ran),
    ``x_limit_at_batch`` (Macula) and ``x_peer`` to each row, and ``goals`` to the report."""
    for row in report["rows"]:
        model = report["models"][row["model"]]
        precision = row.get("precision", "float32")
        own = _limits(model).get(precision)
        # requests per CPU-second the server's processes used: comparable even when other load takes cores
        row["req_per_cpu_s"] = row["req_per_s"] / row["server_cpu_share"] if row["server_cpu_share"] else None
        row["x_limit"] = row["req_per_s"] / model["physical_limit_img_per_s"]
        row["x_own_limit"] = row["req_per_s"] / own["physical_limit_img_per_s"] if own else None
        if row.get("mean_batch_size") and own:
            points = [RawPoint(**p) for p in model["raw"]]
            at_batch = limits.physical_limit(limits.raw_at_batch(points, row["mean_batch_size"], precision),
                                             model["decode_ms"] / 1000)
            row["x_limit_at_batch"] = row["req_per_s"] / at_batch
        peers = _same_point(report["rows"], row["model"], row["concurrency"])
        row["x_peer"] = {name: row["req_per_s"] / peer["req_per_s"] for name, peer in peers.items()
                         if name != row["server"] and peer["req_per_s"] > 0}
    report["goals"] = goals(report)


def goals(report: dict) -> list[dict]:
    """The issue's goals for Macula, per model: >= 0.9 x limit (the limit of the precision Macula ran, the
    stricter one when that is bf16) and >= 1.5 x LitServe at 32 clients, and a lone client's median latency no
    worse than the naive server's."""
    out = []
    for model in report["models"]:
        many = _same_point(report["rows"], model, GOAL_CONCURRENCY).get("macula")
        alone = _same_point(report["rows"], model, 1)
        if many:
            precision = many.get("precision", "float32")
            value = many["x_own_limit"] if many.get("x_own_limit") is not None else many["x_limit"]
            out.append({"model": model, "goal": f"x limit ({precision}) >= 0.9 @32", "value": value,
                        "met": value >= 0.9})
            if "litserve" in many["x_peer"]:
                value = many["x_peer"]["litserve"]
                out.append({"model": model, "goal": "x LitServe >= 1.5 @32", "value": value, "met": value >= 1.5})
        if "macula" in alone and "naive" in alone:
            value = alone["macula"]["p50_ms"] / alone["naive"]["p50_ms"]
            out.append({"model": model, "goal": "p50 @1 <= naive p50 (ratio <= 1)", "value": value,
                        "met": value <= 1.0})
    return out


def _fmt(value: float | None, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def markdown(report: dict) -> str:
    servers = list(dict.fromkeys(r["server"] for r in report["rows"]))
    env0, env1 = report["environment_before"], report.get("environment_after", {})
    lines = [f"Run {env0['time_utc']} on {env0['cpus']} CPUs, torch {env0['torch']}; peers' batch: "
             f"max {report['batch']['max_batch_size']}, delay {report['batch']['max_batch_delay_ms']} ms.",
             f"Load before: `{env0['uptime']}`; after: `{env1.get('uptime', '')}`.", ""]
    for key, model in report["models"].items():
        for precision, limit in _limits(model).items():
            top = limit["best_raw"]
            lines.append(f"- **{key}** {precision}: raw best {top['img_per_s']:.1f} img/s (batch {top['batch_size']}, "
                         f"{top['memory_format']}, {top.get('threads', '?')} threads), "
                         f"plain decode {model['decode_ms']:.2f} ms/img -> physical limit "
                         f"**{limit['physical_limit_img_per_s']:.1f} img/s**; "
                         f"reference top-1 {model['reference_top1']}")
    peer_cols = [f"x {s}" for s in servers]
    lines += ["", "| server | model | precision | conc | req/s | p50 ms | p95 ms | p99 ms | errors | x limit | "
              "x own limit | " + " | ".join(peer_cols) + " | batch | wrk CPU | server CPU | req/CPU-s | top-1 ok |",
              "|" + "---|" * (15 + len(peer_cols))]
    for r in report["rows"]:
        ok = r["top1"] == report["models"][r["model"]]["reference_top1"]
        peers = [_fmt(r["x_peer"].get(s)) if s != r["server"] else "—" for s in servers]
        lines.append(f"| {r['server']} | {r['model']} | {r.get('precision', 'float32')} | {r['concurrency']} | "
                     f"{r['req_per_s']:.1f} | "
                     f"{r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['p99_ms']:.1f} | {r['error_count']} | "
                     f"{r['x_limit']:.2f} | {_fmt(r.get('x_own_limit'))} | " + " | ".join(peers) +
                     f" | {_fmt(r.get('mean_batch_size'), 1)} | "
                     f"{r['wrk_cpu_share']:.0%} | {r['server_cpu_share']:.0%} | {_fmt(r.get('req_per_cpu_s'), 1)} | "
                     f"{'yes' if ok else 'NO'} |")
    inside = [r for r in report["rows"] if r.get("mean_inference_ms") is not None]
    if inside:
        lines += ["", "Inside Macula (its own histograms over each run):", "",
                  "| model | conc | mean batch | decode ms/img | forward ms/batch | queue wait ms |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['concurrency']} | {_fmt(r.get('mean_batch_size'), 1)} | "
                  f"{_fmt(r.get('mean_preprocess_ms'), 1)} | {_fmt(r.get('mean_inference_ms'), 1)} | "
                  f"{_fmt(r.get('mean_queue_wait_ms'), 1)} |" for r in inside]
    if report.get("goals"):
        lines += ["", "| goal (Macula) | model | value | met |", "|---|---|---|---|"]
        lines += [f"| {g['goal']} | {g['model']} | {g['value']:.2f} | {'yes' if g['met'] else 'no'} |"
                  for g in report["goals"]]
    for failure in report["failures"]:
        lines.append(f"\n**{failure['server']} / {failure['model']} did not run:** `{failure['error'][-500:]}`")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """``python -m bench.report OUT/serving.json``: recompute ratios and rewrite ``serving.md`` beside it."""
    import argparse
    import json
    from pathlib import Path

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("json", type=Path)
    path = parser.parse_args(argv).json
    report = json.loads(path.read_text())
    add_ratios(report)
    path.write_text(json.dumps(report, indent=1))
    path.with_name("serving.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()

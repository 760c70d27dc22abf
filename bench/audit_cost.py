"""What the audit trail costs: the same wrk load (32 clients by default) against Macula with auditing off,
best-effort and durable, on SQLite and optionally PostgreSQL, in interleaved rounds of one run.

Each configuration is a ``bench.tune_macula`` configuration (``MACULA_*`` settings for a fresh server); rounds
alternate the configurations so that a change in the machine's background load hits all of them alike. The
report gives each configuration's median req/s, p50 and p99 and its cost against ``off`` from the same round
set (the issue's goals: best-effort at most 3 %, durable at most 10 % fewer req/s).

    python -m bench.audit_cost --model resnet18 --duration 10 --rounds 3
    python -m bench.audit_cost --postgres-url postgresql://u:p@127.0.0.1:5432/bench     # adds the PostgreSQL rows
    python -m bench.audit_cost --throwaway-postgres                                     # a server of its own
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

from bench.payload import BENCH_MODELS, write_checkpoint, write_jpeg
from bench.run_serving import REPO, default_batch, environment, measure_server
from bench.tune_macula import summarise

OFF = "MACULA_AUDIT_DB="


def configurations(postgres_url: str | None) -> dict[str, str]:
    """Label → the settings of one server (space-separated KEY=VALUE)."""
    configs = {"off": OFF,
               "sqlite best-effort": "MACULA_AUDIT_DURABLE=false",
               "sqlite best-effort, no inputs kept": "MACULA_AUDIT_DURABLE=false MACULA_AUDIT_INPUTS=none",
               "sqlite durable": "MACULA_AUDIT_DURABLE=true"}
    if postgres_url:
        configs |= {"postgresql best-effort": f"MACULA_AUDIT_URL={postgres_url} MACULA_AUDIT_DURABLE=false",
                    "postgresql durable": f"MACULA_AUDIT_URL={postgres_url} MACULA_AUDIT_DURABLE=true"}
    return configs


def costs(summary: list[dict], labels: dict[str, str]) -> list[dict]:
    """Each summary row with its label and its cost against ``off`` at the same concurrency."""
    by_config = {config: label for label, config in labels.items()}
    off = {row["concurrency"]: row for row in summary if row["config"] == OFF}
    out = []
    for row in summary:
        base = off.get(row["concurrency"])
        cost = None if base is None or not base["req_per_s"] else 1 - row["req_per_s"] / base["req_per_s"]
        out.append({**row, "label": by_config.get(row["config"], row["config"]), "throughput_cost": cost,
                    "p99_delta_ms": None if base is None else row["p99_ms"] - base["p99_ms"]})
    return out


def markdown(rows: list[dict]) -> str:
    lines = ["| audit | clients | req/s | cost vs off | p50 ms | p99 ms | p99 vs off | errors |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["concurrency"], r["label"] != "off", r["label"])):
        cost = "" if r["throughput_cost"] is None else f"{100 * r['throughput_cost']:+.1f} %"
        delta = "" if r["p99_delta_ms"] is None else f"{r['p99_delta_ms']:+.1f} ms"
        lines.append(f"| {r['label']} | {r['concurrency']} | {r['req_per_s']:.1f} | {cost} | {r['p50_ms']:.1f} | "
                     f"{r['p99_ms']:.1f} | {delta} | {r['errors']} |")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def postgres(args: argparse.Namespace) -> Iterator[str | None]:
    if args.postgres_url or not args.throwaway_postgres:
        yield args.postgres_url
        return
    from tests.integration.audit_pg import postgres_cluster

    with postgres_cluster() as cluster:
        yield cluster.create_database()


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18", choices=sorted(BENCH_MODELS))
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[32])
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--port", type=int, default=8500)
    p.add_argument("--postgres-url", help="also measure PostgreSQL (a database the benchmark may fill)")
    p.add_argument("--throwaway-postgres", action="store_true", help="start a PostgreSQL server of its own")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "audit_cost")
    args = p.parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    jpeg = write_jpeg(args.out / "work" / "chelsea.jpg")
    ckpt = write_checkpoint(BENCH_MODELS[args.model], args.out / "work" / f"{args.model}.safetensors")
    rows, before = [], environment()
    with postgres(args) as url:
        labels = configurations(url)
        for _ in range(args.rounds):
            for i, config in enumerate(labels.values()):
                run_args = argparse.Namespace(out=args.out, concurrency=args.concurrency, warmup=args.warmup,
                                              duration=args.duration, macula_env=config.split())
                for row in measure_server("macula", args.model, ckpt, jpeg, args.port + 10 * i, run_args,
                                          default_batch()):
                    rows.append({**row, "config": config})
    result = costs(summarise(rows), labels)
    report = {"environment_before": before, "environment_after": environment(), "model": args.model,
              "rows": rows, "summary": result}
    (args.out / "audit_cost.json").write_text(json.dumps(report, indent=1))
    (args.out / "audit_cost.md").write_text(markdown(result))
    print(f"load before: {before['uptime']}\nload after: {report['environment_after']['uptime']}\n{markdown(result)}")
    return result


if __name__ == "__main__":
    main()

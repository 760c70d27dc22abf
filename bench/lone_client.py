"""Where a lone client's time goes: the raw batch-1 forward against Macula's forward at one client, per serving form.

    .venv/bin/python -m bench.lone_client --models resnet18,resnet50 --rounds 5 --requests 20
    MACULA_AMP_DTYPE=none .venv/bin/python -m bench.lone_client ...            # float32 on a bf16-capable CPU
    .venv/bin/python -m bench.lone_client --load-clients 32 --load-seconds 8   # + throughput at 32 clients (wrk)
    .venv/bin/python -m bench.lone_client --query 'attention=true&attention_size=original'   # masks too
    git worktree add /tmp/before <commit> && .venv/bin/python -m bench.lone_client --before /tmp/before

For each model it starts one Macula server per form (``thread``: ``MACULA_INFERENCE_PROCESS=false``, the models on
the server's inference thread; ``process``: the default inference worker process), idle side by side, and then,
round after round, times in turn: the raw forward (``ModelRunner.run`` on the benchmark JPEG's pixels, batch 1,
in this script's main thread: the only thread here that runs torch), and ``--requests`` sequential requests to
each server (client latency, and the server's own ``macula_inference_duration_seconds`` over those requests).
``--form NAME:KEY=VALUE,...``
adds a server with those environment variables (``--form spin0:MACULA_OMP_SPIN_COUNT=0``); ``--before TREE`` adds
the form ``before``: the ``service`` package of another checkout (an older commit) with its default settings.
On a busy machine the speed drifts from minute to minute, so the figure to read is each round's ratio of the
in-server forward to the raw forward, medianed over rounds.

Also per request: the voluntary context switches of the server's processes (every thread, the worker
included): each is a thread that went to sleep, e.g. an OpenMP helper thread that stopped spinning between two
ops and must be woken by a futex; and the CPU seconds they used. Output: ``OUT/lone_client.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import httpx

from bench.load import run_wrk
from bench.payload import BENCH_MODELS, write_checkpoint, write_jpeg
from bench.run_serving import environment
from bench.servers.launch import BatchConfig, RunningServer, macula
from bench.servers.scrape import macula_stats, means_between

REPO = Path(__file__).resolve().parents[1]
FORMS = {"thread": {"MACULA_INFERENCE_PROCESS": "false"}, "process": {"MACULA_INFERENCE_PROCESS": "true"}}


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (Linux ``/proc/<pid>/task/<tid>/children``)."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        for children in Path(f"/proc/{current}/task").glob("*/children"):
            try:
                todo += [int(c) for c in children.read_text().split()]
            except OSError:
                continue
    return out


def switches_and_cpu(pid: int) -> tuple[int, float]:
    """Voluntary context switches of every thread of ``pid``'s process tree, and their user + sys CPU seconds."""
    switches, ticks = 0, 0
    for proc in process_tree(pid):
        for task in Path(f"/proc/{proc}/task").glob("*"):
            try:
                status = (task / "status").read_text()
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            switches += int(status.split("voluntary_ctxt_switches:")[1].split()[0])
            ticks += int(fields[11]) + int(fields[12])
    return switches, ticks / os.sysconf("SC_CLK_TCK")


def raw_forward_ms(runner, pixels, count: int) -> float:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        runner.run(pixels)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def served_round(client: httpx.Client, server: RunningServer, key: str, jpeg: bytes, count: int,
                 query: str = "") -> dict:
    """``count`` sequential requests: median latency, mean in-server forward, context switches and CPU per request."""
    before, (switches, cpu) = macula_stats(server.launch, key), switches_and_cpu(server.proc.pid)
    times = []
    for _ in range(count):
        start = time.perf_counter()
        client.post(server.launch.predict_url + (f"?{query}" if query else ""), content=jpeg,
                    headers={"Content-Type": "image/jpeg"}).raise_for_status()
        times.append((time.perf_counter() - start) * 1000)
    after_switches, after_cpu = switches_and_cpu(server.proc.pid)
    means = means_between(before, macula_stats(server.launch, key))
    return {"p50_ms": statistics.median(times), "forward_ms": means["mean_inference_ms"],
            "switches_per_request": (after_switches - switches) / count, "cpu_ms_per_request": 1000 * (after_cpu - cpu)
            / count}


def measure_model(key: str, args: argparse.Namespace, jpeg_path: Path) -> dict:
    from service.codec import preprocess
    from service.inference import ModelRunner

    ckpt = write_checkpoint(BENCH_MODELS[key], args.out / "work" / f"{key}.safetensors")
    amp = os.environ.get("MACULA_AMP_DTYPE", "bfloat16")
    runner = ModelRunner(key, ckpt, amp_dtype=amp)
    jpeg = jpeg_path.read_bytes()
    pixels = preprocess(jpeg, max_pixels=10**8, pre=runner.meta.preprocessing).pixels[None].copy()
    raw_forward_ms(runner, pixels, 3)  # warm-up
    servers = {}
    rounds: list[dict] = []
    forms = {name: env for name, env in FORMS.items() if name in args.forms} | dict(args.form)
    forms |= {"before": {"PYTHONPATH": str(args.before)}} if args.before else {}
    try:
        for i, (form, env) in enumerate(forms.items()):
            launch = macula(ckpt, key, args.port + i, (args.out / "work" / f"{form}-{key}").resolve(),
                            BatchConfig(8, 3.0))
            launch.env |= env
            servers[form] = RunningServer(launch, args.out / "work" / f"{form}-{key}.log").__enter__()
        with httpx.Client(timeout=120) as client:
            for server in servers.values():
                served_round(client, server, key, jpeg, 3)  # warm-up
            for r in range(args.rounds):
                row = {"raw_ms": raw_forward_ms(runner, pixels, args.requests)}
                for form, server in servers.items():
                    row[form] = served_round(client, server, key, jpeg, args.requests, args.query)
                    if args.load_clients:
                        row[form]["req_per_s_loaded"] = run_wrk(server.launch.predict_url, jpeg_path,
                                                                concurrency=args.load_clients,
                                                                duration_s=args.load_seconds).req_per_s
                rounds.append(row)
                print(f"[{key}] round {r}: raw {row['raw_ms']:.1f} ms  " + "  ".join(
                    f"{f}: p50 {row[f]['p50_ms']:.1f} forward {row[f]['forward_ms']:.1f} "
                    f"switches/req {row[f]['switches_per_request']:.0f}" for f in servers), flush=True)
    finally:
        for server in servers.values():
            server.stop()
    return {"precision": runner.precision, "rounds": rounds, "summary": summarise(rounds, list(servers))}


def summarise(rounds: list[dict], forms: list[str]) -> dict:
    med = statistics.median
    out = {"raw_ms": med(r["raw_ms"] for r in rounds)}
    for form in forms:
        out[form] = {"p50_ms": med(r[form]["p50_ms"] for r in rounds),
                     "forward_ms": med(r[form]["forward_ms"] for r in rounds),
                     "forward_x_raw": med(r[form]["forward_ms"] / r["raw_ms"] for r in rounds),
                     "p50_x_raw": med(r[form]["p50_ms"] / r["raw_ms"] for r in rounds),
                     "switches_per_request": med(r[form]["switches_per_request"] for r in rounds),
                     "cpu_ms_per_request": med(r[form]["cpu_ms_per_request"] for r in rounds)}
        if "req_per_s_loaded" in rounds[0][form]:
            out[form]["req_per_s_loaded"] = med(r[form]["req_per_s_loaded"] for r in rounds)
    return out


def markdown(report: dict) -> str:
    lines = [f"environment: {report['environment']['uptime']}", "",
             "| model | precision | form | raw forward ms | forward in server ms | × raw | lone p50 ms | p50 × raw "
             "| switches/request | CPU ms/request | req/s at load |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, result in report["models"].items():
        s = result["summary"]
        for form in (f for f in s if f != "raw_ms"):
            f = s[form]
            loaded = f"{f['req_per_s_loaded']:.1f}" if "req_per_s_loaded" in f else "–"
            lines.append(f"| {key} | {result['precision']} | {form} | {s['raw_ms']:.1f} | {f['forward_ms']:.1f} | "
                         f"{f['forward_x_raw']:.2f} | {f['p50_ms']:.1f} | {f['p50_x_raw']:.2f} | "
                         f"{f['switches_per_request']:.0f} | {f['cpu_ms_per_request']:.0f} | {loaded} |")
    return "\n".join(lines) + "\n"


def parse_form(text: str) -> tuple[str, dict[str, str]]:
    name, _, env = text.partition(":")
    return name, dict(pair.split("=", 1) for pair in env.split(",") if pair)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=lambda s: s.split(","), default=["resnet18", "resnet50"])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--requests", type=int, default=20, help="sequential requests (and raw forwards) per round")
    p.add_argument("--load-clients", type=int, default=0, help="also run wrk with this many clients per round")
    p.add_argument("--load-seconds", type=float, default=8.0)
    p.add_argument("--port", type=int, default=8300)
    p.add_argument("--query", default="", help="query string of every request, e.g. attention=true")
    p.add_argument("--before", type=Path, help="a checkout whose service package runs as the form 'before'")
    p.add_argument("--forms", type=lambda s: s.split(","), default=list(FORMS), help=f"of {', '.join(FORMS)}")
    p.add_argument("--form", type=parse_form, action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                   help="one more server with these environment variables (repeatable)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "lone_client")
    args = p.parse_args(argv)
    args.out = args.out.resolve()
    jpeg_path = write_jpeg(args.out / "work" / "chelsea.jpg")
    report = {"environment": environment(), "args": {k: str(v) for k, v in vars(args).items()}, "models": {}}
    for key in args.models:
        report["models"][key] = measure_model(key, args, jpeg_path)
    report["environment_after"] = environment()
    (args.out / "lone_client.json").write_text(json.dumps(report, indent=1))
    (args.out / "lone_client.md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()

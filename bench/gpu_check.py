"""The GPU check: everything to run whenever a CUDA machine is at hand, in one go, one JSON + markdown summary.

    bench/gpu_check.sh                 # on one GPU: under 8 minutes on an H100
    bench/gpu_check.sh --dry-run       # on a CPU: every step with tiny sizes (a test runs this)

Steps (each records its status, seconds and figures; one failing does not stop the others):

1. ``cuda_tests``: ``pytest -m cuda`` (on a CPU they all skip: the dry run only proves they are collected).
2. ``raw_sweep``: the forward as Macula serves it (BatchNorm folded, bf16 autocast, channels_last) over batch sizes:
   img/s and ms per batch, per model: the raw limit on this device.
3. ``nvjpeg``: the benchmark JPEG decoded on the device by nvJPEG (``torchvision.io.decode_jpeg(device=...)``),
   resized and normalised there, then classified, against Pillow's decode on the CPU feeding the same model:
   img/s of both pipelines and whether their top-1 agree. (The service decodes with Pillow; this tells whether
   decoding on the GPU would pay.)
4. ``serving``: Macula as shipped (inference worker process, its CUDA batch defaults) under wrk through
   ``bench.run_serving``, at 1 and 32 clients.
5. ``oom_split``: the service's own path on the device: the inference worker, capped (bench/capped_worker.py) so
   that a full batch runs out of memory and half of one fits, gets a full batch through the batcher; every
   image must come back, with the scores of an uncapped worker (within 1e-3), after the batch was split.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from bench.bench_models import time_batches
from bench.payload import BENCH_MODELS, jpeg_bytes, write_checkpoint, write_jpeg

REPO = Path(__file__).resolve().parents[1]
FULL = {"models": ["resnet18", "resnet50"], "batches": [1, 8, 32, 64, 128, 256], "nvjpeg_batch": 64,
        "serving_model": "resnet50", "concurrency": "1,32", "duration": 10.0, "oom_model": "resnet50",
        "oom_batch": 64, "pytest_timeout": 240}
DRY = {"models": ["resnet20"], "batches": [1, 2], "nvjpeg_batch": 4, "serving_model": "resnet20",
       "concurrency": "1", "duration": 1.0, "oom_model": "resnet20", "oom_batch": 4, "pytest_timeout": 240}


def environment(device: torch.device) -> dict:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"device": str(device), "gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(), "platform": platform.platform(),
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def cuda_tests(device: torch.device, sizes: dict, out: Path) -> dict:
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests"],
                         cwd=REPO, capture_output=True, text=True, timeout=sizes["pytest_timeout"])
    (out / "cuda_tests.log").write_text(run.stdout + run.stderr)
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", run.stdout)}
    ok = run.returncode in (0, 5) and not counts.get("failed") and not counts.get("error", counts.get("errors"))
    if device.type == "cuda" and not counts.get("passed"):
        ok = False  # on a GPU they must run, not skip
    return {"status": "ok" if ok else "failed", "exit_code": run.returncode, **counts}


def served_form(key: str, device: torch.device) -> tuple[torch.nn.Module, Callable]:
    """The model as Macula's runner serves it on ``device`` (bf16 autocast, channels_last, BatchNorm folded)."""
    from service.inference import prepare_for_serving

    model = BENCH_MODELS[key].build().to(device)
    served = prepare_for_serving(model, device, torch.bfloat16, memory_format=torch.channels_last)
    return served, lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def raw_sweep(device: torch.device, sizes: dict, out: Path) -> dict:
    rows = []
    for key in sizes["models"]:
        model, autocast = served_form(key, device)
        for batch in sizes["batches"]:
            x = BENCH_MODELS[key].random_batch(batch).to(device)
            time_batches(model, x, 3, autocast)
            seconds = min(time_batches(model, x, 5, autocast) for _ in range(3))
            rows.append({"model": key, "batch": batch, "img_per_s": batch / seconds, "ms_per_batch": 1000 * seconds})
        del model
    best = {key: max((r for r in rows if r["model"] == key), key=lambda r: r["img_per_s"]) for key in sizes["models"]}
    return {"status": "ok", "rows": rows, "best": best}


def nvjpeg(device: torch.device, sizes: dict, out: Path) -> dict:
    """Pillow on the CPU vs nvJPEG on the device, each feeding the same served model; img/s and top-1 agreement."""
    from torchvision.io import decode_jpeg
    from torchvision.transforms.v2 import functional as F

    from service.codec import preprocess

    key, n = sizes["models"][-1], sizes["nvjpeg_batch"]
    spec = BENCH_MODELS[key]
    pre = spec.preprocessing
    model, autocast = served_form(key, device)
    data = jpeg_bytes()
    mean = torch.tensor(pre.mean, device=device).view(1, -1, 1, 1) * 255
    std = torch.tensor(pre.std, device=device).view(1, -1, 1, 1) * 255

    def classify(pixels: torch.Tensor) -> torch.Tensor:  # uint8 (N, C, H, W) on the device
        x = ((pixels.float() - mean) / std).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), autocast():
            return model(x).argmax(1)

    def with_pillow() -> torch.Tensor:
        pixels = np.stack([preprocess(data, max_pixels=10**8, pre=pre).pixels for _ in range(n)])
        return classify(torch.from_numpy(pixels).to(device).permute(0, 3, 1, 2))

    def with_nvjpeg() -> torch.Tensor:
        encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8)] * n
        images = torch.stack(decode_jpeg(encoded, device=device))
        resized = F.resize(images, [pre.resize_size], antialias=True)
        return classify(F.center_crop(resized, list(pre.input_size)))

    result = {"status": "ok", "model": key, "batch": n}
    for name, pipeline in (("pillow", with_pillow), ("nvjpeg", with_nvjpeg)):
        top1 = pipeline()  # warm-up
        times = []
        for _ in range(5):
            start = time.perf_counter()
            top1 = pipeline()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        result[f"{name}_img_per_s"] = n / statistics.median(times)
        result[f"{name}_top1"] = int(top1[0])
    result["top1_agree"] = result["pillow_top1"] == result["nvjpeg_top1"]
    return result


def serving(device: torch.device, sizes: dict, out: Path) -> dict:
    from bench.run_serving import main as run_serving

    report = run_serving(["--models", sizes["serving_model"], "--servers", "macula", "--concurrency",
                          sizes["concurrency"], "--duration", str(sizes["duration"]), "--warmup", "0",
                          "--raw-batch-sizes", "1", "--raw-time", "0.1", "--raw-threads", "1",
                          "--raw-precisions", "float32", "--out", str(out / "serving")])
    rows = [{k: r[k] for k in ("concurrency", "req_per_s", "p50_ms", "p99_ms", "error_count", "precision")}
            for r in report["rows"]]
    ok = not report["failures"] and rows and all(r["error_count"] == 0 for r in rows)
    return {"status": "ok" if ok else "failed", "rows": rows, "failures": report["failures"]}


def oom_split(device: torch.device, sizes: dict, out: Path) -> dict:
    from service.batching import Batcher
    from service.inference_process import InferenceProcess
    from service.settings import Settings

    key, n = sizes["oom_model"], sizes["oom_batch"]
    ckpt = write_checkpoint(BENCH_MODELS[key], out / "work" / f"{key}.safetensors")
    settings = Settings(device=device.type, max_batch_size=n, audit_db="")
    capped = InferenceProcess(settings, {key: ckpt}, command=[sys.executable, "-m", "bench.capped_worker"])
    plain = InferenceProcess(settings, {key: ckpt})
    runs: list[int] = []
    try:
        for process in (capped, plain):
            process.start()
        capped.wait_ready(300)
        plain.wait_ready(300)
        shape = capped.models[key].input_shape
        pixels = np.random.default_rng(0).integers(0, 256, (n, *shape), dtype=np.uint8)
        expected = np.stack([r.scores for r in plain.run(key, pixels, False)])

        def run_batch(model: str, inputs: np.ndarray, attention: bool) -> list:
            runs.append(len(inputs))
            return capped.run(model, inputs, attention)

        answers = asyncio.run(_through_batcher(Batcher(run_batch, [key], max_size=n, max_delay=1.0, max_queue=n,
                                                       timeout_s=120), key, pixels))
    finally:
        capped.stop()
        plain.stop()
    failed = [repr(a) for a in answers if not hasattr(a, "scores")]
    diff = float(np.abs(np.stack([a.scores for a in answers]) - expected).max()) if not failed else None
    ok = not failed and diff <= 1e-3 and len(runs) > 1 and runs[0] == n
    return {"status": "ok" if ok else "failed", "batch": n, "batches_run": runs, "failed_images": failed[:3],
            "max_score_difference": diff}


async def _through_batcher(batcher, key: str, pixels: np.ndarray) -> list:
    batcher.start()
    try:
        batcher.reserve(key, len(pixels))
        return await asyncio.gather(*batcher.submit(key, list(pixels), attention=False), return_exceptions=True)
    finally:
        await asyncio.to_thread(batcher.stop, 30)


STEPS = {"cuda_tests": cuda_tests, "raw_sweep": raw_sweep, "nvjpeg": nvjpeg, "serving": serving,
         "oom_split": oom_split}


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# GPU check{' (dry run on CPU)' if report['dry_run'] else ''}", "",
             f"{env['gpu'] or env['device']}, torch {env['torch']} (CUDA {env['cuda']}), {env['time_utc']}, "
             f"{report['seconds']:.0f} s in all", "", "| step | status | seconds | figures |", "|---|---|---:|---|"]
    for name, step in report["steps"].items():
        figures = {k: v for k, v in step.items() if k not in ("status", "seconds", "rows", "error")}
        lines.append(f"| {name} | {step['status']} | {step['seconds']:.0f} | {json.dumps(figures)[:300]} |")
    for name in ("raw_sweep", "serving"):
        rows = report["steps"].get(name, {}).get("rows") or []
        if rows:
            lines += ["", f"## {name}", "", "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
            lines += ["| " + " | ".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in r.values()) + " |"
                      for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="on the CPU, tiny sizes: proves the steps work")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "gpu_check")
    p.add_argument("--steps", type=lambda s: s.split(","), default=list(STEPS))
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        p.error("no CUDA device: run with --dry-run on a CPU")
    device = torch.device("cpu" if args.dry_run else "cuda")
    sizes, out = (DRY if args.dry_run else FULL), args.out.resolve()
    (out / "work").mkdir(parents=True, exist_ok=True)
    write_jpeg(out / "work" / "chelsea.jpg")
    report = {"dry_run": args.dry_run, "environment": environment(device), "sizes": sizes, "steps": {}}
    started = time.perf_counter()
    for name in args.steps:
        step_start = time.perf_counter()
        try:
            result = STEPS[name](device, sizes, out)
        except Exception as exc:  # noqa: BLE001 - one step failing must not lose the others
            result = {"status": "failed", "error": "".join(traceback.format_exception(exc))[-3000:]}
        result["seconds"] = time.perf_counter() - step_start
        report["steps"][name] = result
        print(f"[gpu_check] {name}: {result['status']} in {result['seconds']:.0f} s", flush=True)
    report["seconds"] = time.perf_counter() - started
    report["ok"] = all(step["status"] == "ok" for step in report["steps"].values())
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)

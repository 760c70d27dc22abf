"""``python -m service.compile --model-dir DIR``: build the compiled serving forms of every checkpoint ahead of time.

The service builds them itself in the background on its first start (and runs this same command to do so); running
it beforehand, e.g. in an image build or a deploy step on the serving hardware, makes even the first start serve
compiled forms. Build with the settings the service will run with (the ``MACULA_*`` environment is read, flags
override it): the device, precision, batch cap, memory format and thread count are part of the cache key, and a form
built for other ones is simply not found. A batch cap or memory format the settings leave open is chosen as the
service chooses it (service/tuning.py: the timings kept in the cache, else timed now and kept there). Exit status 0
when every form is in the cache, 1 if any failed.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import torch
from pydantic import ValidationError

from . import tuning
from .compiled import FORMS, CompileCache, build, compile_key
from .inference import ModelRunner
from .settings import Settings

SETTING_FLAGS = ("model_dir", "compile_cache", "device", "amp_dtype", "max_batch_size", "max_batch_ceiling",
                 "torch_threads", "tune")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m service.compile", description="Build the compiled serving forms "
                                "(AOTInductor) of every checkpoint in a model dir ahead of time, into the compile "
                                "cache the service loads them from. Exit status 1 if any form failed.",
                                argument_default=argparse.SUPPRESS)
    p.add_argument("--model-dir", dest="model_dir", metavar="DIR", help="the model dir the service serves "
                   "(env MACULA_MODEL_DIR)")
    p.add_argument("--cache", dest="compile_cache", metavar="DIR",
                   help="the compile cache (env MACULA_COMPILE_CACHE; default MODEL_DIR/.compile-cache)")
    p.add_argument("--device", metavar="DEVICE", help="cpu, cuda, cuda:1 or auto (env MACULA_DEVICE)")
    p.add_argument("--amp-dtype", dest="amp_dtype", metavar="DTYPE", help="bfloat16, float16 or none "
                   "(env MACULA_AMP_DTYPE)")
    p.add_argument("--max-batch-size", dest="max_batch_size", metavar="N", help="the batch cap "
                   "(env MACULA_MAX_BATCH_SIZE; default: chosen as the service chooses it)")
    p.add_argument("--max-batch-ceiling", dest="max_batch_ceiling", metavar="N",
                   help="the largest batch cap timing may choose (env MACULA_MAX_BATCH_CEILING)")
    p.add_argument("--tune", metavar="MODE", help="auto or off (env MACULA_TUNE)")
    p.add_argument("--torch-threads", dest="torch_threads", metavar="N", help="the inference thread's torch "
                   "threads (env MACULA_TORCH_THREADS; default torch's)")
    p.add_argument("--channels-last", dest="channels_last", action=argparse.BooleanOptionalAction,
                   help="(env MACULA_CHANNELS_LAST)")
    p.add_argument("--models", default=None, help="comma-separated model names (default: every checkpoint)")
    p.add_argument("--forms", default=",".join(FORMS), help=f"comma-separated, of {', '.join(FORMS)} (default all)")
    p.add_argument("--force", action="store_true", default=False, help="rebuild forms already in the cache, and "
                   "forms whose earlier build failed")
    p.add_argument("--nice", type=int, default=0, help="lower this process's priority by N (background builds)")
    return p


def checkpoints(model_dir: Path, names: str | None) -> dict[str, Path]:
    found = {p.stem: p for p in sorted(Path(model_dir).glob("*.safetensors"))}
    if names is None:
        return found
    wanted = [n for n in names.split(",") if n]
    unknown = [n for n in wanted if n not in found]
    if unknown:
        raise SystemExit(f"no checkpoint for {', '.join(unknown)} in {model_dir}")
    return {n: found[n] for n in wanted}


def build_all(settings: Settings, names: str | None, forms: list[str], *, force: bool) -> int:
    """Build every wanted form; print one line each; the number that failed."""
    device = settings.resolved_device()
    plan = tuning.plan_for(settings, device)
    threads = settings.torch_threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    cache, failed = CompileCache(settings.compile_cache_dir()), 0
    for name, path in checkpoints(settings.model_dir, names).items():
        runner = ModelRunner(name, path, device=device, amp_dtype=settings.amp_dtype,
                             channels_last=plan.formats[0] == "channels_last", max_batch_size=plan.first_batch_size)
        tuning.tune(runner, plan, cache)
        max_batch = runner.max_batch_size
        key = compile_key(runner, max_batch, threads)
        for form in forms:
            if form == "attention" and not runner.has_attention:
                continue
            marker = cache.failure(key, form)
            if marker.exists() and not force:
                print(f"{name} {form}: an earlier build failed ({marker}); --force retries", flush=True)
                failed += 1
                continue
            started = time.perf_counter()
            try:
                target = build(runner, form, key, cache, force=force)
            except Exception as exc:  # noqa: BLE001 - reported, and the next form is tried
                print(f"{name} {form}: failed: {type(exc).__name__}: {exc}", flush=True)
                failed += 1
                continue
            print(f"{name} {form}: {target} ({time.perf_counter() - started:.0f} s; {runner.precision}, "
                  f"{runner.memory_format_name}, batch 1-{max_batch}, {threads} threads, {device})", flush=True)
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    forms = [f for f in args.pop("forms").split(",") if f]
    if set(forms) - set(FORMS):
        parser.error(f"--forms takes {', '.join(FORMS)}")
    names, force, nice = args.pop("models"), args.pop("force"), args.pop("nice")
    try:
        settings = Settings(**{k: v for k, v in args.items() if k in SETTING_FLAGS or k == "channels_last"})
    except ValidationError as exc:
        parser.error("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()))
    if nice:
        os.nice(nice)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return 1 if build_all(settings, names, forms, force=force) else 0


if __name__ == "__main__":
    sys.exit(main())

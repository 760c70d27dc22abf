"""Service settings: pydantic-settings, ``MACULA_*`` environment variables, read at startup (never at import).

Every field is also a ``python -m service`` flag (``--max-batch-size 8``); a flag given on the command line wins
over the environment, an absent flag leaves the environment (or the default) alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Batch defaults per device, from measurement (docs/benchmarks.md): on CPU images/s rise up to batch 4-8 and then
# flatten while latency keeps growing, so 8 is the cap; one image's forward takes tens of ms there, so waiting more
# than a few ms for company buys nothing. A GPU keeps gaining up to batch 64+ and its forward takes milliseconds,
# so it caps higher and waits a bit longer to fill a batch. The wait only ever happens while more images are
# being decoded (see batching.py).
# Those defaults hold with MACULA_TUNE=off; with auto (the default) each model's batch cap (on CPU) and memory
# format are chosen at start-up by timing it (service/tuning.py), since the best ones differ by model and CPU.
CPU_BATCH_DEFAULTS = (8, 3.0)  # (max_batch_size, max_batch_delay_ms)
CUDA_BATCH_DEFAULTS = (64, 5.0)
DEFAULT_TUNE_MAX_SPREAD = 0.25  # timings more unsteady than this are used but not kept (service/tuning.py)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MACULA_", extra="ignore", protected_namespaces=())

    model_dir: Path = Path("model_store")
    default_model: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    device: str = "auto"
    amp_dtype: Literal["bfloat16", "float16", "none"] = "bfloat16"
    channels_last: bool | None = None  # unset ("auto"): chosen by timing (tune=auto), else channels_last
    compile: Literal["auto", "on", "off"] = "auto"  # the compiled serving form (service/compiled.py, docs/api.md)
    compile_cache: Path | None = None  # default: MODEL_DIR/.compile-cache
    torch_threads: int | None = Field(None, ge=1)
    inference_process: bool = True  # run the models in a worker process of their own (service/worker.py)
    omp_spin_count: int = Field(10_000, ge=0)  # the worker's GOMP_SPINCOUNT (unless the environment sets one)
    decode_threads: int | None = Field(None, ge=1)
    max_batch_size: int | None = Field(None, ge=1)  # unset: chosen by timing up to max_batch_ceiling (CPU, tune=auto)
    max_batch_ceiling: int = Field(16, ge=1)
    tune: Literal["auto", "off"] = "auto"  # per-model batch cap and memory format by timing (service/tuning.py)
    tune_max_spread: float = Field(DEFAULT_TUNE_MAX_SPREAD, ge=0)
    max_batch_delay_ms: float | None = Field(None, ge=0)
    max_queue: int = Field(256, ge=1)
    request_timeout_s: float = Field(30.0, gt=0)
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(40_000_000, ge=1)
    max_images_per_request: int = Field(64, ge=1)
    json_max_depth: int = Field(8, ge=2)  # nesting of a JSON body, checked while parsing
    decode_memory_bytes: int = Field(384 * 1024 * 1024, ge=1)  # per request: estimated peak of its running decodes
    read_timeout_s: float = Field(20.0, gt=0)  # request line + headers, and then the whole body, must arrive in time
    max_mask_side: int = Field(1024, ge=1)  # attention_size=original: masks larger than this are scaled down
    max_mask_bytes: int = Field(32 * 1024 * 1024, ge=1)  # ... and all of a response's original masks, raw pixels
    # audit store (service/audit): MACULA_AUDIT_URL wins over MACULA_AUDIT_DB (the SQLite path) when set
    audit_db: str = "macula_audit.db"
    audit_url: SecretStr | None = None
    audit_durable: bool = False
    audit_inputs: Literal["none", "thumbnail", "original"] = "thumbnail"
    audit_max_records: int = Field(100_000, ge=1)
    audit_max_age_days: float = Field(30.0, gt=0)
    audit_max_bytes: int = Field(5 * 1024**3, ge=1)
    audit_retention_interval_s: float = Field(60.0, gt=0)
    audit_queue_size: int = Field(10_000, ge=1)
    audit_commit_timeout_s: float = Field(5.0, gt=0)
    audit_pool_size: int = Field(4, ge=1)
    api_key: SecretStr | None = None
    drain_timeout_s: float = Field(20.0, ge=0)
    log_level: str = "info"

    @field_validator("channels_last", mode="before")
    @classmethod
    def _auto_is_unset(cls, value: object) -> object:
        """``MACULA_CHANNELS_LAST=auto`` (or empty) means unset: chosen by timing."""
        return None if isinstance(value, str) and value.strip().lower() in ("", "auto") else value

    def resolved_device(self) -> str:
        """``auto`` → ``cuda`` when torch sees a GPU, else ``cpu``."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def compile_cache_dir(self) -> Path:
        return self.compile_cache or self.model_dir / ".compile-cache"

    def batch_limits(self, device: str) -> tuple[int, float]:
        """(max_batch_size, max_batch_delay_s): the configured values, else the device's measured defaults."""
        size, delay_ms = CUDA_BATCH_DEFAULTS if device.startswith("cuda") else CPU_BATCH_DEFAULTS
        size = self.max_batch_size or size
        delay_ms = delay_ms if self.max_batch_delay_ms is None else self.max_batch_delay_ms
        return size, delay_ms / 1000.0

    def decode_workers(self) -> int:
        import os

        return self.decode_threads or min(4, os.cpu_count() or 1)

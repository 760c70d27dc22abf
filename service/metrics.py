"""Prometheus metrics of the service, all prefixed ``macula_``, in a registry owned by each app.

Every label takes values from a bounded set: route templates (not raw paths), a fixed set of methods
and rejection reasons (anything else becomes ``"other"``), model names from the model dir. Duration
buckets span 1 ms (a small CNN on a GPU) to 30 s (the default request deadline) so both CPU and GPU
latencies land in informative buckets.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75,
                    1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)

# the bounded label set of macula_rejections_total; errors.py maps each error code onto one of them
REJECTION_REASONS = frozenset({"overload", "timeout", "read_timeout", "bad_input", "too_large", "unsupported_format",
                               "unauthorized", "not_found", "not_ready", "client_gone"})
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OTHER = "other"
UNMATCHED_ROUTE = "unmatched"


class Metrics:
    """The service's metrics. Metric objects are public attributes; the helpers below bound the labels.

    ``routes``: if given, the route templates the app serves; any other route label becomes ``"other"``.
    Without it, callers must pass route templates (``request.scope["route"].path``), never raw paths.
    """

    def __init__(self, registry: CollectorRegistry | None = None, *, routes: Iterable[str] | None = None) -> None:
        self.registry = CollectorRegistry() if registry is None else registry
        self.routes = None if routes is None else frozenset(routes)
        self._model_info: dict[str, tuple[str, str, str, str]] = {}
        self._define_request_metrics()
        self._define_model_metrics()
        self._define_process_metrics()

    def _define_request_metrics(self) -> None:
        r = self.registry
        self.requests_total = Counter("macula_requests", "HTTP requests answered, by route template, method and "
                                      "status", ["route", "method", "status"], registry=r)
        self.request_duration_seconds = Histogram("macula_request_duration_seconds", "Time from request received "
                                                  "to response ready", ["route"], buckets=DURATION_BUCKETS, registry=r)
        self.rejections_total = Counter("macula_rejections", "Requests refused, by reason", ["reason"], registry=r)
        self.inflight_requests = Gauge("macula_inflight_requests", "Requests being handled now", registry=r)

    def _define_model_metrics(self) -> None:
        r = self.registry
        self.queue_wait_seconds = Histogram("macula_queue_wait_seconds", "Time an image waited between enqueue and "
                                            "the start of its batch", ["model"], buckets=DURATION_BUCKETS, registry=r)
        self.batch_size = Histogram("macula_batch_size", "Images per forward pass", ["model"],
                                    buckets=BATCH_SIZE_BUCKETS, registry=r)
        self.inference_duration_seconds = Histogram("macula_inference_duration_seconds", "Time of one batch forward "
                                                    "pass, attention maps included", ["model"],
                                                    buckets=DURATION_BUCKETS, registry=r)
        self.preprocess_duration_seconds = Histogram("macula_preprocess_duration_seconds", "Time to decode and "
                                                     "preprocess one image", ["model"], buckets=DURATION_BUCKETS,
                                                     registry=r)
        self.queue_depth = Gauge("macula_queue_depth", "Images waiting in the model's batch queue", ["model"],
                                 registry=r)
        self.images_total = Counter("macula_images", "Images classified", ["model"], registry=r)
        self.top1_confidence = Histogram("macula_top1_confidence", "Top-1 softmax score of each classified image "
                                         "(watch it for drift)", ["model"], buckets=CONFIDENCE_BUCKETS, registry=r)
        self.unfamiliar_inputs_total = Counter("macula_unfamiliar_inputs", "Images the model's detector flagged "
                                               "as unlike its training data (models with a detector only)",
                                               ["model"], registry=r)
        self.model_info = Gauge("macula_model_info", "Served model (value is always 1)",
                                ["name", "version", "arch", "attention"], registry=r)
        # each model's batch cap and memory format (service/tuning.py)
        self.model_max_batch_size = Gauge("macula_model_max_batch_size", "The largest batch one forward of the model "
                                          "takes (chosen by timing, or configured)", ["model"], registry=r)
        self.model_channels_last = Gauge("macula_model_channels_last", "1 while the model runs in the channels_last "
                                         "memory format, 0 in the contiguous one", ["model"], registry=r)
        # the compiled serving form (service/compiling.py)
        self.model_compiled = Gauge("macula_model_compiled", "1 while the model's compiled forward serves, 0 while "
                                    "eager", ["model"], registry=r)
        self.compile_failures_total = Counter("macula_compile_failures", "Compiled forms that failed to build, load "
                                              "or match eager (the model serves eager)", ["model", "stage"], registry=r)
        self.compile_speedup_ratio = Gauge("macula_compile_speedup_ratio", "Eager / compiled forward time at the "
                                           "batch cap, measured once per compile cache key (MACULA_COMPILE=auto)",
                                           ["model"], registry=r)

    def _define_process_metrics(self) -> None:
        r = self.registry
        self.ready = Gauge("macula_ready", "1 once every model is loaded and warmed up and not draining", registry=r)
        self.audit_records_written_total = Counter("macula_audit_records_written", "Audit records stored", registry=r)
        self.audit_write_failures_total = Counter("macula_audit_write_failures", "Audit records dropped (queue full "
                                                  "or database error)", registry=r)
        self.worker_restarts_total = Counter("macula_inference_worker_restarts", "Times the inference worker "
                                             "process died and was started again", registry=r)
        self.gpu_memory_bytes = Gauge("macula_gpu_memory_bytes", "CUDA memory held by torch's caching allocator",
                                      ["device", "kind"], registry=r)

    # ------------------------------------------------------------------ label bounding

    def route_label(self, route: str | None) -> str:
        if route is None:
            return UNMATCHED_ROUTE
        if self.routes is not None and route not in self.routes:
            return OTHER
        return route

    @staticmethod
    def method_label(method: str) -> str:
        method = method.upper()
        return method if method in HTTP_METHODS else OTHER

    @staticmethod
    def status_label(status: int) -> str:
        return str(status) if 100 <= int(status) <= 599 else OTHER

    @staticmethod
    def reason_label(reason: str) -> str:
        return reason if reason in REJECTION_REASONS else OTHER

    # ------------------------------------------------------------------ request side

    def observe_request(self, route: str | None, method: str, status: int, seconds: float) -> None:
        route = self.route_label(route)
        self.requests_total.labels(route, self.method_label(method), self.status_label(status)).inc()
        self.request_duration_seconds.labels(route).observe(seconds)

    def reject(self, reason: str, count: int = 1) -> None:
        self.rejections_total.labels(self.reason_label(reason)).inc(count)

    @contextmanager
    def track_inflight(self) -> Iterator[None]:
        with self.inflight_requests.track_inprogress():
            yield

    # ------------------------------------------------------------------ model side

    def observe_queue_wait(self, model: str, seconds: float) -> None:
        self.queue_wait_seconds.labels(model).observe(seconds)

    def observe_batch(self, model: str, size: int, seconds: float) -> None:
        """One forward pass: its batch size and duration."""
        self.batch_size.labels(model).observe(size)
        self.inference_duration_seconds.labels(model).observe(seconds)

    def observe_preprocess(self, model: str, seconds: float) -> None:
        self.preprocess_duration_seconds.labels(model).observe(seconds)

    def set_queue_depth(self, model: str, depth: int) -> None:
        self.queue_depth.labels(model).set(depth)

    def observe_predictions(self, model: str, top1_scores: Iterable[float]) -> None:
        """Classified images: count them and record each one's top-1 score."""
        confidence = self.top1_confidence.labels(model)
        count = 0
        for score in top1_scores:
            confidence.observe(float(score))
            count += 1
        self.images_total.labels(model).inc(count)

    def observe_familiarity(self, model: str, familiar: Iterable[bool | None]) -> None:
        """Count the images flagged unfamiliar (``False``); ``None`` (no detector) counts as nothing."""
        self.unfamiliar_inputs_total.labels(model).inc(sum(flag is False for flag in familiar))

    def set_model_info(self, name: str, version: str, arch: str, attention: str | None) -> None:
        """Publish a served model; a model reloaded under the same name replaces its old series."""
        labels = (name, version, arch, attention or "none")
        old = self._model_info.get(name)
        if old is not None and old != labels:
            self.model_info.remove(*old)
        self._model_info[name] = labels
        self.model_info.labels(*labels).set(1)

    def set_model_tuning(self, name: str, max_batch_size: int, memory_format: str) -> None:
        """Publish a served model's batch cap and memory format."""
        self.model_max_batch_size.labels(name).set(max_batch_size)
        self.model_channels_last.labels(name).set(1 if memory_format == "channels_last" else 0)

    def remove_model(self, name: str) -> None:
        """Forget a model that is no longer served (its info series disappears)."""
        old = self._model_info.pop(name, None)
        if old is not None:
            self.model_info.remove(*old)
        for gauge in (self.model_max_batch_size, self.model_channels_last):
            with suppress(KeyError):
                gauge.remove(name)

    # ------------------------------------------------------------------ process side

    def set_ready(self, ready: bool) -> None:
        self.ready.set(1 if ready else 0)

    def audit_written(self, count: int = 1) -> None:
        self.audit_records_written_total.inc(count)

    def audit_failed(self, count: int = 1) -> None:
        self.audit_write_failures_total.inc(count)

    def worker_restarted(self) -> None:
        self.worker_restarts_total.inc()

    def set_gpu_memory(self, device: str, allocated: int, reserved: int) -> None:
        """CUDA memory as the inference worker process reports it after each batch."""
        self.gpu_memory_bytes.labels(device, "allocated").set(allocated)
        self.gpu_memory_bytes.labels(device, "reserved").set(reserved)

    def update_gpu_memory(self) -> None:
        """Read torch's CUDA memory counters; a no-op unless this process already uses CUDA."""
        try:
            import torch
        except ImportError:
            return
        if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
            return   # never create a CUDA context just to report that it is empty
        for index in range(torch.cuda.device_count()):
            device = f"cuda:{index}"
            self.gpu_memory_bytes.labels(device, "allocated").set(torch.cuda.memory_allocated(index))
            self.gpu_memory_bytes.labels(device, "reserved").set(torch.cuda.memory_reserved(index))

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of this registry and its content type (for GET /metrics)."""
        self.update_gpu_memory()
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

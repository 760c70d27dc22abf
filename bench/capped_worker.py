"""The inference worker (service/worker.py) with less memory than its largest batch needs, for the OOM-split check.

    (started by bench.gpu_check through ``InferenceProcess(command=...)``, never by hand)

After the worker has warmed up (every batch size, so the largest batch's peak is known), CUDA memory is capped
at the weights plus ``MACULA_BENCH_OOM_SHARE`` (default 0.6) of what the largest batch needed beyond them: a full
batch then runs out of memory, half of one fits. On a CPU (the dry run) there is no allocator to cap, so a batch
of more than that share of the largest batch raises ``torch.OutOfMemoryError`` as CUDA would.
"""

from __future__ import annotations

import os

import torch

from service import inference, worker

SHARE = float(os.environ.get("MACULA_BENCH_OOM_SHARE", "0.6"))
real_serve, real_run = worker.Worker.serve, inference.ModelRunner.run


def capped_serve(self: worker.Worker) -> None:
    if self.device.startswith("cuda"):
        device = torch.device(self.device)
        weights, peak = torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device)
        torch.cuda.empty_cache()
        cap = weights + SHARE * (peak - weights)
        torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(device).total_memory,
                                                   device)
    else:
        def run(runner, inputs, attention=False):
            limit = SHARE * runner.max_batch_size  # each model's own cap (service/tuning.py)
            if len(inputs) > limit:
                raise torch.OutOfMemoryError(f"simulated: {len(inputs)} images > {limit:g}")
            return real_run(runner, inputs, attention)

        inference.ModelRunner.run = run
    real_serve(self)


worker.Worker.serve = capped_serve

if __name__ == "__main__":
    worker.main()

"""The real inference worker (service/worker.py), except that a batch holding an image whose pixels are all 7 fails
inside it: for tests of failures the worker reports (the batcher must split such a batch as it always does)."""

from __future__ import annotations

import numpy as np

from service import inference, worker

POISON = 7  # warm-up runs all-zero images
real_run = inference.ModelRunner.run


def poisoned_run(self, inputs, attention=False):
    if any(np.all(image == POISON) for image in inputs):
        raise RuntimeError("poison detected: secret internal detail")
    return real_run(self, np.asarray(inputs), attention)


inference.ModelRunner.run = poisoned_run

if __name__ == "__main__":
    worker.main()

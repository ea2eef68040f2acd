"""A progress bar per epoch: epoch, loss, accuracy, images/s (tqdm, to stderr)."""
from __future__ import annotations

import os
import sys
import time

from tqdm.auto import tqdm


class EpochProgress:
    def __init__(self, total_batches: int, desc: str):
        disable = os.environ.get("ASIB_NO_PROGRESS") == "1" or not total_batches
        self.bar = tqdm(total=total_batches, desc=desc, leave=False, file=sys.stderr,
                        dynamic_ncols=True, disable=disable, mininterval=0.5)
        self.start = time.perf_counter()
        self.images = 0

    def update(self, n_images: int, loss: float, acc: float) -> None:
        self.images += n_images
        rate = self.images / max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc:.3f}", img_s=f"{rate:,.0f}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()

"""Early-Bird tickets (You et al. 2020, "Drawing Early-Bird Tickets"): detect, during dense
training, the epoch from which the channel mask a pruning ratio would take stops changing.

After every epoch the chief takes the BatchNorm channel mask (`bn_channel_mask`: one global
threshold over every |gamma|, the network-slimming criterion) and compares it with the previous
epoch's by normalised Hamming distance. The ticket is drawn when the largest of the distances
between the last `window` consecutive masks (window - 1 distances, as the paper's FIFO of 5 masks)
is under `threshold`.

In the dense run directory: `early_bird.json` (settings, per-epoch distances, drawn epoch,
whether training stopped there), `early_bird_masks.npz` (`epoch_0001` -> bool vector) and, once
the ticket is drawn, the checkpoint `common.paths.EARLY_BIRD_CHECKPOINT`. `EarlyBirdTracker`, an
epoch hook of the dense loop (`train.hooks`), rewrites both files atomically after every epoch,
before the run's resume state names that epoch, so a resumed run rebuilds the detector exactly
from them (`EarlyBirdTracker.resume`); with stop_at_early_bird it ends training at the ticket.

NumPy only at import time; Keras models are only walked, never built here.
"""
from __future__ import annotations

import io
import logging
import re
import zipfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from common.atomic import read_json, write_bytes, write_json
from common.paths import EARLY_BIRD_CHECKPOINT
from common.ranking import bn_scores, keep_mask
from train.checkpoints import save_checkpoint
from train.hooks import EpochHook, LoopState

log = logging.getLogger(__name__)

MASK_KEY = "epoch_{:04d}"
MAX_MASKS_BYTES = 256 << 20  # early_bird_masks.npz is read whole: bound what it may expand to


# ------------------------------------------------------------------------------------- the masks
def _walk(layer) -> Iterator[Any]:
    """Every layer in model order, nested models (MobileNetV2's backbone) expanded in place."""
    for sub in getattr(layer, "layers", ()):
        yield sub
        yield from _walk(sub)


def bn_gammas(model) -> list[tuple[str, Any]]:
    """(name, gamma variable) of every BatchNorm with a scale, in the model's fixed layer order;
    the name is the gamma's variable path without '/gamma' (the layer, as masks name weights)."""
    import keras

    out = []
    for layer in _walk(model):
        if isinstance(layer, keras.layers.BatchNormalization) and getattr(layer, "gamma", None) is not None:
            out.append((layer.gamma.path.rsplit("/", 1)[0], layer.gamma))
    return out


def bn_layers(model) -> list[tuple[str, int]]:
    """[(name, channels)] of the BatchNorm scales `bn_channel_mask` concatenates, in its order."""
    return [(name, int(np.prod(gamma.shape))) for name, gamma in bn_gammas(model)]


def bn_channel_mask(model, ratio: float) -> np.ndarray:
    """Every BN gamma of `model` concatenated in layer order; True = kept when the fraction
    `ratio` with the smallest |gamma| over the whole network is pruned (one global threshold)."""
    gammas = bn_gammas(model)
    if not gammas:
        raise ValueError(f"model {model.name!r} has no BatchNorm scales (gamma): the Early-Bird "
                         f"mask needs BatchNorm layers")
    scores = np.concatenate([bn_scores(np.asarray(g.numpy())) for _, g in gammas])
    return keep_mask(scores, ratio)


def hamming(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised Hamming distance: the fraction of positions where two masks differ."""
    a, b = np.asarray(a, dtype=bool).reshape(-1), np.asarray(b, dtype=bool).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"masks of different lengths ({a.size} vs {b.size}): not the same network")
    if a.size == 0:
        raise ValueError("empty masks have no Hamming distance")
    return float(np.count_nonzero(a != b)) / a.size


def distance_matrix(masks: Sequence[np.ndarray]) -> np.ndarray:
    """(n, n) normalised Hamming distances between every pair of masks (the paper's heat map)."""
    stacked = np.stack([np.asarray(m, dtype=bool).reshape(-1) for m in masks]) if len(masks) else \
        np.zeros((0, 0), dtype=bool)
    if stacked.shape[0] and stacked.shape[1] == 0:
        raise ValueError("empty masks have no Hamming distance")
    n = stacked.shape[0]
    out = np.zeros((n, n), dtype=np.float64)
    for i in range(n):  # n is the number of epochs: a row at a time keeps memory at n x channels
        out[i] = np.count_nonzero(stacked != stacked[i], axis=1) / max(stacked.shape[1], 1)
    return out


# ----------------------------------------------------------------------------------- the detector
class EarlyBirdDetector:
    """Feed one mask per epoch; `update` returns True once the ticket is drawn (and stays True).

    distance(epoch) = hamming(mask(epoch), mask(epoch - 1)); window_max(epoch) = the largest of the
    `window - 1` distances between the last `window` consecutive masks, defined once that many
    masks exist. Drawn at the first epoch whose window_max < threshold.
    """

    def __init__(self, ratio: float = 0.5, window: int = 5, threshold: float = 0.1):
        if not 0.0 < float(ratio) < 1.0:
            raise ValueError(f"early_bird_ratio must be in (0, 1), got {ratio!r}")
        if int(window) != window or window < 2:
            raise ValueError(f"early_bird_window must be an integer >= 2, got {window!r}")
        if not 0.0 < float(threshold) <= 1.0:
            raise ValueError(f"early_bird_threshold must be in (0, 1], got {threshold!r}")
        self.ratio, self.window, self.threshold = float(ratio), int(window), float(threshold)
        self.records: list[dict[str, Any]] = []  # {"epoch", "distance", "window_max"} per update
        self.masks: list[np.ndarray] = []
        self.drawn_epoch: int | None = None

    @property
    def drawn(self) -> bool:
        return self.drawn_epoch is not None

    def update(self, epoch: int, mask: np.ndarray) -> bool:
        mask = np.asarray(mask, dtype=bool).reshape(-1).copy()
        if self.records and epoch <= self.records[-1]["epoch"]:
            raise ValueError(f"epoch {epoch} after epoch {self.records[-1]['epoch']}: masks must "
                             f"come in epoch order")
        distance = hamming(mask, self.masks[-1]) if self.masks else None
        self.masks.append(mask)
        distances = [r["distance"] for r in self.records[1:]] + ([distance] if self.records else [])
        recent = distances[-(self.window - 1):]
        window_max = max(recent) if len(self.masks) >= self.window else None
        self.records.append({"epoch": int(epoch), "distance": distance, "window_max": window_max})
        if self.drawn_epoch is None and window_max is not None and window_max < self.threshold:
            self.drawn_epoch = int(epoch)
        return self.drawn


# ---------------------------------------------------------------------------- files of a dense run
def read_masks(path: Path) -> dict[int, np.ndarray]:
    """epoch -> mask from early_bird_masks.npz: no pickle, bounded size, epoch_NNNN keys only."""
    with zipfile.ZipFile(path) as zf:
        size = sum(info.file_size for info in zf.infolist())
    if size > MAX_MASKS_BYTES:
        raise ValueError(f"{path}: expands to {size} bytes, over the limit of {MAX_MASKS_BYTES}")
    out = {}
    with np.load(path, allow_pickle=False) as data:
        for key in data.files:
            match = re.fullmatch(r"epoch_(\d{1,9})", key)
            if not match:
                raise ValueError(f"{path}: unexpected entry {key!r} (expected epoch_NNNN)")
            out[int(match.group(1))] = np.asarray(data[key], dtype=bool).reshape(-1)
    return out


def _masks_bytes(masks: dict[int, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **{MASK_KEY.format(e): m for e, m in sorted(masks.items())})
    return buf.getvalue()


class EarlyBirdTracker(EpochHook):
    """The dense loop's hook: a detector plus its two files in a dense run directory."""

    def __init__(self, run, model, *, ratio: float, window: int, threshold: float,
                 stop_at_early_bird: bool, epochs: int, chief: bool = True):
        # Every multiworker process runs a tracker (they must agree on stopping: collectives),
        # and all compute the same masks from the same mirrored weights; only the chief writes.
        self.run, self.model, self.chief = run, model, chief
        self.detector = EarlyBirdDetector(ratio, window, threshold)
        self.layers = bn_layers(model)
        if not self.layers:
            raise ValueError(f"early_bird: model {model.name!r} has no BatchNorm layers")
        self.stop_at_early_bird, self.epochs = bool(stop_at_early_bird), int(epochs)
        self.stopped_early = False

    @property
    def drawn(self) -> bool:
        return self.detector.drawn

    @property
    def stop(self) -> bool:
        """Whether training ends here: the ticket is drawn and stop_at_early_bird is on."""
        return self.detector.drawn and self.stop_at_early_bird

    def resume(self, epochs_done: int) -> None:
        """Replay the masks of epochs 1..epochs_done from the files (later ones belong to an epoch
        that was interrupted before the run's resume state named it, and is retrained)."""
        if epochs_done == 0:
            return
        if not self.run.early_bird.is_file():
            raise FileNotFoundError(f"{self.run.early_bird}: missing, but the run has completed "
                                    f"{epochs_done} epoch(s) with early_bird on")
        record = read_json(self.run.early_bird)
        settings = {k: record.get(k) for k in ("ratio", "window", "threshold")}
        ours = {"ratio": self.detector.ratio, "window": self.detector.window,
                "threshold": self.detector.threshold}
        if settings != ours or [list(x) for x in record.get("bn_layers", [])] != \
                [list(x) for x in self.layers]:
            raise ValueError(f"{self.run.early_bird}: written with other detector settings or "
                             f"another model ({settings}); refusing to mix two runs")
        masks = read_masks(self.run.early_bird_masks) if self.run.early_bird_masks.is_file() else {}
        missing = [e for e in range(1, epochs_done + 1) if e not in masks]
        if missing:
            raise ValueError(f"{self.run.early_bird_masks}: no mask for epoch(s) {missing} of the "
                             f"{epochs_done} the run has completed")
        for epoch in range(1, epochs_done + 1):
            self.detector.update(epoch, masks[epoch])
        self.stopped_early = self.stop and epochs_done < self.epochs
        log.info("early bird: resumed the detector after epoch %d (drawn at %s)", epochs_done,
                 self.detector.drawn_epoch)

    def on_train_begin(self, state: LoopState) -> bool:
        self.resume(state.epochs_done)
        return self.stop

    def on_epoch_end(self, epoch: int, row: dict[str, float], state: LoopState) -> bool:
        if not self.after_epoch(epoch):
            return False
        log.info("stopping after epoch %d of %d: the Early-Bird ticket is drawn "
                 "(stop_at_early_bird)", epoch, self.epochs)
        return True

    def after_epoch(self, epoch: int) -> bool:
        """Mask of this epoch -> detector -> files (+ the Early-Bird checkpoint when drawn now).
        Returns True when training should stop here."""
        was_drawn = self.detector.drawn
        self.detector.update(epoch, bn_channel_mask(self.model, self.detector.ratio))
        record = self.detector.records[-1]
        log.info("early bird: epoch %d mask distance %s, window max %s", epoch,
                 _fmt(record["distance"]), _fmt(record["window_max"]))
        if self.detector.drawn and not was_drawn:
            log.info("early bird: ticket drawn at epoch %d", epoch)
            if self.chief:  # the checkpoint first: the json names it only once the file exists
                save_checkpoint(self.model, self.run, EARLY_BIRD_CHECKPOINT)
        self.stopped_early = self.stop and epoch < self.epochs
        if self.chief:
            self.write()
        return self.stop

    def write(self) -> None:
        write_bytes(self.run.early_bird_masks,
                    _masks_bytes(dict(zip((r["epoch"] for r in self.detector.records),
                                          self.detector.masks))))
        write_json(self.run.early_bird, self.record())

    def record(self) -> dict[str, Any]:
        d = self.detector
        return {
            "ratio": d.ratio, "window": d.window, "threshold": d.threshold,
            "bn_layers": [[name, channels] for name, channels in self.layers],
            "channels": sum(c for _, c in self.layers),
            "epochs": list(d.records),
            "drawn_epoch": d.drawn_epoch,
            "checkpoint": EARLY_BIRD_CHECKPOINT if d.drawn else None,
            "stop_at_early_bird": self.stop_at_early_bird,
            "stopped_early": self.stopped_early,
            "epochs_planned": self.epochs,
        }


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"

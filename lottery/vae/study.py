"""The VAE neuron-pruning study: train a Dense VAE on the digits, prune, compact, fine-tune, compare.

For every criterion (l1, l2, fpgm) and ratio, the lowest-scoring fraction of the neurons of every
hidden Dense layer of encoder and decoder is removed (never the latent mean / log-variance units or
the output pixels): a physically smaller VAE is built with the surviving kernel columns, biases and
the matching rows of each consuming kernel, evaluated, fine-tuned and evaluated again.

Output directory `<out>/vae-<hash>/` (the hash covers the settings that change results plus the
dataset manifest's sha256, not where the data or output live):

    settings.json        the resolved settings and the dataset they ran on
    trained.weights.h5   the trained VAE (weights only), written before trained.json
    trained.json         training time and history, parameters, validation losses before pruning
    rows/<row-id>.json   one finished (criterion, ratio) row, atomic; its presence means done
    results.json         every row plus the trained summary (atomic, written when all rows exist)
    results.csv

A re-run trains nothing that has a file: a finished study does nothing, an interrupted one redoes
only the missing rows, on the saved trained weights.
"""
from __future__ import annotations

import csv
import io
import logging
import zlib
from typing import Literal, Optional

import numpy as np
import pydantic

from common.atomic import atomic_path, read_json, write_json, write_text
from common.paths import VaeStudyPaths
from common.settings import identity_hash, settings_dataclass, settings_to_dict
from lottery.prune.criteria import WEIGHT_CRITERIA, filter_scores, keep_mask

log = logging.getLogger(__name__)

VAE_CRITERIA = WEIGHT_CRITERIA  # the neuron's incoming weights rank it, as a filter's do
# Where the data and outputs live (and the memory guard) do not change a study's results: the
# identity hashes these values in their place.
NON_IDENTITY_FIELDS = {"data": ".", "out": ".", "max_records": 1}
# ITU-R 601 luma, as tf.image.rgb_to_grayscale: the dataset stores every image as RGB JPEG.
_LUMA = np.array([0.2989, 0.5870, 0.1140], dtype=np.float32)
_EVAL_BATCH = 1024


def _split(value):
    """'0.2,0.5' from a config file -> ['0.2', '0.5']; lists pass through."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


@settings_dataclass
class VaeStudySettings:
    data: str = pydantic.Field(description="dataset directory written by `bigticket etl` (e.g. "
                                           "digits)")
    out: str = pydantic.Field(default="runs", description="root of the study directory "
                                                          "out/vae-<hash>")
    hidden: tuple[int, ...] = pydantic.Field(
        default=(256, 128), description="encoder hidden widths, input side first")
    decoder_hidden: Optional[tuple[int, ...]] = pydantic.Field(
        default=None, description="decoder hidden widths (default: the encoder's, mirrored)")
    latent_dim: int = pydantic.Field(default=8, ge=1, le=4096, description="latent units")
    activation: Literal["relu", "elu", "tanh", "gelu", "swish"] = pydantic.Field(
        default="relu", description="hidden activation")
    epochs: int = pydantic.Field(default=30, ge=1, le=100_000,
                                 description="training epochs of the VAE")
    finetune_epochs: int = pydantic.Field(default=5, ge=0, le=100_000,
                                          description="fine-tuning epochs of each pruned VAE")
    batch_size: int = pydantic.Field(default=64, ge=1, le=1 << 20, description="batch size")
    lr: float = pydantic.Field(default=1e-3, gt=0, le=10, description="Adam learning rate")
    finetune_lr: Optional[float] = pydantic.Field(
        default=None, gt=0, le=10, description="fine-tuning learning rate (default: --lr)")
    criteria: tuple[Literal[VAE_CRITERIA], ...] = pydantic.Field(
        default=VAE_CRITERIA, description="neuron criteria")
    ratios: tuple[float, ...] = pydantic.Field(
        default=(0.2, 0.5, 0.8), description="fractions of each hidden layer's neurons to remove")
    seed: int = pydantic.Field(default=0, ge=0, le=2**31 - 1,
                               description="seed of initialisation, shuffling and noise")
    image_size: Optional[int] = pydantic.Field(
        default=None, ge=1, le=512, description="side images are resized to (default: the "
                                                "dataset's)")
    format: Optional[Literal["tfrecord", "parquet"]] = pydantic.Field(
        default=None, description="shard format to read (default: the dataset's)")
    # The study holds its pixels in memory: refuse splits larger than this rather than swap.
    max_records: int = pydantic.Field(
        default=200_000, ge=1, description="refuse larger splits (pixels are held in memory)")

    @pydantic.field_validator("hidden", "decoder_hidden", "criteria", "ratios", mode="before")
    @classmethod
    def _split_lists(cls, value):
        return _split(value)

    @pydantic.field_validator("data")
    @classmethod
    def _data_given(cls, value):
        if not value.strip():
            raise ValueError("give the dataset directory")
        return value

    @pydantic.field_validator("hidden", "decoder_hidden")
    @classmethod
    def _widths(cls, value):
        if value is None:
            return value
        if not value:
            raise ValueError("give at least one hidden layer width (nothing to prune otherwise)")
        for width in value:
            if not 1 <= width <= 1 << 16:
                raise ValueError(f"width {width} must lie in 1..65536")
        return value

    @pydantic.field_validator("criteria")
    @classmethod
    def _unique_criteria(cls, value):
        if not value:
            raise ValueError("give at least one criterion")
        if len(set(value)) != len(value):
            raise ValueError(f"duplicate criteria in {list(value)}")
        return value

    @pydantic.field_validator("ratios")
    @classmethod
    def _fractions(cls, value):
        if not value:
            raise ValueError("give at least one ratio")
        for v in value:
            if not 0.0 <= v < 1.0:
                raise ValueError(f"{v} must lie in [0, 1)")
        # Row ids carry the ratio's 4-digit tag: two ratios with one tag would share a row file.
        tags = [_ratio_tag(v) for v in value]
        if len(set(tags)) != len(tags):
            raise ValueError(f"values must differ in the first 4 decimals: {list(value)} give the "
                             f"row tags {tags}")
        return value

    @property
    def resolved_decoder_hidden(self) -> tuple[int, ...]:
        return self.decoder_hidden if self.decoder_hidden is not None else tuple(reversed(self.hidden))

    @property
    def resolved_finetune_lr(self) -> float:
        return self.finetune_lr if self.finetune_lr is not None else self.lr

    @property
    def row_ids(self) -> list[tuple[str, float, str]]:
        """(criterion, ratio, row id) in table order."""
        return [(c, r, row_id(c, r)) for c in self.criteria for r in self.ratios]


def _ratio_tag(ratio: float) -> str:
    """0.5 -> '5000': the ratio in ten-thousandths, as row ids carry it."""
    return f"{round(ratio * 10000):04d}"


def row_id(criterion: str, ratio: float) -> str:
    return f"{criterion}-r{_ratio_tag(ratio)}"




def study_hash(settings: VaeStudySettings, manifest_sha256: str) -> str:
    """Identity of a study: its settings but NON_IDENTITY_FIELDS, and the dataset's content."""
    return identity_hash(settings, neutral=NON_IDENTITY_FIELDS,
                         extra={"manifest_sha256": manifest_sha256})


# ------------------------------------------------------------------------------------------ data
def load_pixels(info, split: str, *, image_size: int | None = None, fmt: str | None = None,
                max_records: int = 200_000) -> np.ndarray:
    """A split of a dataset (train.data.DatasetInfo) as grayscale pixels in [0, 1]: (N, side*side)."""
    from train.data import make_dataset

    if split not in info.records:
        raise ValueError(f"{info.root}: dataset has no split {split!r} (has {sorted(info.records)})")
    if info.records[split] > max_records:
        raise ValueError(f"max_records: split {split!r} of {info.root} has {info.records[split]} "
                         f"records, more than max_records={max_records} (the study holds its "
                         f"pixels in memory)")
    side = image_size or info.image_size
    if side is None:
        raise ValueError(f"image_size: the images of {info.root} vary in size; give image_size")
    ds = make_dataset(info, split, batch_size=_EVAL_BATCH, training=False, input_size=side,
                      fmt=fmt, cache=False, augment="none")
    chunks = [np.clip(images @ _LUMA / 255.0, 0.0, 1.0).reshape(len(images), -1)
              for images, _ in ds.as_numpy_iterator()]
    if not chunks:
        raise ValueError(f"{info.root}: split {split!r} holds no records")
    return np.concatenate(chunks).astype(np.float32)


# --------------------------------------------------------------------------- pruning, compaction
def neuron_keeps(vae, criterion: str, ratio: float) -> dict[str, np.ndarray]:
    """Hidden layer name -> bool mask of the neurons kept when `ratio` of them are pruned."""
    from lottery.vae.model import hidden_layers

    if criterion not in VAE_CRITERIA:
        raise ValueError(f"criterion must be one of {VAE_CRITERIA}, got {criterion!r}")
    keeps = {}
    for layer in hidden_layers(vae.encoder) + hidden_layers(vae.decoder):
        keeps[layer.name] = keep_mask(filter_scores(np.asarray(layer.kernel), criterion), ratio)
    return keeps


def compact_vae(vae, keeps: dict[str, np.ndarray]):
    """A new, smaller VAE holding the surviving neurons' weights of `vae` (left unchanged).

    `keeps` maps hidden layer names to bool masks over their units; hidden layers not named keep
    every unit. The latent and pixel layers keep their width: only their input rows shrink.
    """
    from lottery.vae.model import build_vae, hidden_layers

    layers = {"encoder": hidden_layers(vae.encoder), "decoder": hidden_layers(vae.decoder)}
    names = {layer.name: layer for half in layers.values() for layer in half}
    unknown = set(keeps) - set(names)
    if unknown:
        raise ValueError(f"keeps: {sorted(unknown)} are not hidden layers of the VAE "
                         f"(prunable: {sorted(names)})")
    masks = {}
    for name, layer in names.items():
        keep = np.asarray(keeps.get(name, np.ones(layer.units, bool)), dtype=bool).reshape(-1)
        if keep.size != layer.units or not keep.any():
            raise ValueError(f"keeps[{name!r}]: need {layer.units} flags with at least one True, "
                             f"got {keep.size} with {int(keep.sum())} True")
        masks[name] = keep
    activation = layers["encoder"][0].get_config()["activation"]
    small = build_vae(vae.encoder.input.shape[-1],
                      [int(masks[layer.name].sum()) for layer in layers["encoder"]],
                      [int(masks[layer.name].sum()) for layer in layers["decoder"]],
                      vae.encoder.output[0].shape[-1],
                      activation=activation,
                      seed=vae.seed)
    for half in ("encoder", "decoder"):
        _copy_half(getattr(vae, half), getattr(small, half), masks)
    return small


def _copy_half(old, new, masks: dict[str, np.ndarray]) -> None:
    """Copy the Dense weights of a linear stack, dropping pruned columns and the rows they fed."""
    import keras

    fed_by = None  # mask of the units feeding the current layer (None: all)
    for layer in old.layers:
        if not isinstance(layer, keras.layers.Dense):
            continue
        kernel, bias = layer.get_weights()
        if fed_by is not None:
            kernel = kernel[fed_by]
        keep = masks.get(layer.name)
        if keep is not None:
            kernel, bias = kernel[:, keep], bias[keep]
            fed_by = keep
        # Heads (z_mean and z_log_var) both read the last hidden layer: fed_by stays for both.
        new.get_layer(layer.name).set_weights([kernel, bias])


# ----------------------------------------------------------------------------------------- study
CSV_COLUMNS = (
    "criterion", "ratio", "params_before", "params_after", "hidden_before", "hidden_after",
    "reconstruction_before", "kl_before", "total_before",
    "reconstruction_pruned", "kl_pruned", "total_pruned",
    "reconstruction_finetuned", "kl_finetuned", "total_finetuned",
    "train_seconds", "finetune_seconds",
    "eval_seconds_before", "eval_seconds_pruned", "eval_seconds_finetuned",
)


def _widths_label(vae) -> str:
    enc, dec = vae.hidden_widths
    return "-".join(map(str, enc)) + "|" + "-".join(map(str, dec))


def _losses(prefix: str, result: dict) -> dict:
    return {f"{k}_{prefix}": result[k] for k in ("reconstruction", "kl", "total")}


def _row_seed(seed: int, rid: str) -> int:
    """Fixed per row, so a row redone after an interruption fine-tunes as it first would have."""
    return (seed * 1_000_003 + zlib.crc32(rid.encode())) & 0x7FFFFFFF


def _trained_vae(settings: VaeStudySettings, paths: VaeStudyPaths, x_train, x_val):
    """The trained VAE and its summary: loaded when saved, else trained, evaluated and saved."""
    import keras

    from lottery.vae.model import build_vae, evaluate_vae, train_vae

    keras.utils.set_random_seed(settings.seed)
    vae = build_vae(x_train.shape[1], settings.hidden, settings.resolved_decoder_hidden,
                    settings.latent_dim, activation=settings.activation, seed=settings.seed)
    if paths.trained.exists() and paths.trained_weights.exists():
        vae.load_weights(paths.trained_weights)
        log.info("loaded the trained VAE from %s", paths.trained_weights)
        return vae, read_json(paths.trained)
    log.info("training the VAE (%s, %d params) for %d epochs on %d images",
             _widths_label(vae), vae.count_params(), settings.epochs, len(x_train))
    fit = train_vae(vae, x_train, epochs=settings.epochs, batch_size=settings.batch_size,
                    lr=settings.lr, what="train")
    before = evaluate_vae(vae, x_val, seed=settings.seed)
    with atomic_path(paths.trained_weights, suffix=".weights.h5") as tmp:
        vae.save_weights(tmp)
    trained = {"train_seconds": fit["seconds"], "history": fit["history"],
               "params": vae.count_params(), "hidden": _widths_label(vae), "before": before}
    write_json(paths.trained, trained)  # last: its presence means the weights are complete
    return vae, trained


def _study_row(settings, vae, trained, criterion, ratio, rid, x_train, x_val) -> dict:
    import keras

    from lottery.vae.model import evaluate_vae, train_vae

    small = compact_vae(vae, neuron_keeps(vae, criterion, ratio))
    pruned = evaluate_vae(small, x_val, seed=settings.seed)
    keras.utils.set_random_seed(_row_seed(settings.seed, rid))
    fit = train_vae(small, x_train, epochs=settings.finetune_epochs, batch_size=settings.batch_size,
                    lr=settings.resolved_finetune_lr, what=f"fine-tune {rid}")
    finetuned = evaluate_vae(small, x_val, seed=settings.seed)
    before = trained["before"]
    return {"row_id": rid, "criterion": criterion, "ratio": ratio,
            "params_before": trained["params"], "params_after": small.count_params(),
            "hidden_before": trained["hidden"], "hidden_after": _widths_label(small),
            **_losses("before", before), **_losses("pruned", pruned),
            **_losses("finetuned", finetuned),
            "train_seconds": trained["train_seconds"], "finetune_seconds": fit["seconds"],
            "eval_seconds_before": before["seconds"], "eval_seconds_pruned": pruned["seconds"],
            "eval_seconds_finetuned": finetuned["seconds"], "finetune_history": fit["history"]}


def csv_text(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def format_table(rows: list[dict]) -> str:
    """The study as a fixed-width text table (losses: reconstruction + KL = total)."""
    header = (f"{'criterion':<9} {'ratio':>5} {'params':>15} | {'before':^23} | {'pruned':^23} | "
              f"{'fine-tuned':^23} | {'ft s':>6}")
    sub = f"{'':<9} {'':>5} {'':>15} | " + " | ".join([f"{'recon':>7} {'kl':>7} {'total':>7}"] * 3) + " |"
    lines = [header, sub, "-" * len(header)]
    for r in rows:
        cells = [f"{r[f'reconstruction_{s}']:7.3f} {r[f'kl_{s}']:7.3f} {r[f'total_{s}']:7.3f}"
                 for s in ("before", "pruned", "finetuned")]
        lines.append(f"{r['criterion']:<9} {r['ratio']:>5.2f} "
                     f"{str(r['params_before']) + '>' + str(r['params_after']):>15} | "
                     + " | ".join(cells) + f" | {r['finetune_seconds']:6.1f}")
    return "\n".join(lines)


def study_paths(settings: VaeStudySettings, info=None) -> VaeStudyPaths:
    from train.data import open_dataset

    info = info or open_dataset(settings.data)
    return VaeStudyPaths.under(settings.out, study_hash(settings, info.manifest_sha256))


def run_study(settings: VaeStudySettings) -> VaeStudyPaths:
    """Run (or finish) the study; returns its paths. A finished study is left untouched."""
    from tqdm.auto import tqdm

    from train.data import describe, open_dataset

    info = open_dataset(settings.data)
    paths = study_paths(settings, info)
    todo = [(c, r, rid) for c, r, rid in settings.row_ids if not paths.row(rid).exists()]
    if not todo and paths.results_json.exists():
        log.info("study %s is complete: nothing to do", paths.root)
        return paths
    if not paths.settings.exists():
        write_json(paths.settings, {"settings": settings_to_dict(settings),
                                    "dataset": describe(info)})
    if todo:
        side = settings.image_size or info.image_size
        x_train = load_pixels(info, "train", image_size=side, fmt=settings.format,
                              max_records=settings.max_records)
        x_val = load_pixels(info, "validation", image_size=side, fmt=settings.format,
                            max_records=settings.max_records)
        log.info("pixels: %d train, %d validation images of %d pixels", len(x_train), len(x_val),
                 x_train.shape[1])
        vae, trained = _trained_vae(settings, paths, x_train, x_val)
        for criterion, ratio, rid in tqdm(todo, desc="vae study", unit="row"):
            row = _study_row(settings, vae, trained, criterion, ratio, rid, x_train, x_val)
            write_json(paths.row(rid), row)
            log.info("%s: params %d -> %d, total loss %.3f -> pruned %.3f -> fine-tuned %.3f",
                     rid, row["params_before"], row["params_after"], row["total_before"],
                     row["total_pruned"], row["total_finetuned"])
    rows = [read_json(paths.row(rid)) for _, _, rid in settings.row_ids]
    write_text(paths.results_csv, csv_text(rows))
    trained = read_json(paths.trained)
    write_json(paths.results_json, {
        "study": paths.root.name, "settings": settings_to_dict(settings), "dataset": describe(info),
        "trained": trained, "rows": rows})
    log.info("study %s: %d rows, results in %s", paths.root.name, len(rows), paths.results_json)
    return paths

"""The metrics every engine and every grid point records: top-1 and top-5 accuracy (and loss).

Names (histories, point results, tables): `accuracy` and `top5_accuracy` for training,
`val_accuracy` / `val_top5_accuracy` for validation. Top-5 is recorded only for datasets of more
than 5 classes: with 5 or fewer every label is among the top 5, so it would always read 1.0;
there it is absent from histories and results and the report shows "n/a".
Top-5 leads the report for datasets of at least HEADLINE_TOP5_CLASSES classes (ImageNet's
convention of quoting top-1 and top-5, top-5 first where 1000 classes make top-1 harsh).

Keras' own `SparseTopKCategoricalAccuracy` (not a custom function), so a saved model.keras
reloads with its compiled metrics under safe_mode; an instance is made per compile (a metric
holds state) and cloudpickles (the elephas engine ships compile arguments to its workers).
"""
from __future__ import annotations

TOP5 = "top5_accuracy"
TOP5_K = 5
HEADLINE_TOP5_CLASSES = 100


def has_top5(num_classes: int | None) -> bool:
    """Whether top-5 means anything for `num_classes` classes (None: unknown -> no)."""
    return num_classes is not None and int(num_classes) > TOP5_K


def headline_is_top5(num_classes: int | None) -> bool:
    return num_classes is not None and int(num_classes) >= HEADLINE_TOP5_CLASSES


def compile_metrics(num_classes: int | None) -> list:
    """["accuracy"] plus a fresh top-5 metric where it means something."""
    metrics: list = ["accuracy"]
    if has_top5(num_classes):
        import keras

        metrics.append(keras.metrics.SparseTopKCategoricalAccuracy(k=TOP5_K, name=TOP5))
    return metrics


def top5_correct(probs, labels):
    """How many rows of `probs` have their label among the TOP5_K largest (a float tensor);
    for the engines' own loops (multiworker), which cannot use compiled metrics."""
    import tensorflow as tf

    hits = tf.math.in_top_k(tf.reshape(tf.cast(labels, tf.int32), [-1]),
                            tf.cast(probs, tf.float32), TOP5_K)
    return tf.reduce_sum(tf.cast(hits, tf.float32))

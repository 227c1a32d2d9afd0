"""Dense training stage: tf.data readers, model registry, engines (local tf.distribute, Elephas on
Spark), rewind checkpoints and the driver loop that writes a dense run directory.

Modules: settings (DenseSettings), data (open_dataset, make_dataset), models (MODELS, build_model),
checkpoints (rewind points, atomic weight files, load_checkpoint), local_engine (local and
multiworker), run (train_dense: the driver loop), cli (`bigticket train dense`).
"""

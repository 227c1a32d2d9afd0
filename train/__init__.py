"""Dense training stage: tf.data readers, model registry, engines (local tf.distribute, Elephas on
Spark), rewind checkpoints and the driver loop that writes a dense run directory.

Modules:
  settings, cli        DenseSettings; `bigticket train dense`
  run                  train_dense: preparation checks and the epoch loop
  hooks                what the loop does per epoch besides training (rewind checkpoints,
                       TensorBoard, early stopping); early_bird is one more hook
  run_files            settings.json, history.csv, resume/, model.keras
  checkpoints          rewind points, atomic weight files, load_checkpoint
  engines              the engine interface, make_engine and the elephas engine's driver side
  local_engine         local and multiworker (tf.distribute)
  elephas_engine       Spark data-parallel rounds (driver); spark_worker: their executor side
  state_reduce         the rounds' record-weighted average, reduced on the executors in a tree
  driver_memory        the driver-memory check before round 0; a round's driver measurements
  faults               test-only: kill a Python worker mid-round (BIGTICKET_TEST_TRAIN_FAULT)
  data, models         open_dataset, make_dataset; MODELS, build_model
  schedules            the learning rate over training time
  keras_internals      the only code touching private Keras/TensorFlow parts
"""

"""ETL stage: image sources -> decoded, resized RGB JPEG -> sharded TFRecord/Parquet + manifest.

Nothing in this package imports TensorFlow: Spark executors that only resize images must not pay
for it.
"""

"""Deployment: post-training quantisation of a trained model to LiteRT, measured (`bigticket quantize`).

`litert` converts a Keras model to each LiteRT variant (float32, float16, dynamic-range int8,
full-integer int8, optionally with sparse storage) with builtin ops only; `measure` runs a
flatbuffer through the LiteRT interpreter (accuracy on the validation shards, one-thread images/s);
`targets` says which model a dense run, a grid point or a grid stands for; `quantize` writes
`<target>/quantized/` (common.paths.QuantizedPaths), resumably; `cli` is the command.
"""

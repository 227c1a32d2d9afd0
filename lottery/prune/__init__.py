"""What to prune: masks, weight statistics, channel criteria, the channel graph, channel masks,
compaction, and keras_graph, the one module that touches Keras internals.

The lowest layer of `lottery`: it imports nothing from the other lottery subpackages.
"""

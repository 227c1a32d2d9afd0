"""What to prune: masks, weight statistics, channel criteria, the channel graph, compaction.

The lowest layer of `lottery`: it imports nothing from the other lottery subpackages.
"""

"""One grid point: the task, the dense run's recipe, masked training and the runners by kind.

Imports `lottery.prune` only (never `grid` or `report`).
"""

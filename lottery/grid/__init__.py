"""A grid of points: its settings, the plan (task ids, masks), claims and the scheduler.

Imports `lottery.points` and `lottery.prune`; never `report`.
"""

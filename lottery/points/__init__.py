"""One grid point: the task, the shared recipe, masked training and the runners by kind.

    task.py              Task: one schedulable unit, validated once when read
    runners.py           RUNNERS by task kind; train_point, what the scheduler calls for a task
    oneshot.py imp.py structured.py   the runners: one mask / an IMP chain / a compacted network
    recipe.py            retrain (the core of every point) and the dense run's recipe
    masked_training.py   training with pruned weights held at zero; stops on a StopToken
    epoch_checkpoint.py  the last complete epoch of a point, for resuming after a stop
    inference.py         CPU inference speed, in Keras or exported to LiteRT

Imports `lottery.prune`, `train` and `common` only (never `grid` or `report`).
"""

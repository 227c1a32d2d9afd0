"""The lottery stage: weight statistics, masks, masked retraining, IMP, the grid and its reports."""

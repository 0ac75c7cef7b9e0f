"""What the entry points share: the run spec settled from Hydra, measuring (sweep points, timed
runs, statistics), the results folder (results.json, summary.md, plots, trace) and the oracle."""

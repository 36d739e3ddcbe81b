"""Pure PatchCore engine: data, backbones, patch features, coreset, scoring, metrics, bank files.

Nothing in this package imports Ray or W&B, reads YAML or environment variables: the cluster
layer and the jobs call these functions, so the engine runs (and is tested) the same with or
without a cluster.
"""

__version__ = "0.1.0"

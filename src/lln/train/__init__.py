"""Training harness: trainer, checkpoints, data-parallel, results grid."""

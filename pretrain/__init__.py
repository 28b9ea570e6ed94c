"""bertforge pretraining: config, model, data loading, DeepSpeed engine, checkpoints, metrics."""
__version__ = "0.1.0"

"""Fine-tuning on downstream tasks and their metrics (``python -m pretrain finetune``)."""

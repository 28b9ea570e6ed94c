"""Distil a teacher into a smaller student (DistilBERT's recipe) on the pretraining shards.

  python -m pretrain distill --config configs/distilbert.yaml distill.teacher=runs/bert-base/checkpoints

The teacher (distill.teacher) is one of our checkpoints or a transformers directory of the BERT family; the
student is derived from it (distill.student, distill.layer_map) and initialised from its layers; the
training is `pretrain train`'s (launchers, checkpoints, resume, exit status 0 / 75 / 1 / 2: see there), the
loss DistilBERT's (distill.temperature, distill.alpha_*; docs/model.md, "Distillation").  The checkpoints
are the student's: `pretrain export` writes DistilBertForMaskedLM (or the teacher's family's
...ForMaskedLM with distill.student=teacher), `pretrain finetune` starts from them.
"""
from pretrain.commands import train

HELP = "distil a teacher (our checkpoint or an HF directory) into a smaller student"


def add_arguments(parser) -> None:
    train.add_arguments(parser)


def run(args) -> int:
    from pretrain.distill import prepare
    return train.run(args, prepare=prepare)

"""Import a HuggingFace transformers directory into our consolidated-weights format.

Accepts BertForPreTraining, BertForMaskedLM, MegatronBertForPreTraining, MegatronBertForMaskedLM,
AlbertForPreTraining and AlbertForMaskedLM directories.  Writes OUT/model.pt + OUT/config.yaml
(model section derived from config.json) + OUT/extra.json, and copies the tokenizer files to
OUT/tokenizer; continue pretraining from it with checkpoint.init_from=OUT.
"""
from __future__ import annotations

import sys

HELP = "import a HuggingFace BERT/ALBERT directory as a checkpoint to continue pretraining from"


def add_arguments(parser) -> None:
    parser.add_argument("--hf", required=True, metavar="HFDIR",
                        help="transformers model directory (config.json + weights)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output checkpoint directory (created if needed)")


def run(args) -> int:
    from pretrain.config import ConfigError
    from pretrain.hf import import_hf
    from pretrain.weights import CheckpointError
    try:
        config = import_hf(args.hf, args.out)
    except (FileNotFoundError, ValueError, ConfigError, CheckpointError) as err:   # CheckpointError: a failed write
        print(f"import: error: {err}", file=sys.stderr)
        return 1
    m = config.model
    print(f"wrote {args.out}: {m.arch} L{m.num_layers} H{m.hidden_size} V{m.vocab_size}, "
          f"sentence_head={m.sentence_head}; use checkpoint.init_from={args.out}")
    return 0

"""Export a checkpoint's consolidated weights to a HuggingFace transformers directory.

The directory loads with transformers' BertForPreTraining / BertForMaskedLM / AlbertForPreTraining /
AlbertForMaskedLM (MegatronBert* for pre-LN BERT), per the model config, and with AutoTokenizer
when a tokenizer is known: --tokenizer, else the one recorded in the checkpoint.
"""
from __future__ import annotations

import sys

HELP = "export a checkpoint to a HuggingFace transformers directory (weights + tokenizer)"


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="checkpoint directory (model.pt + config.yaml), or a checkpoint root with a "
                             "'latest' file")
    parser.add_argument("--out", required=True, metavar="HFDIR", help="output directory (created if needed)")
    parser.add_argument("--tokenizer", default=None, metavar="TOKDIR",
                        help="tokenizer directory (tokenizer.json and/or vocab.txt); default: the checkpoint's")


def run(args) -> int:
    from pretrain.config import ConfigError
    from pretrain.hf import export_checkpoint
    try:
        summary = export_checkpoint(args.checkpoint, args.out, args.tokenizer)
    except (FileNotFoundError, ValueError, ConfigError) as err:
        print(f"export: error: {err}", file=sys.stderr)
        return 1
    tokenizer = summary["tokenizer"] or "none (weights only)"
    print(f"wrote {summary['out_dir']}: {summary['architecture']}, tokenizer from {tokenizer}")
    return 0

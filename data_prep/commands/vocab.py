"""Train a BERT WordPiece or RoBERTa byte-level BPE vocabulary (HF tokenizers), or import an existing
vocab.txt / tokenizer.json.

The output directory holds tokenizer.json, vocab.txt, tokenizer_config.json,
special_tokens_map.json (transformers' BertTokenizerFast, or RobertaTokenizerFast for BPE, loads it)
and vocab_info.json (hash, size, model, special ids).  Training is deterministic; a rerun with the
same inputs and settings is skipped.  Examples:

  python -m data_prep vocab --input corpus/ --vocab-size 30522 --out vocab/
  python -m data_prep vocab --input corpus/ --model bpe --vocab-size 50265 --out vocab/
  python -m data_prep vocab --from bert-base-uncased/vocab.txt --out vocab/
"""
from __future__ import annotations

from data_prep.commands._common import add_config_flags, config_from_args, reports_errors
from data_prep.errors import PrepError

HELP = "train a WordPiece or byte-level BPE vocabulary (or import one) into a tokenizer directory"


def add_arguments(parser):
    parser.add_argument("--out", required=True, help="tokenizer directory to write")
    add_config_flags(parser, ("input", "clean", "on_error", "vocab"))


@reports_errors
def run(args) -> int:
    from data_prep.pipeline import prepare_vocab

    cfg = config_from_args(args)
    if not cfg.vocab.tokenizer and not cfg.input.paths:
        raise PrepError("give --input FILES... to train a vocabulary, or --from PATH to import one")
    prepare_vocab(cfg, args.out)
    return 0

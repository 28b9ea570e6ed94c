"""Train a BERT WordPiece vocabulary (HF tokenizers), or import an existing vocab.txt / tokenizer.json.

The output directory holds tokenizer.json, vocab.txt, tokenizer_config.json,
special_tokens_map.json (transformers' BertTokenizerFast loads it) and vocab_info.json (hash,
size, special ids).  Training is deterministic; a rerun with the same inputs and settings is
skipped.  Examples:

  python -m data_prep vocab --input corpus/ --vocab-size 30522 --out vocab/
  python -m data_prep vocab --from bert-base-uncased/vocab.txt --out vocab/
"""
from __future__ import annotations

from data_prep.commands._common import add_config_flags, build_config, given_flags, reports_errors
from data_prep.errors import PrepError

HELP = "train a WordPiece vocabulary (or import vocab.txt / tokenizer.json) into a tokenizer directory"


def add_arguments(parser):
    parser.add_argument("--out", required=True, help="tokenizer directory to write")
    parser.add_argument("--from", dest="source", help="import this tokenizer dir, tokenizer.json or vocab.txt")
    parser.add_argument("--vocab-size", type=int, help="vocabulary size to train (default 30522)")
    case = parser.add_mutually_exclusive_group()
    case.add_argument("--cased", dest="lowercase", action="store_const", const=False, default=None,
                      help="keep case (default: uncased)")
    case.add_argument("--uncased", dest="lowercase", action="store_const", const=True, help="lowercase text")
    parser.add_argument("--min-frequency", type=int, help="least count of a merged piece (default 2)")
    parser.add_argument("--max-text-mb", type=float, help="train on at most this many MB of cleaned text")
    add_config_flags(parser, ("input.", "clean.", "on_error"))


@reports_errors
def run(args) -> int:
    from data_prep.pipeline import prepare_vocab

    flat = given_flags(args)
    for key, value in (("vocab.tokenizer", args.source), ("vocab.vocab_size", args.vocab_size),
                       ("vocab.lowercase", args.lowercase), ("vocab.min_frequency", args.min_frequency),
                       ("vocab.max_text_mb", args.max_text_mb)):
        if value is not None:
            flat[key] = value
    if not args.source and not flat.get("input.paths"):
        raise PrepError("give --input FILES... to train a vocabulary, or --from PATH to import one")
    prepare_vocab(build_config(flat), args.out)
    return 0

"""Held-out evaluation of a checkpoint: MLM accuracy and perplexity, NSP/SOP accuracy.

  python -m pretrain eval --checkpoint RUN/checkpoints [--data SHARD_DIR] [--out metrics.json]

--checkpoint is a checkpoint directory or a run's checkpoint root (its `latest` is followed).
--data defaults to the data.dir recorded in the checkpoint's config.  The metrics are printed
and written as JSON (default: eval_metrics.json in the checkpoint directory).
"""
HELP = "evaluate a checkpoint on a held-out split"


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint dir, or a root holding `latest`")
    parser.add_argument("--data", default=None, help="shard directory (default: the checkpoint's data.dir)")
    parser.add_argument("--split", default="val", choices=["val", "train"], help="which split to evaluate")
    parser.add_argument("--max-batches", type=int, default=0, help="stop after N batches (0: the whole split)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the config's eval batch size")
    parser.add_argument("--out", default=None, help="JSON file for the metrics")


def run(args) -> int:
    import json
    import os
    import sys

    import torch

    from pretrain.data import DataError, build_eval_loader, open_split
    from pretrain.evaluate import evaluate
    from pretrain.weights import atomic_write_text, load_model, resolve_checkpoint_dir

    try:
        ckpt_dir = resolve_checkpoint_dir(args.checkpoint)
        model, cfg, extra = load_model(ckpt_dir)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.data:
        cfg.data.dir = args.data
    cfg.data.tokenizer = None          # the shards' own tokenizer hash is checked against the model's vocab size
    if args.batch_size:
        cfg.eval.micro_batch_size = args.batch_size
    cfg.eval.max_batches = args.max_batches
    try:
        split = open_split(cfg.data, args.split, cfg.training, cfg.model.vocab_size)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if extra and extra.get("fingerprints", {}).get("tokenizer") not in (None, split.tokenizer_hash):
        print(f"error: {cfg.data.dir} was tokenized with {split.tokenizer_hash} but the checkpoint was trained "
              f"with {extra['fingerprints']['tokenizer']}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    loader = build_eval_loader(split, cfg.data, cfg.training, cfg.eval, rank=0, world_size=1)
    metrics = evaluate(model, loader, device, max_batches=args.max_batches)
    out = args.out or os.path.join(ckpt_dir, "eval_metrics.json")
    atomic_write_text(out, json.dumps(metrics, indent=2))
    for key, value in metrics.items():
        print(f"{key:24s} {value:.4f}")
    print(f"written to {out}")
    return 0

"""Steady-state training throughput of our model beside the HuggingFace peer, in one run.

  python -m pretrain bench                          # GPU: base+large at 128 and 512, largest batch
  python -m pretrain bench --preset cpu             # CPU: the mini model, micro batch 32, vs HF
  python -m pretrain bench --models mini --seq-lens 128 --micro-batch 32 \\
      --variants default,adamw,packing,dense,compile --rounds 3 --steps 8

Each case times full training steps (forward, backward, optimizer step, zero_grad) after
warm-up: median and IQR of the step times (CUDA events on GPU, perf_counter on CPU), seq/s,
tokens/s, TFLOP/s and MFU (anchors' formula, MLM head at masked positions only), peak memory.
Variants of ours (joined with '+'): default (torch kernels, LAMB), ops (pretrain.ops kernels),
adamw, packing (several instances per row), unpad (kernels.unpad), dense (MLM head at every
token), compile (torch.compile), cudagraphs (compile mode reduce-overhead), deepspeed (through
the training engine).  The peer is HF BertForPreTraining (SDPA, dense MLM head, fused AdamW).
Results: --json (all numbers), --markdown (a table in the "Training throughput" section),
--png (seq/s against micro batch).  See docs/benchmarks.md and docs/performance.md.
"""
HELP = "training throughput: ours vs the HF BertForPreTraining peer (seq/s, TFLOP/s, MFU, memory)"

PRESETS = {
    # The GPU table (targets: docs/performance.md): bf16, the largest micro batch that fits, ratios vs the peer.
    "gpu": dict(models="base,large", seq_lens="128,512", variants="default,ops,packing,dense,ops+packing+compile",
                warmup=5, steps=30, rounds=1),
    # Every switch, one at a time and combined (long: split it with --models / --seq-lens).
    "gpu-full": dict(models="base,large", seq_lens="128,512",
                     variants="default,adamw,ops,packing,unpad,dense,compile,cudagraphs,deepspeed,"
                              "ops+packing+compile,ops+packing+cudagraphs", warmup=5, steps=30, rounds=1),
    # The CPU comparison of docs/benchmarks.md: L4 H256 A4 I1024 V8192, seq 128, micro batch 32, fp32.
    # Many short interleaved rounds: on a shared CPU the load drifts within minutes.
    "cpu": dict(models="mini", seq_lens="128", micro_batch=32, variants="default,packing,unpad,dense,compile",
                warmup=2, steps=1, rounds=12, round_warmup=0, sweep="8,16"),
}


def add_arguments(parser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="a named set of the options below (explicit options override it); "
                             "default: gpu with CUDA, cpu without")
    parser.add_argument("--models", default=None, help="comma list of tiny, mini, base, large")
    parser.add_argument("--seq-lens", default=None, help="comma list of sequence lengths, e.g. 128,512")
    parser.add_argument("--micro-batch", type=int, default=None,
                        help="micro batch of every case (default: the largest that fits on CUDA; 32 on CPU)")
    parser.add_argument("--batch-limit", type=int, default=None, help="upper bound of the micro-batch search")
    parser.add_argument("--variants", default=None,
                        help="comma list of our variants: default or '+'-joined ops, adamw, packing, unpad, "
                             "dense, compile, cudagraphs, deepspeed")
    parser.add_argument("--no-peer", action="store_true", help="skip the HF peer")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default=None,
                        help="bf16 autocast or fp32 (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps before timing")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per case and round")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved rounds over the cases; step times pooled (use > 1 on a shared CPU)")
    parser.add_argument("--round-warmup", type=int, default=None,
                        help="untimed steps at the start of each round after the first (default 1)")
    parser.add_argument("--sweep", default=None,
                        help="micro batches for the throughput-vs-batch plot ('none' to skip; default: "
                             "powers of two up to the measured batch)")
    parser.add_argument("--sweep-steps", type=int, default=None, help="timed steps per sweep point")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="peak TFLOP/s for MFU (default: looked up by GPU name; none on CPU)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic batches and the weights")
    parser.add_argument("--lengths-from", default=None, metavar="SHARD_DIR",
                        help="draw instance lengths from a data_prep shard directory (default: BERT's "
                             "length rule for long documents, ~92%% of the slots filled)")
    parser.add_argument("--json", default=None, help="write every number here (e.g. docs/benchmarks_train.json)")
    parser.add_argument("--markdown", default=None,
                        help="update the Training throughput table in this file (e.g. docs/benchmarks.md)")
    parser.add_argument("--png", default=None, help="plot seq/s against micro batch here")
    parser.add_argument("--from-json", nargs="+", default=None, metavar="JSON",
                        help="measure nothing: merge these runs' JSON files into --json/--markdown/--png "
                             "(e.g. one run per model and sequence length on a time-limited GPU lease)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def _options(args) -> dict:
    import torch
    preset = args.preset or ("gpu" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
    merged = dict(PRESETS[preset])
    for key in ("models", "seq_lens", "micro_batch", "variants", "warmup", "steps", "rounds", "round_warmup",
                "sweep"):
        value = getattr(args, key)
        if value is not None:
            merged[key] = value
    merged["preset"] = preset
    return merged


def build_spec(args):
    from pretrain.bench.run import Spec
    from pretrain.bench.systems import MODELS, parse_variant

    o = _options(args)
    models = [m.strip() for m in str(o["models"]).split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ValueError(f"--models: unknown {', '.join(unknown)} (expected {', '.join(MODELS)})")
    seq_lens = [int(s) for s in str(o["seq_lens"]).split(",") if s.strip()]
    if any(s < 8 or s > 512 for s in seq_lens):
        raise ValueError(f"--seq-lens: each must be in [8, 512], got {seq_lens}")
    variants = [parse_variant(v) for v in str(o["variants"]).split(",") if v.strip()]
    sweep = o.get("sweep")
    if sweep is not None:
        sweep = [] if str(sweep) == "none" else [int(b) for b in str(sweep).split(",") if b.strip()]
    return Spec(models=models, seq_lens=seq_lens, variants=variants, micro_batch=o.get("micro_batch"),
                peer=not args.no_peer, precision=args.precision, warmup=int(o["warmup"]), steps=int(o["steps"]),
                rounds=int(o["rounds"]), round_warmup=int(o.get("round_warmup", 1)), sweep=sweep,
                sweep_steps=args.sweep_steps,
                batch_limit=args.batch_limit or 1024, device=args.device, peak_tflops=args.peak_tflops,
                threads=args.threads, seed=args.seed, lengths_from=args.lengths_from, log=not args.quiet)


def run(args) -> int:
    import json
    import os
    import sys

    if args.from_json:
        from pretrain.bench import report
        try:
            runs = []
            for path in args.from_json:
                with open(path, encoding="utf-8") as f:
                    runs.append(json.load(f))
            data = report.merge(runs)
        except (OSError, ValueError, KeyError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return _write(args, data, report)
    try:
        spec = build_spec(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    import torch
    if any(v.deepspeed for v in spec.variants):
        from pretrain.distributed import detect, resolve_master_addr
        dist_env = resolve_master_addr(detect())
        if dist_env.world_size != 1:
            print("error: the benchmark runs on one process (world size 1)", file=sys.stderr)
            return 2
        dist_env.export()
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    if spec.micro_batch is None and not (torch.cuda.is_available() and spec.device != "cpu"):
        spec.micro_batch = 32

    from pretrain.bench import report
    from pretrain.bench.run import Runner

    data = Runner(spec).run()
    code = _write(args, data, report)
    failed = [r for r in data["results"] if r["status"] != "ok"]
    return 1 if failed and len(failed) == len(data["results"]) else code


def _write(args, data: dict, report) -> int:
    body = report.markdown(data)
    print(body)
    for r in data["ratios"]:
        print(f"ours[{r['variant']}] / HF peer, {r['model']}/{r['seq_len']}: {r['seq_per_s_ratio']:.2f}x seq/s "
              f"(micro batch {r['ours_micro_batch']} vs {r['peer_micro_batch']})")
    if args.json:
        report.write_json(data, args.json)
    if args.markdown:
        report.update_markdown(args.markdown, body, data["meta"]["device_type"])
    if args.png:
        report.plot(data, args.png)
    return 0

"""Training-throughput benchmark: our model + optimizer beside the HuggingFace peer.

    batches.py   synthetic-but-realistic pretraining batches (NSP-like lengths, 15% masking),
                 rendered for our sparse head, for HF's dense labels, or packed with segment_ids
    systems.py   one training step of each system (ours / the HF peer), variants as switches
    timing.py    steady-state timing (device events on CUDA, perf_counter on CPU), statistics,
                 largest-micro-batch search
    run.py       the cases of one run, interleaved rounds, ratios, the sweep
    report.py    JSON, the Markdown table in docs/benchmarks.md, the PNG

The CLI is ``python -m pretrain bench`` (pretrain/commands/bench.py); docs/benchmarks.md and
docs/performance.md describe the method and the results.
"""

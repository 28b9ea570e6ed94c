"""The main job, end to end on the small corpus shipped in data_prep/assets/:

  1. data_prep run   WordPiece vocabulary + NSP instances + WebDataset shards (configs/data/demo.yaml)
  2. pretrain train  a tiny BERT (configs/debug.yaml), held-out evaluation during training
  3. pretrain eval   held-out MLM / NSP accuracy of the final checkpoint
  4. pretrain export a HuggingFace directory, loaded back with transformers for a fill-mask check
  5. pretrain finetune  the final checkpoint on a tiny labelled task cut from the same corpus
     (configs/finetune/demo.yaml; pretrain.finetune.demo_task: does a passage name Emma?)
  6. a summary, with the TensorBoard command

Each step runs the same public command a user would type, in a subprocess.
"""
HELP = "prep the bundled corpus, pretrain a tiny BERT, evaluate, export, fine-tune: the quickstart"


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="demo_out", help="working directory for every output")
    parser.add_argument("--data-config", default="data/demo", help="data_prep YAML, a file or a shipped config's "
                                                                    "name (default: data/demo)")
    parser.add_argument("--train-config", default="debug", help="training YAML (default: debug)")
    parser.add_argument("--finetune-config", default="finetune/demo", help="fine-tuning YAML (default: finetune/demo)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="training overrides")


def run(args) -> int:
    import os
    import subprocess
    import sys
    import time

    from data_prep.settings import config_path
    data_config, train_config, finetune_config = (
        os.path.abspath(config_path(c)) for c in (args.data_config, args.train_config, args.finetune_config))
    corpus = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                          "data_prep", "assets", "demo_corpus_en.txt.gz")   # data_prep's package data
    out = os.path.abspath(args.out)
    data_dir, run_dir, hf_dir = os.path.join(out, "data"), os.path.join(out, "run"), os.path.join(out, "hf")
    task_dir, finetune_dir = os.path.join(out, "finetune_task"), os.path.join(out, "finetune")
    py = sys.executable
    began = time.time()

    def step(title: str, cmd: list) -> None:
        print(f"\n=== {title}\n$ {' '.join(cmd)}", flush=True)
        code = subprocess.call(cmd)
        if code != 0:
            raise SystemExit(f"demo: `{' '.join(cmd)}` failed with exit status {code}")

    # The shipped data config names its corpus relative to a checkout; the demo hands it the installed copy.
    given_input = [] if args.data_config != "data/demo" else ["--input", corpus]
    step("1/5 data_prep: vocabulary, instances, shards",
         [py, "-m", "data_prep", "run", "--config", data_config, "--out", data_dir, *given_input])
    step("2/5 pretrain: tiny BERT on the shards",
         [py, "-m", "pretrain", "train", "--config", train_config, f"data.dir={data_dir}/shards",
          f"data.tokenizer={data_dir}/tokenizer", f"logging.run_dir={run_dir}", *args.overrides])
    ckpt_root = os.path.join(run_dir, "checkpoints")
    eval_json = os.path.join(out, "eval_metrics.json")
    step("3/5 evaluate the final checkpoint on the held-out split",
         [py, "-m", "pretrain", "eval", "--checkpoint", ckpt_root, "--out", eval_json])
    step("4/5 export to HuggingFace format",
         [py, "-m", "pretrain", "export", "--checkpoint", ckpt_root, "--out", hf_dir])
    fill_mask = _fill_mask_check(hf_dir)
    from pretrain.finetune.demo_task import read_words, write_mention_task
    train, dev = write_mention_task(read_words(corpus), task_dir)
    step("5/5 fine-tune the final checkpoint on a tiny task cut from the corpus (does a passage name Emma?)",
         [py, "-m", "pretrain", "finetune", "--config", finetune_config, "--checkpoint", ckpt_root,
          "--train", train, "--dev", dev, "--out", finetune_dir, "logging.progress_bar=false"])
    _summary(run_dir, eval_json, hf_dir, fill_mask, finetune_dir, time.time() - began)
    return 0


PROMPTS = ("it is a truth universally acknowledged that a single man must be in want of a {mask} .",
           "she was the youngest of the two daughters of a most affectionate , indulgent {mask} .")


def _fill_mask_check(hf_dir: str) -> str:
    """Load the export with transformers alone and fill a masked word in two prompts (proves the export),
    saying plainly whether the answers depend on the prompt."""
    try:
        import torch
        from transformers import AutoTokenizer, BertForPreTraining
    except ImportError:
        return "transformers not installed: skipped the HF load check"
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = BertForPreTraining.from_pretrained(hf_dir).eval()
    tops = []
    for prompt in PROMPTS:
        enc = tok(prompt.format(mask=tok.mask_token), return_tensors="pt")
        with torch.no_grad():
            logits = model(**enc).prediction_logits
        where = (enc["input_ids"][0] == tok.mask_token_id).nonzero()[0, 0]
        tops.append([tok.convert_ids_to_tokens(int(i)) for i in logits[0, where].topk(5).indices])
    shown = "; ".join(f"'{p.format(mask=tok.mask_token)}' -> {top}" for p, top in zip(PROMPTS, tops))
    shared = len(set(tops[0]) & set(tops[1]))
    verdict = (f"{shared} of the five words are the same for both prompts: a pretraining this short has learnt "
               "which words are frequent, not yet what a context asks for" if shared >= 4 else
               f"the prompts share {shared} of their five words")
    return f"transformers.BertForPreTraining fills {shown}\n                       ({verdict})"


def _summary(run_dir: str, eval_json: str, hf_dir: str, fill_mask: str, finetune_dir: str, seconds: float) -> None:
    import json
    import os

    from pretrain.metrics import read_jsonl

    records = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    evals = [r for r in records if r["kind"] == "eval" and "eval/mlm_accuracy" in r]
    trains = [r for r in records if r["kind"] == "train"]
    final = json.load(open(eval_json))
    print("\n=== summary")
    if evals:
        first = evals[0]
        print(f"held-out MLM accuracy  step {first['step']}: {first['eval/mlm_accuracy']:.3f}  ->  "
              f"final: {final.get('eval/mlm_accuracy', float('nan')):.3f}")
        if "eval/sentence_accuracy" in first:
            print(f"held-out NSP accuracy  step {first['step']}: {first['eval/sentence_accuracy']:.3f}  ->  "
                  f"final: {final.get('eval/sentence_accuracy', float('nan')):.3f}")
        print(f"held-out perplexity    step {first['step']}: {first['eval/perplexity']:.1f}  ->  "
              f"final: {final.get('eval/perplexity', float('nan')):.1f}")
    if trains:
        print(f"training throughput    {trains[-1].get('perf/seq_per_s', float('nan')):.1f} seq/s (last window)")
    print(f"curves                 {os.path.join(run_dir, 'curves.png')}")
    print(f"HuggingFace export     {hf_dir}")
    print(f"                       {fill_mask}")
    tuned = json.load(open(os.path.join(finetune_dir, "metrics.json")))
    print(f"fine-tuned dev accuracy {tuned['mean']['accuracy']:.3f} on the demo task (chance 0.5; "
          f"{os.path.join(finetune_dir, 'metrics.json')}, HF export in "
          f"{os.path.join(finetune_dir, 'seed-' + next(iter(tuned['seeds'])), 'hf')})")
    print(f"TensorBoard            tensorboard --logdir {os.path.join(run_dir, 'tensorboard')}")
    print(f"total time             {seconds:.0f} s")

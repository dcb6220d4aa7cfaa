"""Time one training step of the OFFICIAL Quiet-STaR code (ezelikman/quiet-star) on a tiny Mistral.

What it times: the official ``MistralForCausalLM.forward`` with labels (the training entry
point of the released code, its loop of n_ahead + n_ahead_talk - 1 passes with the dense
mask it grows each pass) followed by ``loss.backward()``, then the gradients are dropped.
One timing = one step. Printed: the median of ``--repeats`` timings after ``--warmup``
untimed steps, per sequence length, as JSON on stdout: wall time (``median_s``) and the
process's CPU time (``cpu_median_s``; with one thread it equals the wall time on an idle
machine, and other processes on a shared machine inflate it far less).

Settings are the official defaults (quiet-star-train.py): n_ahead 12 (t = 11 in qstar_mini's
notation: start + 9 sampled + end), n_ahead_talk 4 (n_true), n_passes 2 (n_thoughts); the
model switches of scripts/official_oracle.py (the ones quiet-star-train.py sets); eager
attention (the official file patches the eager Mistral attention). Sampling is the official
code's own ``F.gumbel_softmax``: nothing is patched, this is a timing, not a fixture.

The model is random, of the shape of ``qstar_mini.studies.bench.TINY`` (hidden 128, 4 layers, 4 heads,
2 KV heads, MLP 384, vocabulary 85 whose last two ids are the meta tokens); the batch is the
one ``qstar_mini.studies.bench.random_batch`` draws (ids 4 .. vocab - 3, seed 0). ``qstar-mini bench
--official-venv DIR`` runs this script and puts the numbers beside qstar_mini's step.

The official code needs its own venv (transformers 4.37 with its files copied in):

    git clone https://github.com/ezelikman/quiet-star /work/official-checkout
    bash scripts/official_env.sh /work/official-venv /work/official-checkout
    /work/official-venv/bin/python scripts/official_bench.py --seqs 64,128 --batch 4

It does not import qstar_mini (that needs a newer transformers than the official code).
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

ENV_HINT = ("build it with: bash scripts/official_env.sh VENV /path/to/quiet-star "
            "(git clone https://github.com/ezelikman/quiet-star), then run VENV/bin/python "
            "scripts/official_bench.py")
META_TOKENS = ["<|startthought|>", "<|endthought|>"]     # the names the official code looks up
INIT_TEXT = "---"                                         # official initial_start/end_token


def fail(reason):
    print(f"error: {reason}; this script needs the official Quiet-STaR modeling_mistral.py "
          f"installed over transformers 4.37; {ENV_HINT}", file=sys.stderr)
    sys.exit(2)


def import_official():
    """torch, transformers and the official Mistral modules, or exit 2 with one line."""
    try:
        import torch
        import transformers
    except ImportError as e:
        fail(f"cannot import torch/transformers ({e})")
    if not transformers.__version__.startswith("4.37."):
        fail(f"found transformers {transformers.__version__}, not 4.37")
    try:
        from transformers.models.mistral import configuration_mistral, modeling_mistral
    except Exception as e:   # the official file imports wandb, seaborn, reportlab at module level
        fail(f"the Mistral model files do not import ({type(e).__name__}: {(str(e).splitlines() or [''])[0]})")
    if not hasattr(modeling_mistral.MistralForCausalLM, "infer"):
        fail("transformers/models/mistral/ holds the stock files, not the official ones")
    return torch, transformers, configuration_mistral, modeling_mistral


def build_tokenizer(transformers, vocab_size):
    """Word-level tokenizer: <pad>, <unk>, "---", filler tokens, then the two meta tokens as
    the last two ids (as in qstar_mini's bench model). The official forward reads the meta ids,
    the pad id and the encoding of "---" from it."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<unk>", INIT_TEXT] + [f"w{i}" for i in range(vocab_size - 5)]
    wl = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    wl.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=wl, pad_token="<pad>", unk_token="<unk>")
    tok.add_special_tokens({"additional_special_tokens": list(META_TOKENS)})   # as quiet-star-train.py
    assert len(tok) == vocab_size
    assert tok.convert_tokens_to_ids(META_TOKENS) == [vocab_size - 2, vocab_size - 1]
    return tok


def build_model(torch, official_cfg, official, tokenizer, dims, n_ahead, n_ahead_talk, n_passes):
    """The official MistralForCausalLM configured like quiet-star-train.py (and the oracle)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from official_oracle import OFFICIAL_CONFIG_SWITCHES   # the switches quiet-star-train.py sets

    torch.manual_seed(0)
    config = official_cfg.MistralConfig(
        vocab_size=len(tokenizer), sliding_window=None, attention_dropout=0.0,
        attn_implementation="eager", pad_token_id=tokenizer.pad_token_id,
        max_thoughts=n_ahead + n_ahead_talk + 1, **OFFICIAL_CONFIG_SWITCHES, **dims)
    model = official.MistralForCausalLM(config)
    assert type(model.model.layers[0].self_attn) is official.MistralAttention   # eager
    model.tokenizer = tokenizer
    # the attributes quiet-star-train.py sets; wandb and the step limit off
    for name, value in dict(gumbel_detach=True, include_policy_loss=True, use_start_thought_token=True,
                            use_end_thought_token=True, n_ahead=n_ahead, n_ahead_talk=n_ahead_talk,
                            n_passes=n_passes, gumbel_temperature=1, original_mode=False,
                            wandb_enabled=False, kill_after=None, residual_think_head=False,
                            optimize_lm_head_only_at_start=False, n_tokens_print=1,
                            gradient_accumulation_steps=1).items():
        setattr(model, name, value)
    model.train()
    return model


def random_batch(torch, batch, seq, vocab):
    """The batch qstar_mini.studies.bench.random_batch draws: ids in [4, vocab - 2), seed 0, no padding."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab - 2, (batch, seq), generator=g)
    return ids, torch.ones_like(ids)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqs", default="64,128", help="sequence lengths l, comma-separated")
    ap.add_argument("--batch", type=int, default=4, help="b, sequences per step (before the n_passes copies)")
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per length (the median is reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    ap.add_argument("--n-ahead", type=int, default=12, help="official n_ahead = t + 1")
    ap.add_argument("--n-ahead-talk", type=int, default=4, help="official n_ahead_talk = n_true")
    ap.add_argument("--n-passes", type=int, default=2, help="official n_passes = n_thoughts")
    ap.add_argument("--dims", default=None,
                    help='model shape as JSON, e.g. \'{"vocab_size": 85, "hidden_size": 128, ...}\' '
                         "(default: qstar_mini.studies.bench's tiny model)")
    args = ap.parse_args()
    dims = dict(vocab_size=85, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=384, max_position_embeddings=512,
                tie_word_embeddings=True)
    if args.dims:
        dims.update(json.loads(args.dims))
    try:
        seqs = [int(s) for s in args.seqs.split(",") if s.strip()]
    except ValueError:
        ap.error(f"--seqs {args.seqs!r} must be comma-separated integers, e.g. 64,128")
    if not seqs or min(seqs) <= args.n_ahead_talk or args.batch < 1 or args.repeats < 1 or args.n_ahead < 4:
        ap.error("need --seqs above n_ahead_talk, --batch >= 1, --repeats >= 1 and --n-ahead >= 4 "
                 "(start + at least one sampled token + end)")

    torch, transformers, official_cfg, official = import_official()
    torch.set_num_threads(args.threads)
    vocab = dims.pop("vocab_size")
    tokenizer = build_tokenizer(transformers, vocab)
    rows = []
    for seq in seqs:
        model = build_model(torch, official_cfg, official, tokenizer, dims, args.n_ahead, args.n_ahead_talk,
                            args.n_passes)
        ids, mask = random_batch(torch, args.batch, seq, vocab)

        def step():
            out = model(input_ids=ids, attention_mask=mask, labels=ids.clone())
            out.loss.backward()
            model.zero_grad(set_to_none=True)

        for _ in range(args.warmup):
            step()
        times, cpu_times = [], []
        for _ in range(args.repeats):
            start, cpu_start = time.perf_counter(), time.process_time()
            step()
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
        rows.append(dict(seq=seq, batch=args.batch, median_s=statistics.median(times), times_s=times,
                         cpu_median_s=statistics.median(cpu_times), cpu_times_s=cpu_times))
    print(json.dumps({
        "what": "official Quiet-STaR training step (MistralForCausalLM.forward with labels + backward)",
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "settings": dict(n_ahead=args.n_ahead, n_ahead_talk=args.n_ahead_talk, n_passes=args.n_passes,
                         t=args.n_ahead - 1, n_true=args.n_ahead_talk, n_thoughts=args.n_passes,
                         attention="eager", dtype="float32", warmup=args.warmup, repeats=args.repeats,
                         dims=dict(dims, vocab_size=vocab)),
        "rows": rows}))


if __name__ == "__main__":
    main()

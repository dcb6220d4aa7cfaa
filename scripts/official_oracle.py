"""Golden fixture from the OFFICIAL Quiet-STaR code (ezelikman/quiet-star, commit 892446b).

This script runs one training forward + backward of the released Quiet-STaR implementation
(its patched ``MistralForCausalLM.forward`` for transformers 4.37) on a tiny, fully seeded
Mistral model, and stores what that step computed -- sampled thoughts, their log-probs,
mixing weights, per-token losses, rewards, the loss and every gradient -- as a fixture
that this project's own implementation can be compared against without ever importing the
official code.

Nothing from the official repository is copied here; the script only runs it. The official
code is a replacement for two files inside transformers 4.37, so it needs its own venv:

    bash scripts/official_env.sh /tmp/qs-venv /path/to/quiet-star
    /tmp/qs-venv/bin/python scripts/official_oracle.py --out tests/fixtures/official_step \
        --run-out tests/fixtures/official_run

(the checkout comes from ``git clone https://github.com/ezelikman/quiet-star``). It does not
import qstar_mini: that package needs a newer transformers than the official code can run on.

What is made deterministic, and how
-----------------------------------
* All weights come from fixed seeds (torch.manual_seed(0) for the model itself, separate
  generators for the meta-token rows, the mixing head, the batch and the noise).
* The only randomness in the official step is ``F.gumbel_softmax(..., hard=True)`` when it
  samples a thought token. Hard Gumbel-softmax returns the one-hot of argmax(logits + g) with
  g standard Gumbel noise (the temperature cannot move the argmax), so it is replaced, for the
  duration of the forward, by a function that does exactly that with noise drawn beforehand
  from a seeded generator and stored in the fixture.
* The mixing head's last layer would be zeroed on the first forward (``rm_initialized``); the
  script marks it initialised and gives every head layer seeded non-zero weights instead, so
  the fixture exercises a real mixing weight, real rewards and a real policy loss.
* Single-threaded CPU float64, so two runs give byte-identical files.

``--run-out`` writes a second fixture: the official model trained for three optimiser steps
by the Hugging Face Trainer with quiet-star-train.py's TrainingArguments and model_init (see
``run_training_arguments`` and ``run_model_init``), the weights after every step
(``tests/test_official_run.py`` reads it).

How the values are read (no recomputation)
------------------------------------------
* a ``sys.settrace`` hook snapshots the local variables of the official forward when it
  returns: its per-step unreduced cross-entropies (``loss_list``), the policy reward before
  and after the n_passes centring, the clamped reward, the per-thought-token log-likelihood
  list and the policy loss (``dqn_loss``) are read from there;
* a wrapper around ``torch.nn.functional.log_softmax`` records the full log-softmax tensors
  the official code takes at the REINFORCE temperature (its list drops the last position);
* a forward hook on the mixing head records its output at every step;
* the talk loss is the value the official code itself logs (``log_dict["loss_talk"]``).
"""

import argparse
import inspect
import json
import os
import platform
import sys

OFFICIAL_COMMIT = "892446b"
OFFICIAL_REPO = "https://github.com/ezelikman/quiet-star"
ENV_HINT = (
    f"make it with: bash scripts/official_env.sh /tmp/qs-venv /path/to/quiet-star "
    f"(git clone {OFFICIAL_REPO}), then run /tmp/qs-venv/bin/python scripts/official_oracle.py"
)

# ---- the tiny setup -------------------------------------------------------------------
# Text vocabulary, index = token id. "--" is one token (one BPE merge), so the official
# initialisation text "---" encodes as ["--", "-"]: the official code initialises the meta
# tokens from the FIRST token of that encoding, which here differs from "-" on purpose.
TEXT_VOCAB = ["<pad>", "<unk>"] + [str(d) for d in range(10)] + [
    "+", "=", "(", ")", "-", "--", " ", "a", "b", "c"]
MERGES = [("-", "-")]
META_TOKENS = ["<|startthought|>", "<|endthought|>"]
PAD_ID, START_ID, END_ID = 0, 22, 23
INIT_TEXT = "---"

DIMS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rope_theta=10000.0,
            rms_norm_eps=1e-6)
BATCH, SEQ, ROW1_REAL = 2, 20, 14          # row 1 is right-padded after 14 real tokens
N_AHEAD_TALK, N_PASSES = 4, 2
N_AHEAD_VALUES = (6, 12)
# One more step with a single thought per position (official n_passes = 1): the official code
# then skips the mean baseline and rewards the improvement over the base prediction.
ONE_PASS_N_AHEAD = 12

MODEL_SEED = 0             # torch.manual_seed before building (and resizing) the model
BATCH_SEED = 1
META_ROW_SEED = 2          # embedding / lm_head rows of the two meta tokens
META_ROW_STD = 0.02        # the model's initializer_range
HEAD_SEED = 3
HEAD_STD = 0.1             # every weight and bias of the mixing head
NOISE_SEED_BASE = 1000     # the Gumbel noise of run n_ahead=N uses seed NOISE_SEED_BASE + N
ONE_PASS_NOISE_SEED = 2000 + ONE_PASS_N_AHEAD   # ... and of the n_passes = 1 run this one

# Config switches, as quiet-star-train.py sets them for the 7B run.
OFFICIAL_CONFIG_SWITCHES = dict(
    merged_talk_heads=True, merged_lm_and_talk_heads=False, merged_lm_and_think_heads=True,
    use_concat_talk_head=True, use_shallow_think=True, use_shallow_talk=False,
    use_complex_think_head=False, use_complex_talk_head=True, use_weighted_talk_head=True)


def fail_env(reason):
    print(f"error: {reason}; this script needs transformers 4.37.x with the official "
          f"Quiet-STaR modeling_mistral.py installed; {ENV_HINT}", file=sys.stderr)
    sys.exit(2)


def import_official():
    """Import torch, transformers and the official model files, or exit 2 with one line."""
    try:
        import torch
        import transformers
    except ImportError as e:
        fail_env(f"cannot import torch/transformers ({e})")
    if not transformers.__version__.startswith("4.37."):
        fail_env(f"found transformers {transformers.__version__}")
    try:
        from transformers.models.mistral import configuration_mistral, modeling_mistral
    except Exception as e:  # the official file imports wandb, seaborn, reportlab, ...
        first_line = (str(e).splitlines() or [""])[0]
        fail_env(f"the Mistral model files do not import ({type(e).__name__}: {first_line})")
    cfg_params = inspect.signature(configuration_mistral.MistralConfig.__init__).parameters
    if not (hasattr(modeling_mistral.MistralForCausalLM, "infer")
            and "max_thoughts" in cfg_params and "use_weighted_talk_head" in cfg_params):
        fail_env("transformers/models/mistral/ holds the stock files, not the official ones")
    return torch, transformers, configuration_mistral, modeling_mistral


torch, transformers, official_cfg, official = import_official()
import torch.nn.functional as F  # noqa: E402  (after the environment check on purpose)
from safetensors.torch import save_file  # noqa: E402
from tokenizers import Tokenizer, models  # noqa: E402


# ---- building blocks ------------------------------------------------------------------
def build_tokenizer():
    """BPE over the 22 text tokens (no normaliser, no pre-tokeniser) + the two meta tokens."""
    bpe = models.BPE(vocab={tok: i for i, tok in enumerate(TEXT_VOCAB)},
                     merges=list(MERGES), unk_token="<unk>")
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(bpe), pad_token="<pad>", unk_token="<unk>")
    # as quiet-star-train.py does it
    tok.add_special_tokens({"additional_special_tokens": list(META_TOKENS)})
    tok.pad_token_id = PAD_ID
    assert len(tok) == len(TEXT_VOCAB) + 2
    assert tok.convert_tokens_to_ids(META_TOKENS) == [START_ID, END_ID]
    assert tok.encode(INIT_TEXT, add_special_tokens=False) == [17, 16], \
        tok.encode(INIT_TEXT, add_special_tokens=False)
    return tok


def build_batch():
    g = torch.Generator().manual_seed(BATCH_SEED)
    ids = torch.randint(2, len(TEXT_VOCAB), (BATCH, SEQ), generator=g)   # never the pad id
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    ids[1, ROW1_REAL:] = PAD_ID
    mask[1, ROW1_REAL:] = 0
    return ids, mask


def seeded_normal(gen, shape, std):
    return torch.randn(shape, generator=gen, dtype=torch.float64) * std


def build_model(n_ahead, tokenizer, n_passes=N_PASSES):
    """The official MistralForCausalLM, configured like quiet-star-train.py's model_init."""
    torch.manual_seed(MODEL_SEED)
    config = official_cfg.MistralConfig(
        vocab_size=len(TEXT_VOCAB), sliding_window=None, tie_word_embeddings=False,
        attention_dropout=0.0, attn_implementation="eager",
        max_thoughts=n_ahead + N_AHEAD_TALK + 1, **OFFICIAL_CONFIG_SWITCHES, **DIMS)
    model = official.MistralForCausalLM(config)
    model.resize_token_embeddings(len(tokenizer))
    model.double()
    assert type(model.model.layers[0].self_attn) is official.MistralAttention  # eager

    with torch.no_grad():
        # The meta-token columns stay in the official scoring softmax, so give their rows
        # explicit seeded values rather than whatever the resize left there.
        g = torch.Generator().manual_seed(META_ROW_SEED)
        for weight in (model.model.embed_tokens.weight, model.lm_head.weight):
            weight[START_ID:END_ID + 1] = seeded_normal(g, (2, DIMS["hidden_size"]), META_ROW_STD)
        # Mixing head (official talk_head[0]: Linear-ReLU-Linear-ReLU-Linear(no bias)).
        g = torch.Generator().manual_seed(HEAD_SEED)
        for layer in model.talk_head[0]:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.copy_(seeded_normal(g, layer.weight.shape, HEAD_STD))
                if layer.bias is not None:
                    layer.bias.copy_(seeded_normal(g, layer.bias.shape, HEAD_STD))

    model.tokenizer = tokenizer
    # attributes quiet-star-train.py sets (wandb and the step limit off)
    model.gumbel_detach = True
    model.include_policy_loss = True
    model.use_start_thought_token = True
    model.use_end_thought_token = True
    model.n_ahead = n_ahead
    model.n_ahead_talk = N_AHEAD_TALK
    model.n_passes = n_passes
    model.gumbel_temperature = 1
    model.original_mode = False
    model.wandb_enabled = False
    model.kill_after = None
    model.residual_think_head = False
    model.optimize_lm_head_only_at_start = False
    model.n_tokens_print = 1
    model.gradient_accumulation_steps = 1
    model.rm_initialized = True   # keep the seeded last head layer (see the module docstring)
    model.train()
    return model


def stock_state(model):
    """Only the keys a stock transformers MistralForCausalLM has, cloned."""
    extra = ("talk_head.", "start_embedding", "end_embedding")
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if not k.startswith(extra)}


def head_state(model):
    """Mixing-head weights under the names net.0/2/4 (official talk_head.0.0/2/4)."""
    return {k.replace("talk_head.0.", "net."): v.detach().clone()
            for k, v in model.state_dict().items() if k.startswith("talk_head.0.")}


def noise_seed(n_ahead, n_passes):
    return NOISE_SEED_BASE + n_ahead if n_passes == N_PASSES else ONE_PASS_NOISE_SEED


def case_name(n_ahead, n_passes):
    """Fixture file stem of one step: n_ahead_12, or n_ahead_12_n_passes_1."""
    return f"n_ahead_{n_ahead}" + ("" if n_passes == N_PASSES else f"_n_passes_{n_passes}")


def gumbel_noise(n_ahead, n_passes=N_PASSES):
    """Standard Gumbel noise (batch, n_passes, seq, n_ahead - 3, vocab), float64."""
    g = torch.Generator().manual_seed(noise_seed(n_ahead, n_passes))
    shape = (BATCH, n_passes, SEQ, n_ahead - 3, len(TEXT_VOCAB) + 2)
    exp1 = torch.empty(shape, dtype=torch.float64).exponential_(generator=g)
    return -exp1.log()


class OfficialStepRecorder:
    """Patches and hooks around one official forward; restores everything on exit."""

    def __init__(self, model, noise):
        self.model, self.noise = model, noise
        self.sampled = []          # argmax indices our Gumbel replacement returned, per call
        self.log_softmaxes = []    # every F.log_softmax output during the forward
        self.head_outputs = []     # talk_head[0] output at every step
        self.forward_locals = []   # locals of the official forward at its return

    # hard Gumbel-softmax with stored noise: one-hot of argmax(logits + g)
    def _gumbel(self, logits, tau=1.0, hard=False, eps=1e-10, dim=-1):
        assert hard and dim in (-1, logits.dim() - 1)
        k = len(self.sampled)
        vocab = self.noise.shape[-1]
        g = self.noise[:, :, :, k, :].reshape(-1, vocab)   # rows (b * n_passes + n) * seq + j
        assert logits.shape == g.shape, (logits.shape, g.shape)
        idx = (logits.detach() + g).argmax(dim=-1)
        self.sampled.append(idx)
        return F.one_hot(idx, vocab).to(logits.dtype)

    def _log_softmax(self, *args, **kwargs):
        out = self._real_log_softmax(*args, **kwargs)
        self.log_softmaxes.append(out.detach().clone())
        return out

    def _head_hook(self, module, inputs, output):
        self.head_outputs.append(output.detach().clone())

    def _tracer(self, frame, event, arg):
        # called for every new Python frame; only the official forward gets a local tracer
        if frame.f_code is not self._forward_code:
            return None
        frame.f_trace_lines = False

        def on_return(frame, event, arg):
            if event == "return":
                self.forward_locals.append(dict(frame.f_locals))
            return on_return
        return on_return

    def __enter__(self):
        self._real_gumbel = F.gumbel_softmax
        self._real_log_softmax = F.log_softmax
        F.gumbel_softmax = self._gumbel        # the official file calls F.<name> at run time
        F.log_softmax = self._log_softmax
        self._hook = self.model.talk_head[0].register_forward_hook(self._head_hook)
        self._forward_code = official.MistralForCausalLM.forward.__code__
        self._old_trace = sys.gettrace()
        sys.settrace(self._tracer)
        return self

    def __exit__(self, *exc):
        sys.settrace(self._old_trace)
        self._hook.remove()
        F.gumbel_softmax = self._real_gumbel
        F.log_softmax = self._real_log_softmax
        return False


def by_rows(t, n_passes=N_PASSES):
    """(batch * n_passes, ...) with rows b * n_passes + n  ->  (batch, n_passes, ...)."""
    return t.reshape(-1, n_passes, *t.shape[1:])


def run_step(n_ahead, tokenizer, input_ids, attention_mask, n_passes=N_PASSES):
    model = build_model(n_ahead, tokenizer, n_passes)
    weights = stock_state(model)
    head = head_state(model)
    noise = gumbel_noise(n_ahead, n_passes)
    m, rows = n_ahead - 3, BATCH * n_passes   # sampled thought tokens, official batch rows
    by_row = lambda t: by_rows(t, n_passes)   # noqa: E731

    # transformers 4.37 builds its causal mask with torch.full(..., finfo(float64).min) in the
    # DEFAULT dtype, which recent torch refuses for float32; a float64 default for the step
    # gives the mask the model's dtype (same attention either way: the masked scores end up
    # -inf in the float32 softmax).
    previous_default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with OfficialStepRecorder(model, noise) as rec:
            out = model(input_ids=input_ids, attention_mask=attention_mask,
                        labels=input_ids.clone())
        out.loss.backward()
    finally:
        torch.set_default_dtype(previous_default)

    # -- what the official forward did, as checks on our reading of it --
    assert len(rec.sampled) == m, f"gumbel_softmax called {len(rec.sampled)} times, not {m}"
    assert len(rec.forward_locals) == 1
    loc = rec.forward_locals[0]
    steps = n_ahead + N_AHEAD_TALK - 1                  # forward passes: base + thought + talk
    loss_list = loc["loss_list"]
    assert len(loss_list) == steps
    assert len(rec.head_outputs) == steps - 1           # the head runs at every step but the base
    assert len(rec.log_softmaxes) == m                  # only the REINFORCE log-likelihoods
    lik_list = loc["action_loglikelihoods_list"]
    assert len(lik_list) == m

    # thought tokens: the official sampled_token_history is start, m samples, end, then talk
    history = torch.stack(loc["sampled_token_history"][:n_ahead - 1], dim=-1)   # (rows*seq, N-1)
    assert (history[:, 0] == START_ID).all() and (history[:, -1] == END_ID).all()
    assert torch.equal(history[:, 1:-1], torch.stack(rec.sampled, dim=-1))
    thought_ids = by_row(history.reshape(rows, SEQ, n_ahead - 1))

    # log-probs at the REINFORCE temperature of the sampled tokens, read from the official
    # log_softmax outputs; its own list (which stops one position short) must agree
    logprobs = torch.stack([
        lsm.gather(-1, history[:, 1 + k:2 + k]).squeeze(-1)
        for k, lsm in enumerate(rec.log_softmaxes)], dim=-1).reshape(rows, SEQ, m)
    for k, lik in enumerate(lik_list):
        assert torch.equal(lik.detach(), logprobs[:, :SEQ - 1, k])

    # mixing weight at the end-of-thought step and the teacher-forced talk steps
    # (head call c is step c + 1; offset i is step n_ahead - 1 + i)
    w = torch.cat([rec.head_outputs[n_ahead - 2 + i] for i in range(N_AHEAD_TALK)], dim=-1)

    # per-entry talk cross-entropies: step n_ahead - 1 + i predicts i + 1 tokens ahead
    log_p_talk = torch.full((rows, SEQ, N_AHEAD_TALK), float("nan"), dtype=torch.float64)
    for i in range(N_AHEAD_TALK):
        ce = loss_list[n_ahead - 1 + i].detach()
        assert ce.shape == (rows, SEQ - 1 - i)
        log_p_talk[:, :SEQ - 1 - i, i] = -ce + 0.0       # + 0.0: no -0.0 at ignored targets
    base = loss_list[0].detach()
    assert all(torch.equal(base[0::n_passes], base[k::n_passes]) for k in range(n_passes))

    rewards = loc["train_policy_reward"].detach()        # after centring, before the clamp
    clamped = loc["fixed_policy_reward"].detach()
    assert torch.equal(clamped, rewards.clamp(min=0))
    n_reward = SEQ - 1 - N_AHEAD_TALK
    assert rewards.shape == (rows, n_reward)
    if n_passes == 1:     # no mean baseline: the reward is the improvement over the base itself
        assert torch.equal(rewards, loc["policy_reward"].detach())

    loss = out.loss.detach()
    talk_loss = model.log_dict["loss_talk"].detach()     # the official logged talk loss
    policy_loss = loc["dqn_loss"].detach()
    base_loss = model.log_dict["loss_0"].detach()
    recombined = (talk_loss * (1 - model.original_loss_weight)
                  + base_loss * model.original_loss_weight + policy_loss * model.policy_loss_beta)
    assert torch.allclose(recombined, loss, rtol=1e-12, atol=0), (recombined, loss)
    assert policy_loss != 0 and (clamped > 0).any(), "degenerate fixture: no positive reward"

    scale = model.embedding_scale
    tensors = {
        "noise": noise,
        "meta_init": torch.stack([model.start_embedding.detach()[0] * scale,
                                  model.end_embedding.detach()[0] * scale]),
        "thought_ids": thought_ids.to(torch.int64),
        "thought_logprobs": by_row(logprobs),
        "w": by_row(w),
        "log_p_talk": by_row(log_p_talk),
        "base_nll": base[0::n_passes],
        "rewards": by_row(rewards),
        "rewards_raw": by_row(loc["policy_reward"].detach()),
        "loss": loss,
        "talk_loss": talk_loss,
        "policy_loss": policy_loss,
    }
    for name, p in model.named_parameters():
        if name in ("start_embedding", "end_embedding"):
            continue
        assert p.grad is not None, name
        key = name.replace("talk_head.0.", "head.net.")
        tensors["grad." + key] = p.grad.detach().clone()
    tensors["grad.meta.stored"] = torch.stack([model.start_embedding.grad[0],
                                               model.end_embedding.grad[0]])
    tensors = {k: v.contiguous() for k, v in tensors.items()}

    summary = {
        "n_ahead": n_ahead,
        "loss": loss.item(),
        "talk_loss": talk_loss.item(),
        "policy_loss": policy_loss.item(),
        "base_loss": base_loss.item(),
        "n_sampled_tokens": m,
        "positive_clamped_reward_fraction": (clamped > 0).double().mean().item(),
        "w_abs_max": w.abs().max().item(),
        "n_passes": n_passes,
        "noise_seed": noise_seed(n_ahead, n_passes),
        "max_thoughts": model.config.max_thoughts,
    }
    return weights, head, tensors, summary, model.config


def stock_config(config):
    """config.json for a stock transformers Mistral: the official extra keys removed."""
    d = config.to_diff_dict()
    for key in list(OFFICIAL_CONFIG_SWITCHES) + ["max_thoughts"]:
        d.pop(key, None)
    d.update(architectures=["MistralForCausalLM"], model_type="mistral",
             vocab_size=len(TEXT_VOCAB) + 2, torch_dtype="float64")
    return d


TENSOR_DOCS = {
    "noise": "(batch, n_passes, seq, n_ahead-3, vocab) standard Gumbel noise, seeded; sampling "
             "call k used noise[:, :, :, k].reshape(batch*n_passes*seq, vocab) (official rows "
             "b*n_passes+n, then position) and picked argmax(logits + noise)",
    "meta_init": "(2, hidden) start_embedding[0]*embedding_scale and end_embedding[0]*"
                 "embedding_scale after the forward, i.e. the embeddings the official code feeds "
                 "for the start / end meta tokens (initialised from the embedding of the FIRST "
                 "token of '---', id 17, /100*100)",
    "thought_ids": "(batch, n_passes, seq, n_ahead-1) start id, the n_ahead-3 sampled ids, end id "
                   "for each position: argmax of the one-hots in the official sampled_token_history; "
                   "sampling may pick any id but the two meta ids (their logits are set to -1e10), "
                   "pad and unk included",
    "thought_logprobs": "(batch, n_passes, seq, n_ahead-3) log-prob of each sampled token at the "
                        "REINFORCE temperature: the official F.log_softmax(logits / "
                        "reinforce_temperature) outputs (recorded by a wrapper) gathered at the "
                        "sampled ids; equal to the official action_loglikelihoods for positions < "
                        "seq-1 (the official list drops the last position)",
    "w": "(batch, n_passes, seq, n_ahead_talk) mixing-head output (forward hook on talk_head[0]) at "
         "offset i = 0 (end-of-thought step) .. n_ahead_talk-1; raw: at positions j >= seq-1-i the "
         "value feeds no loss, and for j >= seq-i the base hidden state was wrapped around "
         "(official torch.cat roll)",
    "log_p_talk": "(batch, n_passes, seq, n_ahead_talk) minus the official unreduced cross-entropy "
                  "of the mixed prediction at offset i (target j+i+1), read from the official "
                  "loss_list; NaN for j >= seq-1-i (no entry); 0 where the target is the pad id "
                  "(ignored, so not a log-prob)",
    "base_nll": "(batch, seq-1) official loss_list[0]: base model cross-entropy of token j+1 "
                "from position j; 0 at pad targets",
    "rewards": "(batch, n_passes, seq-1-n_ahead_talk) official policy reward after the trice "
               "centring over n_passes, before the clamp (train_policy_reward), positions "
               "j < seq-1-n_ahead_talk; the policy loss averages clamp(rewards, 0) * log-prob over "
               "all these entries (zeros included), then over the thought tokens",
    "rewards_raw": "(batch, n_passes, seq-1-n_ahead_talk) official policy_reward before centring: "
                   "at position j, sum over offsets i of base_nll[j+i] + log_p_talk[j, i] (base "
                   "minus mixed cross-entropy of token j+i+1); zero thinking-phase terms",
    "loss": "() the official out.loss (0.5 talk + 0.5 base + policy_loss_beta * policy)",
    "talk_loss": "() official logged loss_talk: mean over the n_ahead_talk offsets of the "
                 "nonzero-mean cross-entropy, before the 0.5 weight",
    "policy_loss": "() official dqn_loss (mean over thought tokens of mean(-clamped reward * "
                   "log-prob)), before policy_loss_beta",
    "grad.<stock name>": "gradient of out.loss for each stock model parameter after backward",
    "grad.head.net.{0,2,4}.*": "gradient of the mixing head (official talk_head.0.{0,2,4})",
    "grad.meta.stored": "(2, hidden) stack(start_embedding.grad[0], end_embedding.grad[0]) "
                        "(gradient w.r.t. the stored, /embedding_scale, parameters)",
}


def to_json(obj, depth=0):
    """Indented JSON in which a list of plain values (token ids, the vocab) stays on one line."""
    pad = " " * (depth + 1)
    if isinstance(obj, dict) and obj:
        body = ",\n".join(f"{pad}{json.dumps(k)}: {to_json(v, depth + 1)}" for k, v in obj.items())
        return "{\n" + body + "\n" + " " * depth + "}"
    if isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        body = ",\n".join(pad + to_json(v, depth + 1) for v in obj)
        return "[\n" + body + "\n" + " " * depth + "]"
    return json.dumps(obj)


def write_json(path, obj):
    with open(path, "w") as f:
        f.write(to_json(obj) + "\n")


# ---- the official training run (HF Trainer, quiet-star-train.py's arguments) -------------
# A second, separate fixture (--run-out): the official model trained for RUN_STEPS optimiser
# steps by transformers' Trainer with the TrainingArguments of quiet-star-train.py, the model
# set up as its model_init does, on RUN_LINES lines of RUN_SEQ tokens. Only three things differ
# from the script, none of them numbers of the algorithm: a tiny local Mistral instead of
# Mistral-7B (loaded with from_pretrained all the same, so the head and the new token rows are
# initialised as in the real run), float64 instead of float32, and no wandb / evaluation.
RUN_DIMS = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, rope_theta=10000.0,
                rms_norm_eps=1e-6)
RUN_N_AHEAD, RUN_N_AHEAD_TALK, RUN_N_PASSES = 12, 4, 2   # quiet-star-train.py's globals
RUN_FULL_BATCH = 8                                        # its full_batch_size
RUN_STEPS, RUN_SEQ = 3, 16
RUN_LINES = RUN_FULL_BATCH * RUN_STEPS                    # one epoch = the RUN_STEPS steps
RUN_MODEL_SEED, RUN_DATA_SEED, RUN_NOISE_SEED = 10, 11, 12
RUN_LINE_TOKENS = [i for i, t in enumerate(TEXT_VOCAB) if t not in ("<pad>", "<unk>", "-", "--")]


def run_training_arguments(output_dir):
    """quiet-star-train.py's TrainingArguments, value for value, for RUN_N_PASSES; changed only:
    evaluation off (no eval set), nothing reported (wandb), the CPU."""
    batch_size = RUN_FULL_BATCH // RUN_N_PASSES
    return transformers.TrainingArguments(
        output_dir=output_dir, learning_rate=1e-6, optim="adamw_torch",
        per_device_train_batch_size=batch_size, per_device_eval_batch_size=batch_size,
        gradient_accumulation_steps=RUN_FULL_BATCH // batch_size, max_grad_norm=1.0,
        max_steps=100000, warmup_steps=20, auto_find_batch_size=True, weight_decay=0.001,
        label_names=["labels"], include_inputs_for_metrics=True, logging_steps=10,
        save_steps=100, evaluation_strategy="no", report_to=[], use_cpu=True, seed=42)


def run_lines():
    """(RUN_LINES, RUN_SEQ) token ids, every line full (no padding), no '-' that could merge."""
    g = torch.Generator().manual_seed(RUN_DATA_SEED)
    pick = torch.randint(len(RUN_LINE_TOKENS), (RUN_LINES, RUN_SEQ), generator=g)
    return torch.tensor(RUN_LINE_TOKENS)[pick]


def run_dataset(tokenizer, lines):
    """Each line as quiet-star-train.py's preprocess_function leaves it: encode(text) (no special
    tokens with this tokenizer), padded to the length (none needed), mask = ids != pad,
    labels = ids."""
    texts = ["".join(TEXT_VOCAB[i] for i in row) for row in lines.tolist()]
    rows = []
    for text, row in zip(texts, lines):
        ids = torch.tensor(tokenizer.encode(text))
        assert torch.equal(ids, row), (text, ids, row)
        rows.append({"input_ids": ids, "attention_mask": (ids != PAD_ID).long(), "labels": ids.clone()})
    return texts, rows


def save_stock_base(path):
    """A tiny seeded stock Mistral (22-token vocabulary) for from_pretrained, as Mistral-7B is."""
    torch.manual_seed(RUN_MODEL_SEED)
    config = transformers.MistralConfig(vocab_size=len(TEXT_VOCAB), sliding_window=None,
                                        tie_word_embeddings=False, **RUN_DIMS)
    model = transformers.MistralForCausalLM(config)       # the official class: keep the stock keys
    stock = stock_state(model)
    model.save_pretrained(path, state_dict=stock, safe_serialization=True)
    return {k: v.double() for k, v in stock.items()}


def run_model_init(base_path, tokenizer):
    """quiet-star-train.py's model_init(None), for the tiny base: from_pretrained with its
    switches, the meta tokens added and the embeddings resized, its attributes set."""
    model = official.MistralForCausalLM.from_pretrained(
        base_path, torch_dtype=torch.float64, device_map="auto",
        max_thoughts=RUN_N_AHEAD + RUN_N_AHEAD_TALK + 1, **OFFICIAL_CONFIG_SWITCHES)
    model.resize_token_embeddings(len(tokenizer))
    model.tokenizer = tokenizer
    accumulation = RUN_FULL_BATCH // (RUN_FULL_BATCH // RUN_N_PASSES)
    for name, value in dict(gumbel_detach=True, include_policy_loss=True, use_end_thought_token=True,
                            use_start_thought_token=True, n_ahead=RUN_N_AHEAD,
                            n_ahead_talk=RUN_N_AHEAD_TALK, n_passes=RUN_N_PASSES,
                            n_tokens_print=accumulation, gradient_accumulation_steps=accumulation,
                            residual_think_head=False, optimize_lm_head_only_at_start=False,
                            gumbel_temperature=1, wandb_enabled=False, original_mode=False,
                            kill_after=100).items():
        setattr(model, name, value)
    model.train()
    return model


def run_noise():
    """Gumbel noise of every micro-batch: (micro-batches, rows, n_passes, seq, n_ahead-3, vocab),
    drawn in float64 and stored (and used) rounded to float32, so both sides add the same."""
    g = torch.Generator().manual_seed(RUN_NOISE_SEED)
    micro = RUN_STEPS * RUN_N_PASSES
    shape = (micro, RUN_FULL_BATCH // RUN_N_PASSES, RUN_N_PASSES, RUN_SEQ, RUN_N_AHEAD - 3,
             len(TEXT_VOCAB) + 2)
    exp1 = torch.empty(shape, dtype=torch.float64).exponential_(generator=g)
    return (-exp1.log()).float()


class RunRecorder(transformers.TrainerCallback):
    """Feeds the stored Gumbel noise to the official sampling (micro-batch by micro-batch), records
    which lines each forward saw, and snapshots every parameter at the start and after each
    optimiser step; stops the Trainer after RUN_STEPS steps."""

    def __init__(self, noise, lines):
        self.noise, self.lines = noise, lines
        self.calls, self.order, self.snapshots, self.learning_rates = 0, [], [], []

    def gumbel(self, logits, tau=1.0, hard=False, eps=1e-10, dim=-1):
        assert hard and dim in (-1, logits.dim() - 1)
        m = RUN_N_AHEAD - 3
        micro, k = divmod(self.calls, m)
        self.calls += 1
        vocab = self.noise.shape[-1]
        g = self.noise[micro][:, :, :, k, :].reshape(-1, vocab).double()
        assert logits.shape == g.shape, (logits.shape, g.shape)
        return F.one_hot((logits.detach() + g).argmax(dim=-1), vocab).to(logits.dtype)

    def see_batch(self, module, args, kwargs):
        ids = kwargs["input_ids"]
        assert self.calls == len(self.order) * (RUN_N_AHEAD - 3)     # one micro-batch per forward
        self.order.append([int((self.lines == row).all(-1).nonzero()) for row in ids])

    def snapshot(self, model):
        self.snapshots.append({k: v.detach().clone() for k, v in model.named_parameters()})

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.hook = model.register_forward_pre_hook(self.see_batch, with_kwargs=True)
        self.snapshot(model)

    def on_step_begin(self, args, state, control, lr_scheduler=None, **kwargs):
        self.learning_rates.append(lr_scheduler.get_last_lr()[0])

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.snapshot(model)
        control.should_training_stop = state.global_step >= RUN_STEPS


def official_run(tokenizer, workdir):
    """Train the official model RUN_STEPS steps with the official Trainer setup; its records."""
    base = save_stock_base(os.path.join(workdir, "base"))
    texts, rows = run_dataset(tokenizer, run_lines())
    noise = run_noise()
    recorder = RunRecorder(noise, torch.stack([r["input_ids"] for r in rows]))
    trainer = transformers.Trainer(args=run_training_arguments(os.path.join(workdir, "trainer")),
                                   train_dataset=rows, callbacks=[recorder],
                                   model_init=lambda trial=None: run_model_init(os.path.join(workdir, "base"), tokenizer))
    previous_default, real_gumbel = torch.get_default_dtype(), F.gumbel_softmax
    torch.set_default_dtype(torch.float64)      # the 4.37 causal mask, as in run_step
    F.gumbel_softmax = recorder.gumbel
    try:
        trainer.train()
    finally:
        F.gumbel_softmax = real_gumbel
        torch.set_default_dtype(previous_default)
    assert len(recorder.snapshots) == RUN_STEPS + 1 and trainer.state.global_step == RUN_STEPS
    assert recorder.calls == len(recorder.order) * (RUN_N_AHEAD - 3) == RUN_STEPS * RUN_N_PASSES * (RUN_N_AHEAD - 3)
    return base, texts, noise, recorder, trainer


def write_run(out, tokenizer, official_commit):
    import tempfile
    with tempfile.TemporaryDirectory() as workdir:
        base, texts, noise, rec, trainer = official_run(tokenizer, workdir)
    start, steps = rec.snapshots[0], rec.snapshots[1:]
    # the resized stock model as training starts (the meta rows drawn by resize_token_embeddings)
    stock = {k: v for k, v in start.items() if not k.startswith(("talk_head.", "start_embedding", "end_embedding"))}
    for k, v in base.items():                       # the loaded rows are the saved base's
        assert torch.equal(stock[k][:v.shape[0]], v), k
    os.makedirs(os.path.join(out, "model"), exist_ok=True)
    save_file({k: v.contiguous() for k, v in stock.items()}, os.path.join(out, "model", "model.safetensors"),
              metadata={"format": "pt"})
    config = official_cfg.MistralConfig(vocab_size=len(TEXT_VOCAB), sliding_window=None,
                                         tie_word_embeddings=False, **RUN_DIMS)
    with open(os.path.join(out, "model", "config.json"), "w") as f:
        json.dump(stock_config(config), f, indent=2, sort_keys=True)
        f.write("\n")
    tensors = {"noise": noise, "order": torch.tensor(rec.order)}
    tensors |= {f"head_init.{k[len('talk_head.0.'):]}": v for k, v in start.items() if k.startswith("talk_head.0.")}
    scale = 100.0
    for i, snap in enumerate(steps, start=1):
        for k, v in snap.items():
            if k.startswith("talk_head.0."):
                tensors[f"step{i}.head.net.{k[len('talk_head.0.'):]}"] = v
            elif k in ("start_embedding", "end_embedding"):
                continue
            else:
                tensors[f"step{i}.{k}"] = v
        tensors[f"step{i}.meta.stored"] = torch.stack([snap["start_embedding"][0], snap["end_embedding"][0]])
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out, "run.safetensors"),
              metadata={"format": "pt"})
    setup = {
        "description": f"{RUN_STEPS} optimiser steps of the official Quiet-STaR model driven by the HF Trainer "
                       "with quiet-star-train.py's arguments; written by scripts/official_oracle.py --run-out",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "official_commit": official_commit, "python": platform.python_version()},
        "vocab": TEXT_VOCAB, "merges": [list(m) for m in MERGES], "meta_tokens": META_TOKENS,
        "texts": texts, "seq": RUN_SEQ, "steps": RUN_STEPS,
        "n_ahead": RUN_N_AHEAD, "n_ahead_talk": RUN_N_AHEAD_TALK, "n_passes": RUN_N_PASSES,
        "full_batch_size": RUN_FULL_BATCH, "dims": RUN_DIMS,
        "training_arguments": {k: v for k, v in run_training_arguments("out").to_dict().items() if k in (
            "learning_rate", "optim", "per_device_train_batch_size", "gradient_accumulation_steps",
            "max_grad_norm", "max_steps", "warmup_steps", "weight_decay", "seed", "lr_scheduler_type",
            "adam_beta1", "adam_beta2", "adam_epsilon")},
        "lines_per_micro_batch": rec.order,
        "seeds": {"base_model": RUN_MODEL_SEED, "lines": RUN_DATA_SEED, "noise": RUN_NOISE_SEED,
                  "trainer": 42},
        "tensors": {
            "noise": "(micro-batches, rows, n_passes, seq, n_ahead-3, vocab) float32 standard Gumbel noise; "
                     "micro-batch i's sampling call k used noise[i][:, :, :, k].reshape(-1, vocab) in float64",
            "order": "(micro-batches, rows) index into texts of the lines each official forward saw",
            "head_init.*": "the mixing head (talk_head.0) as from_pretrained initialised it, before the "
                           "first forward zeroed its last layer",
            "stepN.<stock name>": "every stock parameter after optimiser step N (step 1 ran at learning rate 0)",
            "stepN.head.net.*": "the mixing head after step N",
            "stepN.meta.stored": "(2, hidden) start_embedding[0], end_embedding[0] after step N "
                                 f"(stored / embedding_scale {scale:g})",
            "model/": "the stock weights when training starts: the base loaded by from_pretrained, "
                      "resized to 24 tokens (rows 22, 23 drawn by resize_token_embeddings)",
        },
        "learning_rate_of_each_step": rec.learning_rates,
    }
    write_json(os.path.join(out, "setup.json"), setup)
    print(f"official run: {RUN_STEPS} steps, micro-batches {rec.order}; wrote {out}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output folder, e.g. tests/fixtures/official_step")
    ap.add_argument("--official-commit", default=OFFICIAL_COMMIT,
                    help="commit of the official checkout, recorded in setup.json")
    ap.add_argument("--run-out", help="also train the official model with the official Trainer "
                    "setup and write that run here, e.g. tests/fixtures/official_run")
    args = ap.parse_args()

    torch.set_num_threads(1)          # reductions in a fixed order: byte-identical reruns
    tokenizer = build_tokenizer()
    if args.run_out:
        write_run(args.run_out, tokenizer, args.official_commit)
    input_ids, attention_mask = build_batch()

    cases = [(n, N_PASSES) for n in N_AHEAD_VALUES] + [(ONE_PASS_N_AHEAD, 1)]
    results = {case_name(n, p): run_step(n, tokenizer, input_ids, attention_mask, p) for n, p in cases}
    weights, head, _, _, config = results[case_name(N_AHEAD_VALUES[0], N_PASSES)]
    for n, (w_n, h_n, *_rest) in results.items():     # every run started from the same weights
        assert w_n.keys() == weights.keys() and h_n.keys() == head.keys()
        assert all(torch.equal(w_n[k], weights[k]) for k in weights)
        assert all(torch.equal(h_n[k], head[k]) for k in head)

    os.makedirs(os.path.join(args.out, "model"), exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()},
              os.path.join(args.out, "model", "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(args.out, "model", "config.json"), "w") as f:
        json.dump(stock_config(config), f, indent=2, sort_keys=True)
        f.write("\n")
    save_file({k: v.contiguous() for k, v in head.items()},
              os.path.join(args.out, "head.safetensors"), metadata={"format": "pt"})

    for name, (_w, _h, tensors, summary, _c) in results.items():
        save_file(tensors, os.path.join(args.out, f"{name}.safetensors"),
                  metadata={"format": "pt"})
        with open(os.path.join(args.out, f"{name}.json"), "w") as f:
            json.dump(summary, f, indent=2)
            f.write("\n")

    model = build_model(N_AHEAD_VALUES[0], tokenizer)
    setup = {
        "description": "One training step of the official Quiet-STaR code (ezelikman/quiet-star) "
                       "on a tiny seeded Mistral; written by scripts/official_oracle.py",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "official_repo": OFFICIAL_REPO, "official_commit": args.official_commit,
                     "python": platform.python_version()},
        # tokenizer: tokenizers BPE, no normalizer, no pre-tokenizer; index = token id; the
        # meta tokens were added with add_special_tokens
        "vocab": TEXT_VOCAB + META_TOKENS,
        "merges": [list(m) for m in MERGES],
        "pad_id": PAD_ID, "unk_id": 1,
        "meta_ids": [START_ID, END_ID],                      # [start, end]
        "meta_id_by_name": {"start": START_ID, "end": END_ID},
        "init_texts": {"start": model.initial_start_token, "end": model.initial_end_token},
        "initial_start_token": model.initial_start_token,    # the official attribute names
        "initial_end_token": model.initial_end_token,
        "init_token_ids": {"start": tokenizer.encode(model.initial_start_token,
                                                     add_special_tokens=False)[0],
                           "end": tokenizer.encode(model.initial_end_token,
                                                   add_special_tokens=False)[0]},
        # the batch; labels = input_ids (pad id at padding, which the official code ignores)
        "input_ids": input_ids.tolist(),
        "attention_mask": attention_mask.tolist(),
        "seq": SEQ, "batch_size": BATCH,
        "dims": dict(DIMS, vocab_size=len(tokenizer), text_vocab_size=len(TEXT_VOCAB),
                     sliding_window=None, tie_word_embeddings=False),
        "n_ahead_values": list(N_AHEAD_VALUES),
        "n_ahead_talk": N_AHEAD_TALK, "n_passes": N_PASSES,
        # the same step with one thought per position (its files: case_name(12, 1))
        "one_pass": {"n_ahead": ONE_PASS_N_AHEAD, "n_passes": 1,
                     "files": case_name(ONE_PASS_N_AHEAD, 1) + ".{safetensors,json}"},
        "embedding_scale": model.embedding_scale,
        "reinforce_temperature": model.reinforce_temperature,
        "policy_loss_beta": model.policy_loss_beta,
        "policy_beta": model.policy_loss_beta,               # same value, short name
        "original_loss_weight": model.original_loss_weight,
        "gumbel_temperature": model.gumbel_temperature,
        "official_flags": {k: getattr(model, k) for k in (
            "trice_mode", "remove_negative_rewards", "first_and_last_mode", "no_residual",
            "use_concat_talk_head", "use_weighted_talk_head", "use_shallow_talk",
            "use_complex_talk_head", "merged_lm_and_talk_heads", "gumbel_detach",
            "include_policy_loss", "use_policy_loss", "use_start_thought_token",
            "use_end_thought_token", "optimize_lm_head_only_at_start", "original_mode")},
        "seeds": {"model": MODEL_SEED, "batch": BATCH_SEED, "meta_rows": META_ROW_SEED,
                  "head": HEAD_SEED, "noise": {str(n): NOISE_SEED_BASE + n
                                               for n in N_AHEAD_VALUES},
                  "noise_one_pass": ONE_PASS_NOISE_SEED},
        "init": {
            "model": "official MistralForCausalLM built under torch.manual_seed(0), "
                     "resize_token_embeddings(24), then .double(); model/ holds these weights "
                     "before the step",
            "meta_rows": f"embedding and lm_head rows 22, 23 overwritten with N(0, {META_ROW_STD}) "
                         "from the meta_rows seed",
            "head": f"every weight and bias of talk_head[0] drawn N(0, {HEAD_STD}) from the head "
                    "seed, and rm_initialized set so the official code does not zero the last "
                    "layer",
        },
        "files": {
            "model/": "stock transformers Mistral checkpoint (config.json, model.safetensors); "
                      "pad_token_id is null: the official embedding has no padding_idx, so the "
                      "pad row gets a gradient",
            "head.safetensors": "mixing head net.0 (Linear 2h->h), net.2 (h->h), net.4 (h->1, no "
                                "bias), ReLU between; official talk_head[0]",
            "n_ahead_N.safetensors": "tensors below, float64 (ids int64)",
            "n_ahead_N.json": "loss, talk_loss, policy_loss and a few counts",
            "n_ahead_N_n_passes_1.*": "the same for the one-pass step (n_passes = 1): there the "
                                      "official code skips the trice centring, so rewards equals "
                                      "rewards_raw (the improvement over the base)",
        },
        "tensors": TENSOR_DOCS,
        "captures": {
            "read": "loss_list, train_policy_reward, fixed_policy_reward, policy_reward, "
                    "action_loglikelihoods_list, sampled_token_history and dqn_loss are the "
                    "official forward's locals at return (sys.settrace); log-softmax outputs by a "
                    "wrapper around torch.nn.functional.log_softmax; w by a forward hook; "
                    "talk_loss from the official log_dict['loss_talk']",
            "derived": "none (log_p_talk is a sign flip of the official entries; "
                       "thought_logprobs a gather of the official log-softmax at the sampled ids)",
        },
        "precision_notes": "float64 throughout, except what transformers 4.37 eager Mistral does "
                           "itself: attention softmax in float32, RoPE tables from float32 inverse "
                           "frequencies (recomputed in float64 once the key length passes "
                           "max_position_embeddings=128); compare with a relative tolerance "
                           "around 1e-6",
    }
    write_json(os.path.join(args.out, "setup.json"), setup)

    for name, (*_x, summary, _c) in results.items():
        print(f"{name}: loss={summary['loss']:.6g} talk_loss={summary['talk_loss']:.6g} "
              f"policy_loss={summary['policy_loss']:.6g} positive_rewards="
              f"{summary['positive_clamped_reward_fraction']:.3f} |w|max={summary['w_abs_max']:.3g}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

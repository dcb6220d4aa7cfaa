"""The lm-evaluation-harness adapter (qstar_mini.evaluation.harness), offline: tasks written here as YAML on
``data/gsm8k_format.jsonl``, run through ``lm_eval.simple_evaluate`` with a checkpoint trained
for two steps, and every number checked against qstar_mini's own functions."""

import json
import os
import subprocess
import sys

import pytest
import torch

import lm_eval
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager
from qstar_mini.runs.checkpoint import load_checkpoint, save_checkpoint
from qstar_mini.config import tiny
from qstar_mini.data import read_jsonl
from qstar_mini.errors import CheckpointError, ConfigError
from qstar_mini.evaluation.gsm8k import _greedy_plain, extract_answer, gsm8k_eval
from qstar_mini.data import gsm8k_prompt
from qstar_mini.inference import generate_with_thoughts, think_on_text
from qstar_mini.evaluation.harness import TASKS_DIR, QuietStarLM, _with_shipped_tasks, rolling_windows, task_manager
from qstar_mini.lm import text_log_probs
from qstar_mini.models.tiny import build_tokenizer, tiny_model
from qstar_mini.paths import DATA_DIR, REPO_ROOT
from qstar_mini.train import train

torch.set_num_threads(1)
GSM = DATA_DIR / "gsm8k_format.jsonl"
LIMIT = 3
MAX_GEN = 6
TASKS = ["qstar_gsm_mc", "qstar_gsm_rolling", "qstar_gsm_gen"]


def task_yaml(name: str, cache: str, body: str) -> str:
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {GSM}\n"
            f"  cache_dir: {cache}\ntest_split: test\n{body}")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A checkpoint trained for 2 steps, the task folder, and the harness run with and without thoughts."""
    root = tmp_path_factory.mktemp("harness")
    tok = build_tokenizer()
    model = tiny_model(tok, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=64)
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in read_jsonl(DATA_DIR / "train.jsonl")[:32]))
    cfg = tiny(steps=2, batch_size=8, warmup_steps=1, n_thoughts=2)
    train(cfg, root / "base", root / "train.jsonl", root / "run", eval_every=0, progress=False, device="cpu")
    tasks = root / "tasks"
    tasks.mkdir()
    cache = str(root / "hf-cache")
    (tasks / "mc.yaml").write_text(task_yaml("qstar_gsm_mc", cache, (
        "output_type: multiple_choice\n"
        "doc_to_text: \"{{question}}\\nA:\"\n"
        "doc_to_choice: \"{{[answer.split('#### ')[-1], '0', '100']}}\"\n"
        "doc_to_target: 0\n"
        "metric_list:\n  - metric: acc\n")))
    (tasks / "rolling.yaml").write_text(task_yaml("qstar_gsm_rolling", cache, (
        "output_type: loglikelihood_rolling\n"
        "doc_to_text: \"\"\n"
        "doc_to_target: \"{{question}}\"\n"
        "metric_list:\n  - metric: word_perplexity\n")))
    (tasks / "gen.yaml").write_text(task_yaml("qstar_gsm_gen", cache, (
        "output_type: generate_until\n"
        "doc_to_text: \"{{question}}\\nA: \"\n"
        "doc_to_target: \"{{answer.split('#### ')[-1]}}\"\n"
        f"generation_kwargs:\n  until: [\"\\n\\n\"]\n  max_gen_toks: {MAX_GEN}\n  do_sample: false\n"
        "filter_list:\n  - name: first-number\n    filter:\n"
        "      - function: regex\n        regex_pattern: \"(-?[0-9][0-9,]*)\"\n"
        "      - function: take_first\n"
        "metric_list:\n  - metric: exact_match\n    regexes_to_ignore: [\",\"]\n")))
    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    ck = load_checkpoint(root / "run" / "checkpoint")
    with torch.no_grad():                    # trust the thoughts (w ~ 0.95): they change what is generated
        ck.head.net[-1].bias.fill_(3.0)
    save_checkpoint(root / "run" / "checkpoint", ck.model, ck.tokenizer, ck.meta, ck.head, ck.cfg)
    results = {}
    for think in (True, False):
        results[think] = lm_eval.simple_evaluate(
            model="qstar-mini", model_args=f"checkpoint={root / 'run' / 'checkpoint'},think={str(think).lower()}",
            tasks=TASKS, limit=LIMIT, task_manager=manager, bootstrap_iters=0, device="cpu")
    return ck, results, tasks


def continuation_scores(ck, context: str, continuation: str):
    """qstar_mini's own per-token figures for the continuation, thinking at every position."""
    steps = think_on_text(ck.model, ck.tokenizer, ck.meta, ck.head, ck.cfg, context + continuation, greedy=True)
    cont = steps[len(steps) - len(continuation):]                         # char-level: one token per char
    return sum(s["logp_talk"] for s in cont), sum(s["logp_init"] for s in cont)


def test_rolling_windows_score_every_token_once():
    for n in range(1, 40):
        for length in (2, 3, 5, 16, 64):
            windows = rolling_windows(n, length)
            scored = [i for a, b, k in windows for i in range(b - k, b)]
            assert scored == list(range(1, n))                             # each token after the first, once
            assert all(b - a <= length and b - k - 1 >= a and k >= 1 for a, b, k in windows)
    with pytest.raises(ConfigError):
        rolling_windows(10, 1)


def test_loglikelihood_with_thoughts_is_qstar_minis_mixed_prediction(run):
    ck, results, _ = run
    samples = {think: results[think]["samples"]["qstar_gsm_mc"] for think in results}
    assert len(samples[True]) == LIMIT
    for with_thoughts, without in zip(samples[True], samples[False]):
        assert len(with_thoughts["arguments"]) == 3                       # three choices
        for (context, continuation), (lp, greedy), (lp0, _) in zip(
                with_thoughts["arguments"], with_thoughts["filtered_resps"], without["filtered_resps"]):
            assert context == gsm8k_prompt(with_thoughts["doc"]["question"]).rstrip()
            talk, init = continuation_scores(ck, context, continuation)
            assert lp == pytest.approx(talk, abs=1e-4)
            assert lp0 == pytest.approx(init, abs=1e-4)
            assert abs(talk - init) > 1e-5                                # thinking changed the number
    # acc is the fraction of problems whose gold choice (index 0) scores highest, with thoughts
    expected = sum(max(range(3), key=lambda i: s["filtered_resps"][i][0]) == 0 for s in samples[True]) / LIMIT
    assert results[True]["results"]["qstar_gsm_mc"]["acc,none"] == pytest.approx(expected)


def test_is_greedy_is_the_argmax_of_the_prediction(run):
    ck, results, _ = run
    for sample in results[False]["samples"]["qstar_gsm_mc"]:
        for (context, continuation), (_, greedy) in zip(sample["arguments"], sample["filtered_resps"]):
            ids = torch.tensor([ck.tokenizer(context + continuation)["input_ids"]])
            with torch.no_grad():
                logp = text_log_probs(ck.model(input_ids=ids).logits[0], ck.meta.ids)
            cont = ids[0, -len(continuation):]
            assert greedy == bool((logp[-len(continuation) - 1:-1].argmax(-1) == cont).all())


def test_rolling_loglikelihood_scores_the_whole_text(run):
    ck, results, _ = run
    for think, index in ((True, 0), (False, 1)):
        for sample in results[think]["samples"]["qstar_gsm_rolling"]:
            (text,) = sample["arguments"][0]
            steps = think_on_text(ck.model, ck.tokenizer, ck.meta, ck.head, ck.cfg, text, greedy=True)
            expected = sum(s["logp_talk" if think else "logp_init"] for s in steps)
            assert len(steps) == len(text) and sample["filtered_resps"][0] == pytest.approx(expected, abs=1e-3)


def test_long_text_is_scored_in_windows(run):
    ck, _, _ = run
    text = read_jsonl(GSM)[0]["question"][:40]
    lm = QuietStarLM(checkpoint=ck, think=False, max_length=16)
    (total,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    ids = ck.tokenizer(text)["input_ids"]                                   # <s> + 40 characters
    expected = 0.0
    for a, b, k in rolling_windows(len(ids), 16):
        with torch.no_grad():
            logp = text_log_probs(ck.model(input_ids=torch.tensor([ids[a:b]])).logits[0], ck.meta.ids)
        expected += float(logp[-k - 1:-1].gather(-1, torch.tensor(ids[b - k:b])[:, None]).sum())
    assert total == pytest.approx(expected, abs=1e-3)


def test_generate_until_thinks_before_every_token(run):
    ck, results, _ = run
    eos = ck.tokenizer.eos_token_id
    for think in (True, False):
        samples = results[think]["samples"]["qstar_gsm_gen"]
        right = []
        for sample in samples:
            context, kwargs = sample["arguments"][0]
            assert context == gsm8k_prompt(sample["doc"]["question"]) and kwargs["max_gen_toks"] == MAX_GEN
            if think:
                steps = generate_with_thoughts(ck.model, ck.tokenizer, ck.meta, ck.head, ck.cfg, context, MAX_GEN)
                text = ck.tokenizer.decode([s["token_id"] for s in steps if s["token_id"] != eos],
                                           skip_special_tokens=True)
            else:
                text = _greedy_plain(ck.model, ck.tokenizer, context, MAX_GEN, ck.meta)
            text = text.split("\n\n")[0]
            assert sample["resps"][0][0] == text
            right.append(extract_answer(text) == sample["doc"]["answer"].split("#### ")[-1])
        accuracy = results[think]["results"]["qstar_gsm_gen"]["exact_match,first-number"]
        assert accuracy == pytest.approx(sum(right) / len(right))
    with_thoughts, without = ([s["resps"][0][0] for s in results[t]["samples"]["qstar_gsm_gen"]] for t in (True, False))
    assert with_thoughts != without                                        # the thoughts were used


@pytest.mark.parametrize("args, error, word", [
    ({"checkpoint": "/no/such/checkpoint"}, CheckpointError, "does not exist"),
    ({}, ConfigError, "checkpoint"),
    ({"checkpoint": "x", "think": "maybe"}, ConfigError, "think"),
    ({"checkpoint": "x", "greedy_thoughts": False, "n_thoughts": 0}, ConfigError, "n_thoughts"),
    ({"checkpoint": "x", "batch_size": -1}, ConfigError, "batch_size"),
    ({"checkpoint": "x", "colour": "red"}, ConfigError, "colour"),
])
def test_bad_model_arguments_are_one_line(args, error, word):
    with pytest.raises(error, match=word) as err:
        QuietStarLM(**args)
    assert "\n" not in str(err.value)


@pytest.mark.skipif(os.environ.get("QSTAR_SLOW") != "1",
                    reason="about 30 s (lm_eval indexes all its tasks); set QSTAR_SLOW=1")
def test_the_command_line_route(run, tmp_path):
    """``qstar-mini harness`` is lm_eval's command line with qstar-mini registered, in a real process."""
    ck, results, tasks = run
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "qstar_mini", "harness", "--model", "qstar-mini", "--model_args",
                           f"checkpoint={ck.path},think=false", "--tasks", "qstar_gsm_mc", "--include_path",
                           str(tasks), "--limit", str(LIMIT), "--device", "cpu", "--output_path", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    written = json.loads(next(out.rglob("results*.json")).read_text())
    assert written["results"]["qstar_gsm_mc"]["acc,none"] == results[False]["results"]["qstar_gsm_mc"]["acc,none"]


def test_generation_stops_at_a_stop_string_and_cuts_it_off(run):
    ck, _, _ = run
    lm = QuietStarLM(checkpoint=ck)
    context = gsm8k_prompt(read_jsonl(GSM)[1]["question"])
    request = lambda kwargs: Instance("generate_until", {}, (context, kwargs), 0)   # noqa: E731
    (full,) = lm.generate_until([request({"until": [], "max_gen_toks": 8})])
    assert len(full) >= 4, full
    stop = full[2:4]
    (cut,) = lm.generate_until([request({"until": [stop, "never"], "max_gen_toks": 8})])
    assert cut == full[: full.index(stop)]
    stopped = lm.generate_ids(lm._context(context), 8, until=[stop])
    assert len(stopped) == full.index(stop) + len(stop) < 8    # no token made after the stop string appeared


# ---- the shipped offline task: qstar_gsm8k_format -------------------------------------------------

def shipped_task(ck, think: bool, path=None):
    """The shipped task through lm_eval.simple_evaluate: (exact_match, samples in document order)."""
    out = lm_eval.simple_evaluate(
        model=QuietStarLM(checkpoint=ck, think=think, device="cpu"), tasks=["qstar_gsm8k_format"], limit=LIMIT,
        task_manager=task_manager(metadata={"path": str(path)} if path else None), bootstrap_iters=0, log_samples=True)
    samples = sorted(out["samples"]["qstar_gsm8k_format"], key=lambda s: s["doc_id"])
    return out["results"]["qstar_gsm8k_format"]["exact_match,qstar-mini-answer"], samples


@pytest.mark.parametrize("think", [True, False])
def test_the_shipped_gsm8k_format_task_is_qstar_minis_own_accuracy(run, think, tmp_path):
    """Offline (no Hub): the harness's exact_match and every generation equal gsm8k_eval's, on the
    project's file; then, with the model pushed towards the digit 4 and a copy of the file whose first
    answer is what it says, 1 of 3 right on both sides (not a trivial 0)."""
    ck, _, _ = run
    thinking = dict(meta=ck.meta, head=ck.head, cfg=ck.cfg) if think else dict(meta=ck.meta)
    records = read_jsonl(GSM)[:LIMIT]
    own = gsm8k_eval(ck.model, ck.tokenizer, records, limit=LIMIT, n_examples=LIMIT, **thinking)
    accuracy, samples = shipped_task(ck, think)
    assert [s["doc"]["question"] for s in samples] == [r["question"] for r in records]
    assert [s["resps"][0][0] for s in samples] == [e["generation"] for e in own["examples"]]
    assert [s["target"] for s in samples] == [r["answer"].rsplit("#### ", 1)[1] for r in records]
    assert accuracy == pytest.approx(own["accuracy"], abs=1e-4)            # gsm8k_eval rounds to 4 places
    four = ck.tokenizer.convert_tokens_to_ids("4")
    hook = ck.model.lm_head.register_forward_hook(lambda m, i, out: out + 30.0 * (torch.arange(out.shape[-1]) == four))
    try:
        said = gsm8k_eval(ck.model, ck.tokenizer, records[:1], limit=1, **thinking)["examples"][0]["predicted"]
        assert said and set(said) == {"4"}
        records[0] = dict(records[0], answer=f"{records[0]['answer'].rsplit('####', 1)[0]}#### {said}")
        (tmp_path / "gsm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        own = gsm8k_eval(ck.model, ck.tokenizer, records, limit=LIMIT, n_examples=LIMIT, **thinking)
        accuracy, samples = shipped_task(ck, think, tmp_path / "gsm.jsonl")
    finally:
        hook.remove()
    assert accuracy == pytest.approx(own["accuracy"], abs=1e-4) and own["accuracy"] == pytest.approx(1 / 3, abs=1e-4)
    assert [s["filtered_resps"][0] for s in samples] == [e["predicted"] for e in own["examples"]]
    assert samples[0]["target"] == said


def test_the_command_line_includes_the_shipped_tasks():
    assert _with_shipped_tasks(["--tasks", "qstar_gsm8k_format"])[-2:] == ["--include_path", str(TASKS_DIR)]
    assert _with_shipped_tasks(["--include_path", "mine"]) == ["--include_path", "mine"]
    assert _with_shipped_tasks([]) == []                         # no flags: lm_eval prints its help
    assert (TASKS_DIR / "qstar_gsm8k_format.yaml").is_file()


def test_qstar_mini_harness_hands_every_argument_to_lm_eval(monkeypatch):
    """`qstar-mini harness ARGS`: lm_eval's cli_evaluate() sees exactly ARGS (and the shipped tasks) in
    sys.argv, flags our parser does not know included, in order; sys.argv is restored after."""
    import lm_eval.__main__

    from qstar_mini import cli

    seen = []
    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", lambda: seen.append(list(sys.argv)))
    before = list(sys.argv)
    args = ["--model", "qstar-mini", "--model_args", "checkpoint=runs/x/checkpoint,think=false", "--tasks",
            "qstar_gsm8k_format", "--limit", "3", "--log_samples"]
    assert cli.main(["harness", *args]) == 0
    assert cli.main(["harness", "--", "--help"]) == 0
    assert seen == [["lm-eval", *args, "--include_path", str(TASKS_DIR)],
                    ["lm-eval", "--help", "--include_path", str(TASKS_DIR)]]
    assert sys.argv == before


def test_qstar_mini_harness_alone_prints_lm_evals_help(capsys):
    """The smallest form, lm_eval for real: no arguments, its help on stdout, exit status 0."""
    from qstar_mini import cli

    assert cli.main(["harness"]) == 0
    out = capsys.readouterr().out
    assert "lm-eval" in out and "--tasks" in out

"""A careless or unlucky user at the command line: more than a hundred bad command lines.

Every case runs ``qstar_mini.cli.main`` in-process against a copy of one finished two-step run
and checks the promises docs/troubleshooting.md makes:

- the exit status is 0 (done), 2 (refused, with ONE line on stderr naming the problem and the
  way out), 130 or 143 (interrupted) -- never a traceback;
- no file outside ``--out`` changed (the repository's data/, notebooks/, runs/, and the test's
  own folder around the run);
- when a command is refused, the run's checkpoint is byte-for-byte what it was.

Cases that are refused also say *why*: each carries a pattern its error line must match.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest

from qstar_mini import cli
from qstar_mini.files import write_manifest
from qstar_mini.paths import DATA_DIR, REPO_ROOT

REPO_WATCHED = [REPO_ROOT / "data", REPO_ROOT / "notebooks", REPO_ROOT / "runs"]
SMALL = ["--max-lines", "16", "--batch-size", "4", "--eval-every", "0", "--eval-lines", "2", "--no-progress"]
TRAIN = ["train", "--out", "{run}", "--steps", "2", *SMALL]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished two-step Quiet-STaR run (metrics + resumable checkpoint), made once."""
    out = tmp_path_factory.mktemp("matrix") / "run"
    assert cli.main([a.format(run=out) for a in TRAIN]) == 0
    return out


def _stat_tree(roots, skip: Path | None = None) -> dict:
    seen = {}
    for root in roots:
        if not root.exists():
            continue
        for p in sorted(root.rglob("*")):
            if skip is not None and (p == skip or skip in p.parents):
                continue
            if p.is_file():
                st = p.stat()
                seen[str(p)] = (st.st_size, st.st_mtime_ns)
    return seen


def _digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*")) if p.is_file()}


# ---- set-ups: each damages or prepares the copied run before the command -------------------

# The JSON edits rewrite the checkpoint's manifest as if the file had been saved that way, so
# the check of the file's content is what refuses it; the _damaged set-ups leave the manifest as
# it was, and the manifest refuses them.

def _json_edit(name, value):
    def setup(run: Path, tmp: Path):
        (run / "checkpoint" / name).write_text(json.dumps(value))
        write_manifest(run / "checkpoint")
    return setup


def _json_patch(name, **changes):
    def setup(run: Path, tmp: Path):
        path = run / "checkpoint" / name
        data = json.loads(path.read_text())
        for key, value in changes.items():
            if key == "lr" and name == "optimizer.json":
                data["param_groups"][0]["lr"] = value
            else:
                data[key] = value
        path.write_text(json.dumps(data))
        write_manifest(run / "checkpoint")
    return setup


def _damaged(name, how):
    """A file of the checkpoint damaged after it was saved (its manifest left as it was)."""
    def setup(run: Path, tmp: Path):
        path = run / "checkpoint" / name
        data = bytearray(path.read_bytes())
        if how == "xor":                            # 64 bytes in the middle: the size is unchanged
            middle = len(data) // 2
            data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
        elif how == "truncate":
            data = data[: len(data) // 2]
        path.write_bytes(bytes(data))
    return setup


def _bytes(name, payload: bytes):
    def setup(run: Path, tmp: Path):
        (tmp / name).write_bytes(payload)
    return setup


def _long_lines(name, n_lines: int, chars: int):
    def setup(run: Path, tmp: Path):
        words = ("the old lighthouse keeper climbed the stairs every evening " * (chars // 60 + 1))[:chars]
        (tmp / name).write_text("".join(json.dumps({"text": words}) + "\n" for _ in range(n_lines)))
    return setup


def _model_folder(*, config: dict | None = None, files: dict | None = None, base: bool = False,
                  without: tuple[str, ...] = ()):
    """{tmp}/model: the tiny base's files (base) but ``without``, its config.json changed
    (config), other files."""
    def setup(run: Path, tmp: Path):
        folder = tmp / "model"
        if base:
            shutil.copytree(REPO_ROOT / "data" / "tiny-base", folder)
            for name in without:
                (folder / name).unlink()
        folder.mkdir(exist_ok=True)
        if config is not None:
            values = json.loads((REPO_ROOT / "data" / "tiny-base" / "config.json").read_text())
            (folder / "config.json").write_text(json.dumps({**values, **config}))
        for name, payload in (files or {}).items():
            (folder / name).write_bytes(payload.replace(b"{folder}", str(folder).encode()))
    return setup


# Code that must never run, each creating a file "code-ran" if it did: a pickle (protocol 0,
# os.system("touch ...")) and a module that a config's auto_map names.
EVIL_PICKLE = b"cposix\nsystem\n(Vtouch {folder}/code-ran\ntR."
EVIL_MODULE = (b"import pathlib\npathlib.Path(__file__).with_name('code-ran').write_text('ran')\n"
               b"from transformers import MistralConfig as EvilConfig, MistralForCausalLM as EvilModel\n")
AUTO_MAP = {"auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}}


def _file(name, text):
    def setup(run: Path, tmp: Path):
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_text(text)
    return setup


def _edited_notebook(run: Path, tmp: Path):
    assert cli.main(["assignments", "--out", str(tmp / "release")]) == 0
    first = next(p for p in sorted((tmp / "release").glob("*.ipynb")) if "# YOUR CODE HERE" in p.read_text())
    first.write_text(first.read_text().replace("# YOUR CODE HERE", "x = 42  # a student's answer", 1))


def _no_state(run: Path, tmp: Path):
    (run / "checkpoint" / "trainer_state.json").unlink()


# ---- the cases: (id, argv, set-up, allowed exit codes, pattern of the error line) -----------

REFUSED = {2}
CASES = [
    # usage: the parser
    ("no-command", [], None, REFUSED, "no command given"),
    ("unknown-command", ["trian"], None, REFUSED, "invalid choice"),
    ("unknown-flag", ["train", "--stpes", "3"], None, REFUSED, "unrecognized"),
    ("missing-value", ["train", "--steps"], None, REFUSED, "expected one argument"),
    ("models-no-action", ["models"], None, REFUSED, "choose an action"),
    ("models-unknown", ["models", "fetch", "gpt5"], None, REFUSED, "gpt5"),
    ("eval-no-checkpoint", ["eval"], None, REFUSED, "required"),
    ("assignments-no-out", ["assignments"], None, REFUSED, "required"),
    ("pretrain-no-out", ["pretrain", "--steps", "1"], None, REFUSED, "--out"),
    ("bad-choice-mixing", [*TRAIN, "--mixing", "average"], None, REFUSED, "--mixing"),
    ("bad-choice-lines", [*TRAIN, "--lines", "some"], None, REFUSED, "--lines"),
    ("bad-choice-think-where", [*TRAIN, "--think-where", "middle"], None, REFUSED, "--think-where"),
    ("bad-choice-preset", [*TRAIN, "--preset", "huge"], None, REFUSED, "--preset"),
    ("bad-choice-dtype", ["eval", "--checkpoint", "{run}/checkpoint", "--dtype", "int8"], None, REFUSED, "--dtype"),
    ("bench-bad-profile", ["bench", "--profile", "fast"], None, REFUSED, "--profile"),
]

# numbers out of range: refused by the flag's type, before anything runs
for flag, value in [("--steps", "0"), ("--steps", "-1"), ("--steps", "two"), ("--batch-size", "0"),
                    ("--lr", "0"), ("--lr", "-1e-3"), ("--lr", "inf"), ("--lr", "nan"), ("--mixer-lr", "inf"),
                    ("--max-lines", "-1"), ("--max-lines", "0"), ("--eval-every", "-1"), ("--save-every", "-1"),
                    ("--save-every", "0"), ("--eval-lines", "0"), ("--grad-accum", "0"), ("--n-thoughts", "0"),
                    ("--thought-length", "0"), ("--n-true", "0"), ("--seq-len", "0"), ("--warmup-steps", "-1"),
                    ("--thought-temperature", "inf"), ("--thought-temperature", "0"),
                    ("--thought-temperature", "-1"), ("--policy-loss-weight", "nan"),
                    ("--base-loss-weight", "inf"), ("--weight-decay", "nan"), ("--embedding-scale", "inf"),
                    ("--seed", "1.5")]:
    CASES.append((f"train{flag}={value}", [*TRAIN, flag, value], None, REFUSED, flag))
for flag, value in [("--lines", "-1"), ("--lines", "0"), ("--gsm-limit", "-1"), ("--n-thoughts", "0"),
                    ("--batch-size", "0"), ("--seq-len", "-5")]:
    CASES.append((f"eval{flag}={value}", ["eval", "--checkpoint", "{run}/checkpoint", flag, value], None,
                  REFUSED, flag))
for flag, value in [("--n-train", "0"), ("--n-test", "-3"), ("--frac-working", "2"), ("--working-error", "-0.1")]:
    CASES.append((f"data{flag}={value}", ["data", "--out", "{tmp}/corpus", flag, value], None, REFUSED,
                  flag.lstrip("-").replace("-", "[-_]")))
for flag, value in [("--steps", "0"), ("--lr", "inf"), ("--batch-size", "-2"), ("--frac-working", "2")]:
    CASES.append((f"pretrain{flag}={value}", ["pretrain", "--out", "{tmp}/base", flag, value], None, REFUSED,
                  flag.lstrip("-").replace("-", "[-_]")))
for flag, value in [("--show", "-3"), ("--n", "0")]:
    CASES.append((f"demo{flag}={value}", ["demo", "--base-only", flag, value], None, REFUSED, flag))

CASES += [
    # settings that contradict each other
    ("no-think+shuffle", [*TRAIN, "--overwrite", "--no-think", "--shuffle-rewards"], None, REFUSED, "shuffle"),
    ("no-think+no-policy", [*TRAIN, "--overwrite", "--no-think", "--no-policy"], None, REFUSED, "no-policy"),
    ("shuffle+no-policy", [*TRAIN, "--overwrite", "--shuffle-rewards", "--no-policy"], None, REFUSED, "no-policy"),
    # devices that are not there: refused, never a silent CPU run
    ("train-device-bogus", [*TRAIN, "--overwrite", "--device", "bogus"], None, REFUSED, "--device"),
    ("train-device-tpu", [*TRAIN, "--overwrite", "--device", "xla"], None, REFUSED, "--device"),
    ("eval-device-bogus", ["eval", "--checkpoint", "{run}/checkpoint", "--device", "gpu0"], None, REFUSED, "--device"),
    ("demo-device-bogus", ["demo", "--base-only", "--device", "bogus"], None, REFUSED, "--device"),
    ("bench-sizes-empty", ["bench", "--sizes", ""], None, REFUSED, "--sizes"),
    ("bench-sizes-unknown", ["bench", "--sizes", "tiny,7b"], None, REFUSED, "--sizes"),
    ("bench-json-proc", ["bench", "--json", "/proc/qstar/b.json"], None, REFUSED, "--json"),
    ("bench-json-dir", ["bench", "--json", "{tmp}"], None, REFUSED, "--json"),
    # the run folder: nothing overwritten, nothing resumed wrongly
    ("rerun-without-resume", TRAIN, None, REFUSED, "already holds a run"),
    ("rerun-bad-lr-keeps-metrics", [*TRAIN, "--lr", "inf"], None, REFUSED, "--lr"),
    ("resume-other-model", [*TRAIN, "--resume", "--model", str(REPO_ROOT / "data" / "tiny-base-noisy")], None,
     REFUSED, "model"),
    ("resume-missing-model", [*TRAIN, "--resume", "--model", "/nonexistent/model"], None, REFUSED, "model"),
    ("resume-other-think-where", [*TRAIN, "--resume", "--think-where", "answer"], None, REFUSED, "think_where"),
    ("resume-other-lines", [*TRAIN, "--resume", "--lines", "all"], None, REFUSED, "lines"),
    ("resume-other-shuffle", [*TRAIN, "--resume", "--shuffle-rewards"], None, REFUSED, "shuffle_rewards"),
    ("resume-other-max-lines", [*TRAIN, "--resume", "--max-lines", "12"], None, REFUSED, "max_lines"),
    ("resume-other-data", [*TRAIN, "--resume", "--data", str(DATA_DIR / "validation.jsonl")], None, REFUSED, "data"),
    ("resume-other-lr", [*TRAIN, "--resume", "--lr", "0.5"], None, REFUSED, "lr"),
    ("resume-fewer-steps", [*TRAIN, "--resume", "--steps", "1"], None, REFUSED, "steps"),
    ("resume-typo-out", ["train", "--out", "{tmp}/rnu", "--resume", "--steps", "2", *SMALL], None, REFUSED,
     "nothing to resume"),
    ("resume-no-state", [*TRAIN, "--resume"], _no_state, REFUSED, "nothing to resume"),
    ("resume-state-no-step", [*TRAIN, "--resume"], _json_edit("trainer_state.json", {"evals": []}), REFUSED, "step"),
    ("resume-state-string-step", [*TRAIN, "--resume"], _json_patch("trainer_state.json", step="2"), REFUSED, "step"),
    ("resume-state-list", [*TRAIN, "--resume"], _json_edit("trainer_state.json", [1, 2]), REFUSED, "step"),
    ("resume-state-not-json", [*TRAIN, "--resume"], _file("run/checkpoint/trainer_state.json", "{oops"), REFUSED,
     "trainer_state"),
    ("resume-optimizer-groups-5", [*TRAIN, "--resume"], _json_patch("optimizer.json", param_groups=5), REFUSED,
     "optimizer"),
    ("resume-optimizer-string-lr", [*TRAIN, "--resume"], _json_patch("optimizer.json", lr="fast"), REFUSED,
     "optimizer"),
    ("resume-config-list", [*TRAIN, "--resume"], _json_edit("qstar_config.json", [1, 2]), REFUSED, "qstar_config"),
    ("resume-scheduler-empty", [*TRAIN, "--resume"], _json_edit("scheduler.json", {}), REFUSED, "scheduler"),
    ("resume-scheduler-list", [*TRAIN, "--resume"], _json_edit("scheduler.json", []), REFUSED, "scheduler"),
    # outputs that cannot be written: refused before the work
    ("out-is-file", ["train", "--out", "{tmp}/afile", "--steps", "2", *SMALL], _file("afile", "x"), REFUSED,
     "not a folder"),
    ("out-under-file", ["train", "--out", "{tmp}/afile/run", "--steps", "2", *SMALL], _file("afile", "x"), REFUSED,
     "afile"),
    ("out-under-proc", ["train", "--out", "/proc/qstar/run", "--steps", "2", *SMALL], None, REFUSED, "--out"),
    ("data-out-file", ["data", "--out", "{tmp}/afile"], _file("afile", "x"), REFUSED, "not a folder"),
    ("data-out-proc", ["data", "--out", "/proc/qstar"], None, REFUSED, "qstar"),
    ("data-default-out-other-corpus", ["data", "--seed", "7"], None, REFUSED, "--overwrite"),
    ("pretrain-into-tiny-base", ["pretrain", "--out", str(REPO_ROOT / "data" / "tiny-base"), "--steps", "1"], None,
     REFUSED, "--overwrite"),
    ("pretrain-out-proc", ["pretrain", "--out", "/proc/qstar", "--steps", "1"], None, REFUSED, "--out"),
    ("assignments-over-edited", ["assignments", "--out", "{tmp}/release"], _edited_notebook, REFUSED, "--overwrite"),
    ("assignments-out-proc", ["assignments", "--out", "/proc/qstar"], None, REFUSED, "qstar"),
    ("assignments-no-notebooks", ["assignments", "--out", "{tmp}/rel", "--notebooks", "{tmp}/none"], None, REFUSED,
     "notebooks"),
    ("eval-json-proc", ["eval", "--checkpoint", "{run}/checkpoint", "--json", "/proc/qstar/r.json"], None, REFUSED,
     "--json"),
    ("eval-json-dir", ["eval", "--checkpoint", "{run}/checkpoint", "--json", "{tmp}"], None, REFUSED, "--json"),
    # configs and data that are not what they claim
    ("config-missing", [*TRAIN, "--config", "{tmp}/nope.yaml"], None, REFUSED, "does not exist"),
    ("config-dir", [*TRAIN, "--config", "{tmp}"], None, REFUSED, "--config"),
    ("config-not-yaml", [*TRAIN, "--config", "{tmp}/c.yaml"], _file("c.yaml", "lr: [1,"), REFUSED, "YAML"),
    ("config-list", [*TRAIN, "--config", "{tmp}/c.yaml"], _file("c.yaml", "- 1\n- 2\n"), REFUSED, "mapping"),
    ("config-unknown-key", [*TRAIN, "--config", "{tmp}/c.yaml"], _file("c.yaml", "lrate: 0.1\n"), REFUSED, "lrate"),
    ("config-lr-word", [*TRAIN, "--config", "{tmp}/c.yaml"], _file("c.yaml", "lr: fast\n"), REFUSED, "lr"),
    ("config-n-true-float", [*TRAIN, "--config", "{tmp}/c.yaml"], _file("c.yaml", "n_true: 2.5\n"), REFUSED, "n_true"),
    ("data-missing-file", [*TRAIN, "--overwrite", "--data", "{tmp}/none.jsonl"], None, REFUSED, "none.jsonl"),
    ("data-empty-file", [*TRAIN, "--overwrite", "--data", "{tmp}/e.jsonl"], _file("e.jsonl", ""), REFUSED, "e.jsonl"),
    ("data-not-json", [*TRAIN, "--overwrite", "--data", "{tmp}/b.jsonl"], _file("b.jsonl", "{nope\n"), REFUSED,
     "b.jsonl"),
    ("data-no-text-field", [*TRAIN, "--overwrite", "--data", "{tmp}/q.jsonl"], _file("q.jsonl", '{"q": "1"}\n'),
     REFUSED, "text"),
    ("data-unknown-dataset", [*TRAIN, "--overwrite", "--data", "nosuchdataset_qstar"], None, REFUSED,
     "nosuchdataset_qstar"),
    ("model-missing", [*TRAIN, "--overwrite", "--model", "{tmp}/nomodel"], None, REFUSED, "nomodel"),
    ("eval-missing-checkpoint", ["eval", "--checkpoint", "{tmp}/none"], None, REFUSED, "none"),
    ("eval-incomplete-checkpoint", ["eval", "--checkpoint", "{tmp}"], None, REFUSED, "incomplete|does not"),
    ("eval-control-is-quiet-star", ["eval", "--checkpoint", "{run}/checkpoint", "--control", "{run}/checkpoint",
                                    "--lines", "4"], None, REFUSED, "--control"),
    ("eval-gsm-no-question", ["eval", "--checkpoint", "{run}/checkpoint", "--lines", "4", "--gsm8k", "{tmp}/g.jsonl"],
     _file("g.jsonl", '{"text": "1+1=2"}\n'), REFUSED, "question"),
    ("eval-data-missing", ["eval", "--checkpoint", "{run}/checkpoint", "--data", "{tmp}/none.jsonl"], None, REFUSED,
     "none.jsonl"),
    # damaged checkpoints: the manifest names the file
    ("resume-xor-weights", [*TRAIN, "--resume"], _damaged("model.safetensors", "xor"), REFUSED,
     "model.safetensors differs from the manifest"),
    ("eval-xor-weights", ["eval", "--checkpoint", "{run}/checkpoint", "--lines", "2"],
     _damaged("model.safetensors", "xor"), REFUSED, "model.safetensors differs"),
    ("resume-truncated-optimizer", [*TRAIN, "--resume"], _damaged("optimizer.safetensors", "truncate"), REFUSED,
     "optimizer.safetensors"),
    ("resume-xor-rng", [*TRAIN, "--resume"], _damaged("rng.safetensors", "xor"), REFUSED, "rng.safetensors"),
    ("resume-manifest-not-json", [*TRAIN, "--resume"], _file("run/checkpoint/manifest.json", "{oops"), REFUSED,
     "manifest.json"),
    ("resume-config-lr-word", [*TRAIN, "--resume"], _json_patch("qstar_config.json", lr="fast"), REFUSED,
     "lr must be a number"),
    ("resume-config-think-int", [*TRAIN, "--resume"], _json_patch("qstar_config.json", think=1), REFUSED,
     "think must be true or false"),
    ("eval-state-list", ["eval", "--checkpoint", "{run}/checkpoint", "--lines", "2"],
     _json_edit("trainer_state.json", [1, 2]), REFUSED, "trainer_state.json"),
    ("eval-state-model-number", ["eval", "--checkpoint", "{run}/checkpoint", "--lines", "2"],
     _json_patch("trainer_state.json", model=5), REFUSED, "--base"),
    ("eval-config-steps-float", ["eval", "--checkpoint", "{run}/checkpoint", "--lines", "2"],
     _json_patch("qstar_config.json", steps=2.5), REFUSED, "steps must be an integer"),
    # hostile data: refused in one line, or cut to what was asked
    ("train-data-binary", [*TRAIN, "--overwrite", "--data", "{tmp}/b.jsonl"],
     _bytes("b.jsonl", bytes(range(256)) * 64), REFUSED, "UTF-8|not valid JSON"),
    ("eval-data-binary", ["eval", "--checkpoint", "{run}/checkpoint", "--data", "{tmp}/b.jsonl"],
     _bytes("b.jsonl", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 64), REFUSED, "UTF-8"),
    ("train-data-1mb-line", [*TRAIN, "--overwrite", "--data", "{tmp}/long.jsonl"],
     _long_lines("long.jsonl", 1, 1_000_000), {0}, None),
    ("eval-data-1mb-line", ["eval", "--checkpoint", "{run}/checkpoint", "--data", "{tmp}/long.jsonl",
                            "--lines", "2", "--seq-len", "32", "--n-thoughts", "1"],
     _long_lines("long.jsonl", 1, 1_000_000), {0}, None),
    ("train-data-100k-lines", [*TRAIN, "--overwrite", "--data", "{tmp}/many.jsonl"],
     _long_lines("many.jsonl", 100_000, 20), {0}, None),
    # --model at things that are no model; a model's own code never runs
    ("model-random-folder", [*TRAIN, "--overwrite", "--model", "{tmp}/model"],
     _model_folder(files={"notes.txt": b"hello", "weights.dat": bytes(range(256))}), REFUSED, "config.json"),
    ("model-single-file", [*TRAIN, "--overwrite", "--model", "{tmp}/model.safetensors"],
     _bytes("model.safetensors", (REPO_ROOT / "data" / "tiny-base" / "model.safetensors").read_bytes()),
     REFUSED, "config.json"),
    ("model-pickle-only", [*TRAIN, "--overwrite", "--model", "{tmp}/model"],
     _model_folder(base=True, without=("model.safetensors",), files={"pytorch_model.bin": EVIL_PICKLE}), REFUSED,
     r"holds only pickle weights \(pytorch_model\.bin\); qstar_mini loads safetensors only"),
    ("model-auto-map-known-type", [*TRAIN, "--overwrite", "--model", "{tmp}/model"],
     _model_folder(base=True, config=AUTO_MAP, files={"evil.py": EVIL_MODULE}), {0, 2}, None),
    ("model-auto-map-own-type", [*TRAIN, "--overwrite", "--model", "{tmp}/model"],
     _model_folder(base=True, config={**AUTO_MAP, "model_type": "evil_lm"}, files={"evil.py": EVIL_MODULE}),
     REFUSED, "custom code"),
    # what is allowed stays allowed
    ("resume-same-settings", [*TRAIN, "--resume"], None, {0}, None),
    ("resume-extends-steps", [*TRAIN, "--resume", "--steps", "3"], None, {0}, None),
    ("overwrite-replaces", [*TRAIN, "--overwrite", "--steps", "1"], None, {0}, None),
    ("config-lr-as-string", [*TRAIN, "--overwrite", "--steps", "1", "--config", "{tmp}/c.yaml"],
     _file("c.yaml", "lr: 1e-3\nmixer_lr: '1e-3'\n"), {0}, None),
    ("data-same-corpus", ["data", "--out", "{tmp}/corpus"], None, {0}, None),
    ("help", ["train", "--help"], None, {0}, None),
]


@pytest.mark.parametrize("name, argv, setup, codes, pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_command_line(name, argv, setup, codes, pattern, finished_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    if setup is not None:
        setup(run, tmp_path)
    argv = [a.format(run=run, tmp=tmp_path) for a in argv]
    before_ckpt = _digest(run / "checkpoint") if (run / "checkpoint").is_dir() else {}
    before_metrics = (run / "metrics.jsonl").read_bytes() if (run / "metrics.jsonl").exists() else None
    out = Path(argv[argv.index("--out") + 1]) if "--out" in argv else None
    repo_before = _stat_tree(REPO_WATCHED)
    local_before = _stat_tree([tmp_path], skip=out)
    capsys.readouterr()
    try:
        code = cli.main(argv)
    except SystemExit as e:               # --help exits through argparse
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert code in codes, f"exit {code}, stderr: {err}"
    if code == 2:
        lines = [line for line in err.splitlines() if line.startswith("qstar-mini: error:")]
        assert len(lines) == 1, err
        chatter = [line for line in err.splitlines() if line.strip() and line not in lines and "%|" not in line]
        assert not chatter, f"more than the one line (progress bars aside): {chatter}"
        assert pattern is None or re.search(pattern, lines[0]), lines[0]
        assert _digest(run / "checkpoint") == before_ckpt if before_ckpt else True
        if before_metrics is not None:
            assert (run / "metrics.jsonl").read_bytes() == before_metrics
    assert _stat_tree(REPO_WATCHED) == repo_before, "a file in the repository changed"
    assert not list(tmp_path.rglob("code-ran")), "a model's own code ran"
    assert _stat_tree([tmp_path], skip=out) == local_before, "a file outside --out changed"


def test_the_matrix_is_large_enough():
    assert len(CASES) >= 100


def test_a_full_disk_at_the_save_is_one_line_and_keeps_the_last_checkpoint(finished_run, tmp_path, capsys,
                                                                          monkeypatch):
    """The disk fills up while the extended run saves: one line, exit 2, and the checkpoint
    folder is still the complete previous one (the new one was being written beside it)."""
    import errno

    import qstar_mini.runs.checkpoint as checkpoint

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = _digest(run / "checkpoint")

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(run / "checkpoint.tmp"))

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    capsys.readouterr()
    code = cli.main([a.format(run=run) for a in [*TRAIN, "--resume", "--steps", "3"]])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("qstar-mini: error:")]
    assert code == 2 and len(lines) == 1 and "No space left on device" in lines[0], err
    assert "Traceback" not in err
    assert _digest(run / "checkpoint") == before
    assert not [p.name for p in run.iterdir() if p.name.startswith(".checkpoint")]

"""The learner's stack: what we save loads on the lowest transformers we declare, the matrix's low
row is exactly pyproject's floor, and docs/compatibility.md's table is the matrix's own output.

The lowest transformers runs beside this environment's torch from a `pip install --target` folder
(`make test` prepares it: scripts/compat.py lowest-transformers .compat/lowest-transformers).
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from qstar_mini.runs.checkpoint import save_checkpoint
from qstar_mini.config import tiny
from qstar_mini.files import make_portable
from qstar_mini.models.tiny import build_tokenizer, load_model
from qstar_mini.paths import TINY_BASE, TINY_BASE_NOISY
from qstar_mini.step import prepare_model

ROOT = Path(__file__).resolve().parent.parent
LOWEST = ROOT / ".compat" / "lowest-transformers"
TEXT = "12+34=46. 7*8=56"

spec = importlib.util.spec_from_file_location("compat", ROOT / "scripts" / "compat.py")
compat = sys.modules["compat"] = importlib.util.module_from_spec(spec)     # dataclasses look it up
spec.loader.exec_module(compat)

# Loads each folder named on the command line with whatever transformers is first on the path and
# prints, per folder, the tokenizer's class and ids of TEXT and the model's logits at them.
PROBE = f"""
import json, sys, warnings
warnings.simplefilter("ignore")
import torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
out = {{"version": transformers.__version__}}
for folder in sys.argv[1:]:
    try:
        tok = AutoTokenizer.from_pretrained(folder)
        ids = tok({TEXT!r})["input_ids"]
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        out[folder] = {{"ids": ids, "logits": logits.tolist()}}
    except Exception as e:
        out[folder] = {{"error": f"{{type(e).__name__}}: {{e}}"}}
print(json.dumps(out))
"""


def probe_lowest(folders) -> dict:
    """The PROBE's answer under the lowest transformers (subprocess, PYTHONPATH=LOWEST)."""
    if not (LOWEST / ".stamp").exists():
        pytest.skip(f"{LOWEST} is missing: `make test` prepares it "
                    f"(python scripts/compat.py lowest-transformers {LOWEST})")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(LOWEST), str(ROOT)]))
    out = subprocess.run([sys.executable, "-c", PROBE, *map(str, folders)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    low = next(p for p in compat.BY_NAME["low"].pins if p.startswith("transformers=="))
    assert result.pop("version") == low.split("==")[1]
    return result


def here(folder) -> dict:
    """The same as the PROBE, with this environment's transformers."""
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(TEXT)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return {"ids": ids, "logits": model(torch.tensor([ids])).logits[0]}


def assert_same(folder, low: dict) -> None:
    assert "error" not in low, f"{folder}: {low['error']}"
    mine = here(folder)
    assert low["ids"] == mine["ids"], folder
    torch.testing.assert_close(torch.tensor(low["logits"]), mine["logits"], rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint saved now, the way training saves one."""
    model, tok = load_model(TINY_BASE)
    cfg = tiny()
    meta, head = prepare_model(model, tok, cfg)
    path = tmp_path_factory.mktemp("compat") / "ck"
    save_checkpoint(path, model, tok, meta, head, cfg)
    return path


def smollm2_folder():
    from qstar_mini.models.pretrained import model_dir
    folder = model_dir("smollm2")
    return folder if (folder / "config.json").exists() else None


def test_every_saved_artefact_loads_the_same_under_the_lowest_transformers(checkpoint):
    folders = [TINY_BASE, TINY_BASE_NOISY, checkpoint]
    real = smollm2_folder()
    if real is not None:                     # make test fetches it; pytest alone may not have it
        folders.append(real)
    low = probe_lowest(folders)
    for folder in folders:
        assert_same(folder, low[str(folder)])


def test_a_folder_saved_the_transformers_5_way_fails_there(tmp_path):
    """What the low-end row would catch: the tokenizer class that 4.57 lacks, and a RoPE base
    written only inside rope_parameters (4.57 silently uses its default, 10000)."""
    if not build_tokenizer().__class__.__name__ == "TokenizersBackend":
        pytest.skip("this transformers already saves the portable names")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=90, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, rope_parameters={"rope_type": "default",
                                                                                 "rope_theta": 500.0}))
    raw, portable = tmp_path / "raw", tmp_path / "portable"
    for folder in (raw, portable):
        model.save_pretrained(folder)
        build_tokenizer().save_pretrained(folder)
    make_portable(portable)
    cfg = json.loads((raw / "config.json").read_text())
    cfg["rope_parameters"]["rope_theta"] = 500.0
    assert "rope_theta" not in cfg
    no_class = tmp_path / "rope-only"               # the tokenizer made portable, the config not
    no_class.mkdir()
    for name in ("model.safetensors", "tokenizer.json"):
        (no_class / name).write_bytes((raw / name).read_bytes())
    (no_class / "config.json").write_text(json.dumps(cfg))
    (no_class / "tokenizer_config.json").write_text((portable / "tokenizer_config.json").read_text())

    low = probe_lowest([raw, portable, no_class])
    assert "TokenizersBackend" in low[str(raw)]["error"]
    assert_same(portable, low[str(portable)])
    with pytest.raises(AssertionError):           # loads, but with another RoPE base: other logits
        assert_same(no_class, low[str(no_class)])


def floors() -> dict:
    text = (ROOT / "pyproject.toml").read_text()       # no tomllib on Python 3.10, the low row's
    found = {"python": re.search(r'^requires-python = ">=([\d.]+)"$', text, re.M)[1]}
    for name, version in re.findall(r'^    "(torch|transformers)>=([\d.]+)[,"]', text, re.M):
        found[name] = version
    return found


def test_the_low_row_is_exactly_the_declared_floor():
    low = compat.BY_NAME["low"]
    pins = dict(p.split("==") for p in low.pins)
    assert floors() == {"python": low.python, "torch": pins["torch"], "transformers": pins["transformers"]}


def test_compatibility_page_shows_the_matrix_output():
    results = compat.load_results()            # rows never run show as "not run"
    page = (ROOT / "docs" / "compatibility.md").read_text()
    table = re.search(r"<!-- compat-table -->\n(.*?)\n<!-- /compat-table -->", page, re.S)
    assert table, "docs/compatibility.md has no compat-table markers"
    assert table[1] == compat.render_table(results)
    assert {r["row"] for r in results} <= {r.name for r in compat.ROWS}, "a result of a row that no longer exists"

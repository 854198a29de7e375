"""The documentation site builds with ``mkdocs build --strict`` (broken links, bad docstrings fail),
and the snippets of docs/integrations.md run here (one CPU process, nothing downloaded) or name the
test that mirrors them on several ranks."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_mkdocs_builds_strict(tmp_path):
    if shutil.which("mkdocs", path=str(Path(sys.executable).parent)) is None and shutil.which("mkdocs") is None:
        pytest.skip("mkdocs is not installed (pip install -e '.[docs]')")
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, NO_MKDOCS_2_WARNING="1"))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (tmp_path / "site" / "api" / "index.html").read_text().count("ShardedFusedAdam") > 10


def test_readme_commands_match_ci():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = [line for line in ci.splitlines() if line.startswith("python3 -m venv")][0]
    assert test_command in readme, "the README's test command and .ci/run have drifted apart"


# ---- docs/integrations.md: every snippet runs here or names the test that mirrors it ----------------

INTEGRATIONS = ROOT / "docs" / "integrations.md"
OUR_ACC_OPTIMIZER = "optimizer = sfa_acc.make_optimizer(accelerator, model.parameters(), lr=3e-4, weight_decay=0.1)"
TORCH_ACC_OPTIMIZER = "optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, fused=True)"
# The Trainer snippet leaves the run's length and logging to the reader (`...`); the test fills them in.
TRAINER_FILL = ('use_cpu=True, max_steps=4, per_device_train_batch_size=2, save_strategy="no", report_to="none", '
                'seed=0, disable_tqdm=True')
# What a single CPU process cannot show (several ranks, a launcher, a DeepSpeed engine) is in these tests.
MIRRORS = {
    "Trainer": "test_trainer_matches_torch_adamw_and_resumes_bitwise",
    "Trainer with a DeepSpeed config": "test_trainer_deepspeed_stage0_register_alone",
    "Accelerate": "test_accelerate_save_state_writes_the_model_and_load_state_resumes_bitwise",
}

# A fresh process: Accelerate's state singletons and register()'s bindings stay out of pytest.
_CHILD = r"""
import json, sys
import torch, transformers
from accelerate.state import AcceleratorState, GradientState
from sharded_fused_adam.integrations import deepspeed as sfa_ds

snippets = json.loads(sys.argv[1])


def run(code):
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0))
    start = [p.detach().clone() for p in model.parameters()]
    ids = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(1))
    dataset = [dict(input_ids=t, labels=t) for t in ids]
    namespace = dict(torch=torch, transformers=transformers, TrainingArguments=transformers.TrainingArguments,
                     model=model, dataset=dataset, loader=torch.utils.data.DataLoader(dataset, batch_size=2))
    exec(compile(code, "docs/integrations.md", "exec"), namespace)
    trainer = namespace.get("trainer")
    trained = trainer.model if trainer else namespace["accelerator"].unwrap_model(namespace["model"])
    optimizer = trainer.optimizer if trainer else namespace["optimizer"]
    return [p.detach().clone() for p in trained.parameters()], start, type(optimizer.optimizer).__name__


result = dict(registered=sfa_ds.register(json.loads(snippets.pop("ds_config")))["optimizer"]["type"])
for name, (snippet, torch_snippet) in snippets.items():
    ours, start, our_type = run(snippet)
    ref, _, ref_type = run(torch_snippet)
    result[name] = dict(types=[our_type, ref_type], differing=sum(not torch.equal(p, q) for p, q in zip(ours, ref)),
                        moved=sum(not torch.equal(p, q) for p, q in zip(ours, start)), params=len(ours))
print(json.dumps(result))
"""


def _code_blocks(page: str) -> dict[str, list[tuple[str, str]]]:
    """A page's fenced code blocks, as (language, code), by the ``## `` section they are in."""
    blocks: dict[str, list[tuple[str, str]]] = {}
    for section in page.split("\n## ")[1:]:
        title, body = section.split("\n", 1)
        fenced = [chunk.split("\n", 1) for chunk in body.split("```")[1::2]]
        blocks[title.strip()] = [(language.strip(), code) for language, code in fenced]
    return blocks


def test_integrations_snippets_name_a_multi_rank_test_that_mirrors_them():
    blocks = _code_blocks(INTEGRATIONS.read_text())
    with_code = {title for title, found in blocks.items() if found}
    assert with_code == set(MIRRORS), "a section of docs/integrations.md with a snippet names no mirror test here"
    tests = "".join(path.read_text() for path in (ROOT / "tests").glob("test_*.py"))
    page = INTEGRATIONS.read_text()
    for test in MIRRORS.values():
        assert f"def {test}(" in tests and f"`{test}`" in page, test
    for example in ("examples/hf/train_trainer.py", "examples/hf/train_accelerate.py",
                    "examples/hf/ds_config_trainer.json"):  # the page's example commands, run by test_hf_integrations
        assert example in page and (ROOT / example).exists(), example
        assert Path(example).name in (ROOT / "tests" / "test_hf_integrations.py").read_text(), example


def test_integrations_snippets_run_on_cpu_bitwise_vs_torch(tmp_path):
    """The Accelerate loop as written and the Trainer snippet (its `...` filled in) in one CPU
    process, each next to the same code with torch's fused AdamW (the stock Trainer with
    `optim="adamw_torch_fused"`); the DeepSpeed section's JSON goes through `sfa_ds.register`.
    One process averages nothing, so the runs are bitwise equal."""
    pytest.importorskip("accelerate")
    pytest.importorskip("transformers")
    blocks = _code_blocks(INTEGRATIONS.read_text())
    (_, accelerate), = blocks["Accelerate"]
    (_, trainer), = blocks["Trainer"]
    (_, ds_config), = [block for block in blocks["Trainer with a DeepSpeed config"] if block[0] == "json"]
    assert OUR_ACC_OPTIMIZER in accelerate and "cpu=True" in accelerate
    assert trainer.count(", ...)") == 1 and trainer.count("sfa_hf.Trainer(") == 1, trainer
    trainer = trainer.replace(", ...)", f", {TRAINER_FILL})")
    snippets = dict(
        ds_config=ds_config,
        accelerate=[accelerate, accelerate.replace(OUR_ACC_OPTIMIZER, TORCH_ACC_OPTIMIZER)],
        trainer=[trainer, trainer.replace("sfa_hf.Trainer(", "transformers.Trainer(").replace(
            TRAINER_FILL, TRAINER_FILL + ', optim="adamw_torch_fused"')])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               DS_ACCELERATOR="cpu")
    run = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(snippets)], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result.pop("registered") == "ShardedFusedAdamW"
    assert result["accelerate"]["types"] == ["ShardedFusedAdamW", "AdamW"], result
    assert result["trainer"]["types"] == ["ShardedFusedAdamW", "AdamW"], result
    for name, r in result.items():  # every param trained, and exactly as torch's
        assert r["moved"] == r["params"] and r["differing"] == 0, (name, r)

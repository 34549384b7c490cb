"""The package's shape is checked, not just described: layers, no cycles, no private names across modules, and a
command line whose help does not load torch."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "thumbalign"


def test_import_contracts_hold():
    """import-linter: each layer imports only those below it; no cycles among the modules of any package."""
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint)], capture_output=True, text=True, cwd=PACKAGE.parents[1], timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[:len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def test_no_private_name_crosses_a_module_boundary():
    """`from thumbalign.x import _helper` or `x._helper` from another module means the helper is not private."""
    crossings = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module, tree = _module_name(path), ast.parse(path.read_text())
        imported_modules = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                source = _resolve(module, node, path.name == "__init__.py")
                if not source.startswith("thumbalign"):
                    continue
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        crossings.append(f"{module} imports {source}.{alias.name}")
                    imported_modules[alias.asname or alias.name] = f"{source}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("thumbalign"):
                        imported_modules[alias.asname or alias.name.split(".")[0]] = alias.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and isinstance(node.value, ast.Name) and node.value.id in imported_modules):
                crossings.append(f"{module} uses {imported_modules[node.value.id]}.{node.attr}")
    assert not crossings, crossings


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["reward", "train", "--help"], ["online", "--help"],
                                  ["methods"], ["config", "--method", "kto"]])
def test_help_does_not_load_torch(argv):
    code = ("import sys\nfrom thumbalign.cli import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            "print('TORCH LOADED' if 'torch' in sys.modules else 'no torch')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    # the method files, read for their settings at every --help and listed by `methods`, defer torch (methods/lazy.py)
    assert result.stdout.strip().splitlines()[-1] == "no torch", result.stdout + result.stderr


def test_every_method_is_one_file_found_by_the_registry():
    """A method is found because its file exists: the registry names no method."""
    from thumbalign.methods.registry import methods

    registry_source = (PACKAGE / "methods" / "registry.py").read_text()
    found = methods()
    assert {"bco", "kto", "apo-zero", "una", "sft-positive", "dpo", "ipo", "bco-pair"} <= set(found)
    for name, cls in found.items():
        assert f'"{name}"' not in registry_source
        assert cls.__module__.startswith("thumbalign.methods.")


def _readme_method_example() -> str:
    readme = (PACKAGE.parents[1] / "README.md").read_text()
    section = readme.split("## Adding a method", 1)[1]
    return section.split("```python", 1)[1].split("```", 1)[0]


def test_the_readme_recipe_for_a_new_method_works(tmp_path, tiny_llama, monkeypatch, capsys):
    """The 'Adding a method' example, dropped into the methods package as one file, is found, listed with its
    setting, and trains — in process, and from the command line with its own flag."""
    import torch

    import thumbalign.methods
    from conftest import toy_feedback, write_jsonl
    from thumbalign.cli import main
    from thumbalign.methods import registry
    from thumbalign.trainers.config import TrainConfig
    from thumbalign.trainers.policy import train

    extra = tmp_path / "extra_methods"
    extra.mkdir()
    (extra / "hinge.py").write_text(_readme_method_example())
    monkeypatch.setattr(thumbalign.methods, "__path__", [*thumbalign.methods.__path__, str(extra)])
    monkeypatch.delitem(sys.modules, "thumbalign.methods.hinge", raising=False)
    registry.methods.cache_clear()
    try:
        found = registry.methods()
        assert "hinge" in found
        module = sys.modules["thumbalign.methods.hinge"]
        out = module.hinge_loss(torch.tensor([-1.0, -4.0]), torch.tensor([-2.0, -2.0]), torch.tensor([True, False]),
                                beta=0.5)
        assert out.losses.tolist() == pytest.approx([max(0, 1 - 0.5), max(0, 1 - 1.0)])
        out = module.hinge_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([True]), beta=0.5, margin=2.0)
        assert out.losses.tolist() == pytest.approx([2.0 - 0.5])
        assert main(["methods"]) == 0
        assert "--hinge-margin 1.0" in capsys.readouterr().out
        data = write_jsonl(tmp_path / "f.jsonl", toy_feedback(8))
        summary = train(TrainConfig(data=str(data), model=str(tiny_llama), method="hinge", max_steps=2,
                                    per_device_train_batch_size=4, bf16="false", output_dir=str(tmp_path / "run"),
                                    report=False), log=lambda *a: None)
        assert summary["method"] == "hinge" and summary["steps"] == 2
    finally:
        registry.methods.cache_clear()
    # a real command line, in a process whose settings are built with the new file in the package
    launcher = ("import sys, thumbalign.methods as m; m.__path__.append(sys.argv.pop(1)); "
                "from thumbalign.cli import main; sys.exit(main(sys.argv[1:]))")
    common = ["--data", str(data), "--model", str(tiny_llama), "--method", "hinge", "--max-steps", "2",
              "--per-device-train-batch-size", "4", "--bf16", "false", "--no-report"]
    done = subprocess.run([sys.executable, "-c", launcher, str(extra), "train", *common, "--hinge-margin", "0.5",
                           "--output-dir", str(tmp_path / "cli")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "hinge_margin: 0.5" in (tmp_path / "cli" / "run_config.yaml").read_text()
    refused = subprocess.run([sys.executable, "-c", launcher, str(extra), "train", *common, "--hinge-margin", "-1",
                              "--output-dir", str(tmp_path / "bad")], capture_output=True, text=True)
    assert refused.returncode != 0 and "hinge_margin must be > 0" in refused.stderr
    foreign = subprocess.run([sys.executable, "-c", launcher, str(extra), "train", *common[:4], "--method", "kto",
                              "--hinge-margin", "0.5", "--output-dir", str(tmp_path / "kto")],
                             capture_output=True, text=True)
    assert foreign.returncode != 0 and "belong to Hinge (--method hinge): --hinge-margin" in foreign.stderr


def test_only_the_sharding_backends_name_a_sharding_kind():
    """The engine and the trainers call one backend interface (engine/sharding/base.py) and never branch on which
    kind runs: a new kind is a new file in engine/sharding/. Checked on the string constants of the source, so a
    comment or docstring may still speak of FSDP."""
    kinds = {"fsdp", "zero3", "zero12", "zero2", "ddp", "FSDP", "DEEPSPEED"}  # the last two: accelerate's names
    backends = PACKAGE / "engine" / "sharding"
    named = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if backends in path.parents:
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                      and node.body and isinstance(node.body[0], ast.Expr)}
        named += [f"{path.relative_to(PACKAGE)}:{node.lineno}: {node.value!r}" for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
                  and node.value in kinds]
    assert not named, named
    assert {p.stem for p in backends.glob("*.py")} >= {"base", "replicated", "zero12", "zero3", "fsdp"}

"""Security rules, checked on the source: weights only through safetensors or torch.load(weights_only=True),
no trust_remote_code, YAML through safe_load, no shell built from input (no shell=True, os.system, eval)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SOURCES = sorted(p for d in ("tlm", "data_pipeline", "benchmarks", "scripts") for p in (REPO / d).rglob("*.py"))


def calls(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            yield node, name, {k.arg: k.value for k in node.keywords}


def problems(path: Path, root: Path = REPO) -> list[str]:
    """Every breach of the rules in one Python file, as 'file:line: what'."""
    found = []
    for node, name, keywords in calls(path):
        where = f"{path.relative_to(root)}:{node.lineno}"
        if name.endswith("torch.load"):
            value = keywords.get("weights_only")
            if not (isinstance(value, ast.Constant) and value.value is True):
                found.append(f"{where}: torch.load without weights_only=True")
        if name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "pickle.load", "pickle.loads", "eval", "exec",
                    "os.system", "os.popen"):
            found.append(f"{where}: {name}")
        if "shell" in keywords and not (isinstance(keywords["shell"], ast.Constant) and keywords["shell"].value is False):
            found.append(f"{where}: a subprocess with shell=True")
        if "trust_remote_code" in keywords:
            value = keywords["trust_remote_code"]
            if not (isinstance(value, ast.Constant) and value.value is False):
                found.append(f"{where}: trust_remote_code")
    return found


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_source_follows_the_security_rules(path: Path) -> None:
    assert not problems(path), problems(path)


def test_the_rules_catch_what_they_forbid(tmp_path: Path) -> None:
    """The checker itself: a file that breaks each rule is caught once per breach."""
    bad = tmp_path / "bad.py"
    bad.write_text("import torch, yaml, subprocess\n"
                   "torch.load('x')\n"
                   "torch.load('x', weights_only=False)\n"
                   "yaml.load('a')\n"
                   "subprocess.run('ls', shell=True)\n"
                   "AutoModel.from_pretrained('m', trust_remote_code=True)\n"
                   "torch.load('x', weights_only=True)\n"
                   "yaml.safe_load('a')\n")
    text = "\n".join(problems(bad, tmp_path))
    assert text.count("weights_only") == 2 and "bad.py:4: yaml.load" in text and "shell=True" in text
    assert "trust_remote_code" in text and ":7:" not in text and ":8:" not in text

"""The repository's GitHub Actions workflow and the README's CI recipes: linted
(actionlint, with shellcheck on their shell), and the workflow runs exactly the
commands the README's "In your CI" section documents. No root needed."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / ".github" / "workflows" / "ci.yml"
README = ROOT / "README.md"


def tool(name):
    """A linter from the test extra, installed beside this interpreter (the venv's bin)."""
    path = shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if path is None:
        pytest.fail(f"{name} is missing: install the test extra (pip install -e '.[test]')")
    return path


def actionlint(path_or_text):
    args = [tool("actionlint"), f"-shellcheck={tool('shellcheck')}", "-no-color"]
    if isinstance(path_or_text, Path):
        return subprocess.run([*args, str(path_or_text)], capture_output=True, text=True, cwd=ROOT)
    return subprocess.run([*args, "-"], input=path_or_text, capture_output=True, text=True, cwd=ROOT)


def ci_section():
    text = README.read_text()
    m = re.search(r"^## In your CI\n(.*?)(?=^## )", text, re.S | re.M)
    assert m, "README.md has no \"## In your CI\" section"
    return m.group(1)


def subsection(title):
    m = re.search(rf"^### {re.escape(title)}\n(.*?)(?=^### |\Z)", ci_section(), re.S | re.M)
    assert m, f"the README's \"In your CI\" section has no \"### {title}\""
    return m.group(1)


def code_blocks(text, lang):
    return re.findall(rf"^```{lang}\n(.*?)^```", text, re.S | re.M)


def load_workflow():
    with open(WORKFLOW) as f:
        return yaml.safe_load(f)


def test_workflow_passes_actionlint():
    proc = actionlint(WORKFLOW)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


def test_actionlint_sees_a_broken_workflow():
    # the check above can fail: an unknown expression context and a shell bug are errors
    broken = WORKFLOW.read_text().replace("run: uname -r", 'run: echo "${{ matrix.kernel }}" && cd $NOWHERE')
    assert broken != WORKFLOW.read_text()
    proc = actionlint(broken)
    assert proc.returncode == 1
    assert 'property "kernel" is not defined' in proc.stdout
    assert "SC2086" in proc.stdout   # shellcheck ran: $NOWHERE unquoted


def test_workflow_runs_what_the_readme_documents():
    wf = load_workflow()
    (job,) = wf["jobs"].values()
    assert job["runs-on"] == "ubuntu-24.04"
    runs = [step["run"].strip() for step in job["steps"] if "run" in step]
    (documented,) = code_blocks(subsection("This repository's own CI"), "")
    assert runs == documented.strip().splitlines()
    # "as .ci/run does": .ci/run is make test, and the workflow runs .ci/run itself
    ci_run = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln and not ln.startswith("#")]
    assert ci_run[-1] == "make test"
    assert "sudo CI=true bash .ci/run" in runs


def test_workflow_uploads_the_reports_the_readme_lists():
    wf = load_workflow()
    (job,) = wf["jobs"].values()
    (upload,) = [s for s in job["steps"] if s.get("uses", "").startswith("actions/upload-artifact@")]
    assert upload["if"] == "always()"   # the reports are kept when a step fails
    paths = upload["with"]["path"].split()
    assert paths == ["build/test-junit.xml", "example_project/build/junit.xml", "example_project/build/leaks.json",
                     "example_project/build/flamegraphs/"]
    text = subsection("This repository's own CI")
    assert f"`{upload['with']['name']}`" in text
    for p in paths:
        assert f"`{p}`" in text, p
    # where the suite and the demo write them
    assert "report=build/test-junit.xml" in (ROOT / "scripts" / "run-tests.sh").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert "--junitxml=build/junit.xml" in makefile and "--ebpf-leaks-json=build/leaks.json" in makefile
    assert "PYTEST_ADDOPTS=--ebpf-leaks-flamegraph=build/flamegraphs make demo" in " ".join(
        s["run"] for s in job["steps"] if "run" in s)


def test_readme_github_recipe_passes_actionlint():
    (recipe,) = code_blocks(subsection("GitHub Actions, for your C or C-extension project"), "yaml")
    proc = actionlint(recipe)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


def _pytest_command(script):
    """The recipe's pytest command, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", "", script)
    (line,) = [ln.strip() for ln in joined.splitlines() if "-m pytest" in ln]
    return line


def test_readme_recipes_run_the_venv_interpreter_as_root_the_same_way():
    (recipe,) = code_blocks(subsection("GitHub Actions, for your C or C-extension project"), "yaml")
    steps = yaml.safe_load(recipe)["jobs"]["leaks"]["steps"]
    gha = "\n".join(s["run"] for s in steps if "run" in s)
    (shell,) = code_blocks(subsection("Any other CI: plain shell"), "sh")
    cmd = _pytest_command(gha)
    assert cmd == _pytest_command(shell)
    assert cmd.startswith("sudo .venv/bin/python -m pytest --ebpf-leaks ")
    for opt in ("--junitxml=build/junit.xml", "--ebpf-leaks-json=build/leaks.json",
                "--ebpf-leaks-flamegraph=build/flamegraphs"):
        assert opt in cmd
    # the same packages, venv and install steps in both
    body = [ln for ln in re.sub(r"\\\n\s*", "", shell).splitlines()
            if ln and not ln.startswith(("#", "set ")) and "-m pytest" not in ln]
    assert body == [ln.strip() for ln in re.sub(r"\\\n\s*", "", gha).splitlines() if ln.strip() and "-m pytest" not in ln]
    upload = [s for s in steps if s.get("uses", "").startswith("actions/upload-artifact@")]
    assert upload and upload[0]["with"]["path"] == "build/" and upload[0]["if"] == "always()"


def test_readme_shell_recipe_passes_shellcheck(tmp_path):
    (shell,) = code_blocks(subsection("Any other CI: plain shell"), "sh")
    script = tmp_path / "recipe.sh"
    script.write_text(shell)
    proc = subprocess.run([tool("shellcheck"), "--severity=style", str(script)], capture_output=True, text=True)
    assert (proc.returncode, proc.stdout) == (0, "")
    # and shellcheck would have said so: the same script with an unquoted expansion
    script.write_text(shell.replace('"linux-headers-$(uname -r)"', "linux-headers-$(uname -r)"))
    proc = subprocess.run([tool("shellcheck"), "--severity=style", str(script)], capture_output=True, text=True)
    assert proc.returncode == 1 and "SC2046" in proc.stdout

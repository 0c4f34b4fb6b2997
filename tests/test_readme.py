"""README.md begins with the two set-up commands; .ci/run lints, then runs the test one verbatim."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands():
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_opens_with_exactly_two_commands_and_ci_runs_the_test_one():
    main_job, tests = _readme_commands()
    assert "uv sync --locked" in main_job and "kmim" in main_job
    assert re.search(r"uv run pytest( -n \d+ --dist loadfile)?$", tests), tests
    ci = [
        line
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line and not line.startswith(("#", "set ", "cd "))
    ]
    # install, lint, then the README's test command verbatim
    assert ci[-1] == tests and "uv run ruff check . && uv run ruff format --check ." in ci[:-1]

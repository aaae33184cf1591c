"""A sample project in a bare git repository: the remote that the demo and tests push to."""

from __future__ import annotations

import tempfile
from pathlib import Path

from engine.git import GitError, run_git

SAMPLE_FILES: dict[str, str] = {
    "README.md": "# Sample service\n\nA tiny service that Conveyor's agents work on.\n",
    "src/app.py": 'def hello() -> str:\n    return "hello from the sample service"\n',
    # The project's check command: every file under src/ must be non-empty text.
    "check.py": (
        "import pathlib\nimport sys\n\n"
        "empty = [p for p in pathlib.Path('src').rglob('*') if p.is_file() and not p.read_text()]\n"
        "print('empty files:', empty) if empty else print('check passed')\n"
        "sys.exit(1 if empty else 0)\n"
    ),
}


async def _git(*args: str, cwd: Path | None = None) -> None:
    result = await run_git(*args, cwd=cwd)
    if not result.ok:
        raise GitError(f"git {args[0]} failed: {result.err.strip()[-300:]}")


async def create_sample_remote(
    path: Path, files: dict[str, str] | None = None, main_branch: str = "main"
) -> Path:
    """Create a bare repository at `path` whose `main_branch` holds one commit of `files`."""
    path = Path(path)
    await _git("init", "--bare", "--initial-branch", main_branch, str(path))
    with tempfile.TemporaryDirectory(prefix="conveyor-seed-") as seed:
        seed_dir = Path(seed)
        await _git("init", "--initial-branch", main_branch, str(seed_dir))
        for name, text in (files or SAMPLE_FILES).items():
            target = seed_dir / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
        await _git("add", "-A", cwd=seed_dir)
        await _git(
            "-c",
            "user.name=Conveyor",
            "-c",
            "user.email=conveyor@localhost",
            "commit",
            "-q",
            "-m",
            "Initial commit",
            cwd=seed_dir,
        )
        await _git("push", "-q", str(path), f"HEAD:refs/heads/{main_branch}", cwd=seed_dir)
    return path

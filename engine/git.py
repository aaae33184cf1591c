"""Git plumbing: one shared bare clone per project, one worktree per task.

Layout under the workspace root:

    repos/<project>.git                 bare clone; origin/<branch> refs via a fetch refspec
    worktrees/<project>/<work_item>     the task's worktree on its feature branch

Every git call goes through `run_git`: no shell, no prompts, a fixed identity,
and output with credentials stripped, so nothing here can hang on a password
prompt or leak a token into a log line or an exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

IDENTITY = (
    "-c",
    "user.name=Conveyor",
    "-c",
    "user.email=conveyor@localhost",
    "-c",
    "commit.gpgsign=false",
)
NETWORK_TIMEOUT_S = 600.0
MERGE_RETRIES = 3
PROMPT_FILE = ".task.md"

# Variables that would point git at another repository (e.g. when the tests run from a git
# hook) or override the fixed identity.
_SCRUBBED_ENV = (
    "GIT_DIR",
    "GIT_WORK_TREE",
    "GIT_INDEX_FILE",
    "GIT_COMMON_DIR",
    "GIT_OBJECT_DIRECTORY",
    "GIT_ALTERNATE_OBJECT_DIRECTORIES",
    "GIT_NAMESPACE",
    "GIT_PREFIX",
    "GIT_AUTHOR_NAME",
    "GIT_AUTHOR_EMAIL",
    "GIT_COMMITTER_NAME",
    "GIT_COMMITTER_EMAIL",
)
# scheme://userinfo@ -> scheme://***@ ; greedy up to the last "@" before the path.
_CREDENTIALS = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/\s]*@")
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class GitError(Exception):
    """A git operation the pipeline cannot continue without failed (clone, worktree)."""


@dataclass(frozen=True)
class GitResult:
    ok: bool
    code: int
    out: str
    err: str


@dataclass(frozen=True)
class MergeResult:
    ok: bool
    sha: str | None = None
    conflict_files: tuple[str, ...] = ()
    error: str | None = None
    transient: bool = False  # the remote could not be reached: try again later


@dataclass(frozen=True)
class RebaseResult:
    ok: bool
    rebased: bool = False  # False: the branch already contained main
    head: str | None = None
    main: str | None = None
    conflict_files: tuple[str, ...] = ()
    error: str | None = None
    transient: bool = False  # the remote could not be reached: try again later


def slugify(title: str, limit: int = 40) -> str:
    # Match ASCII before lowering: str.lower() maps some non-ASCII letters (the Kelvin sign)
    # to ASCII ones, and those must be dropped like every other non-ASCII character.
    slug = re.sub(r"[^A-Za-z0-9]+", "-", title).lower().strip("-")
    return slug[:limit].rstrip("-") or "untitled"


def branch_name(work_item: str, title: str) -> str:
    return f"feature/{slugify(work_item, limit=64)}-{slugify(title)}"


def redact(text: str) -> str:
    """Strip credentials from every URL in `text`."""
    return _CREDENTIALS.sub(r"\1***@", text)


def _tail(text: str, limit: int = 300) -> str:
    """The last lines of git output as one line, for an error message."""
    line = " | ".join(part.strip() for part in text.strip().splitlines() if part.strip())
    return line if len(line) <= limit else "..." + line[-limit:]


def _git_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
    env["GIT_TERMINAL_PROMPT"] = "0"
    env["LC_ALL"] = "C"
    env.setdefault("GIT_SSH_COMMAND", "ssh -o BatchMode=yes")
    return env


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    # git runs helpers (remote-https, ssh) as children; kill the whole session so none
    # of them keeps the pipes open.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


async def run_git(*args: str, cwd: Path | None = None, timeout_s: float = 120) -> GitResult:
    """Run git without a shell; never raises for git failures, kills it on timeout."""
    try:
        proc = await asyncio.create_subprocess_exec(
            "git",
            *IDENTITY,
            *args,
            cwd=cwd,
            env=_git_env(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as exc:
        return GitResult(ok=False, code=127, out="", err=redact(f"cannot run git: {exc}"))
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        _kill_group(proc)
        await proc.wait()
        return GitResult(ok=False, code=-9, out="", err=f"git timed out after {timeout_s}s")
    except asyncio.CancelledError:
        _kill_group(proc)
        raise
    code = proc.returncode if proc.returncode is not None else -1
    return GitResult(
        ok=code == 0,
        code=code,
        out=redact(out.decode(errors="replace")),
        err=redact(err.decode(errors="replace")),
    )


async def _rev(cwd: Path, ref: str) -> str | None:
    """The commit `ref` names, or None when it does not exist."""
    res = await run_git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}", cwd=cwd)
    return res.out.strip() if res.ok else None


async def changed_files(worktree: Path) -> list[str]:
    """Uncommitted changes (tracked and untracked, ignored files excluded)."""
    res = await run_git("status", "--porcelain=v1", "-z", "--untracked-files=all", cwd=worktree)
    if not res.ok:
        return []
    files: list[str] = []
    entries = iter(res.out.split("\0"))
    for entry in entries:
        if len(entry) < 4:
            continue
        files.append(entry[3:])
        if entry[0] in "RC":
            next(entries, None)  # the rename's source path follows as its own entry
    return files


def _safe_name(kind: str, value: str) -> str:
    if not _SAFE_NAME.fullmatch(value) or ".." in value:
        raise GitError(f"invalid {kind} for a directory name: {value!r}")
    return value


async def _current_branch(worktree: Path) -> str | None:
    res = await run_git("symbolic-ref", "--quiet", "--short", "HEAD", cwd=worktree)
    return res.out.strip() if res.ok else None


async def _back_to_branch(worktree: Path, branch: str) -> GitResult:
    """Leave whatever a merge or a rebase cut off by a crash left behind and check out
    `branch` again (an unfinished rebase has not moved the branch yet)."""
    if await _rev(worktree, "MERGE_HEAD"):
        await run_git("merge", "--abort", cwd=worktree)
    if _rebase_under_way(worktree):
        await run_git("rebase", "--abort", cwd=worktree)
    return await run_git("checkout", "-q", branch, "--", cwd=worktree)


class GitWorkspace:
    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        # Fetches and worktree bookkeeping write shared refs of one bare repository;
        # serialise them per repository. Share one workspace per process.
        self._locks: dict[str, asyncio.Lock] = {}
        # Worktrees this process has checked: a later job skips the git checks (three
        # subprocesses per job) while the worktree is still plainly on its branch.
        self._verified: set[tuple[Path, str]] = set()
        self._common_dirs: dict[Path, Path] = {}

    def repo_dir(self, project: str) -> Path:
        return self.workdir / "repos" / f"{_safe_name('project', project)}.git"

    def worktree_dir(self, project: str, work_item: str) -> Path:
        return (
            self.workdir
            / "worktrees"
            / _safe_name("project", project)
            / _safe_name("work item", work_item)
        )

    def _lock(self, git_dir: Path) -> asyncio.Lock:
        return self._locks.setdefault(str(git_dir.resolve()), asyncio.Lock())

    async def ensure_repo(self, project: str, remote: str) -> Path:
        repo = self.repo_dir(project)
        async with self._lock(repo):
            await self._ensure_repo(repo, remote)
        return repo

    async def _ensure_repo(self, repo: Path, remote: str) -> None:
        source = _remote_source(remote)
        if not await _is_bare_repo(repo):
            await self._clone(repo, source)
        await _configure(repo, source)
        fetched = await _fetch(repo)
        if not fetched.ok:
            raise GitError(f"cannot fetch {redact(remote)}: {_tail(fetched.err)}")

    async def _clone(self, repo: Path, source: str) -> None:
        # Clone next to the target and rename, so a crash never leaves a half clone in place.
        partial = _clone_target(repo)
        await _rmtree(partial)
        res = await run_git(
            "clone", "--bare", "--quiet", "--", source, str(partial), timeout_s=NETWORK_TIMEOUT_S
        )
        if not res.ok:
            await _rmtree(partial)
            raise GitError(f"cannot clone {redact(source)}: {_tail(res.err) or 'git failed'}")
        partial.rename(repo)

    async def ensure_worktree(
        self, project: str, remote: str, main_branch: str, branch: str, work_item: str
    ) -> Path:
        path = self.worktree_dir(project, work_item)
        if (path, branch) in self._verified and _plainly_on_branch(path, branch):
            return path
        await _check_branch_name(branch)
        if await _is_worktree(path):
            await _recover_detached(path, branch)
        else:
            repo = self.repo_dir(project)
            async with self._lock(repo):
                if not await _is_worktree(path):  # a concurrent call may have just created it
                    await self._ensure_repo(repo, remote)
                    await self._add_worktree(repo, path, remote, main_branch, branch)
        self._verified.add((path, branch))
        return path

    async def _add_worktree(
        self, repo: Path, path: Path, remote: str, main_branch: str, branch: str
    ) -> None:
        await run_git("worktree", "prune", cwd=repo)
        await _rmtree(path)  # a leftover that is no worktree
        path.parent.mkdir(parents=True, exist_ok=True)
        args = await _worktree_add_args(repo, path, remote, main_branch, branch)
        res = await run_git("worktree", "add", "--quiet", *args, cwd=repo)
        if not res.ok:
            raise GitError(f"cannot create worktree for {branch}: {_tail(res.err)}")

    async def commit_all(self, worktree: Path, message: str) -> str | None:
        added = await run_git("add", "-A", cwd=worktree)
        if not added.ok:
            log.warning("git add failed in %s: %s", worktree, _tail(added.err))
            return None
        res = await run_git("commit", "--quiet", "--no-verify", "-m", message, cwd=worktree)
        if not res.ok:
            if "nothing to commit" not in res.out and "nothing added to commit" not in res.out:
                log.warning("git commit failed in %s: %s", worktree, _tail(res.err or res.out))
            return None
        return await self.head_sha(worktree)

    async def head_sha(self, worktree: Path) -> str:
        sha = await _rev(worktree, "HEAD")
        if sha is None:
            raise GitError(f"no HEAD commit in {worktree}")
        return sha

    async def _shared_refs(self, worktree: Path) -> asyncio.Lock:
        """The lock of the repository whose refs the worktree shares (fetches and pushes
        both write its remote-tracking refs)."""
        common = self._common_dirs.get(worktree)
        if common is None:
            found = await run_git("rev-parse", "--git-common-dir", cwd=worktree)
            if not found.ok:
                return self._lock(worktree)
            common = self._common_dirs[worktree] = (worktree / found.out.strip()).resolve()
        return self._lock(common)

    async def push_branch(self, worktree: Path, branch: str) -> GitResult:
        ref = f"refs/heads/{branch}"
        async with await self._shared_refs(worktree):
            res = await self._push_branch(worktree, ref)
        if not res.ok:
            log.warning("push of %s failed: %s", branch, _tail(res.err))
        return res

    async def _push_branch(self, worktree: Path, ref: str) -> GitResult:
        return await run_git(
            "push",
            "--quiet",
            "--set-upstream",
            "origin",
            f"{ref}:{ref}",
            cwd=worktree,
            timeout_s=NETWORK_TIMEOUT_S,
        )

    async def merge_to_main(
        self,
        worktree: Path,
        branch: str,
        main_branch: str,
        message: str,
        tested_head: str | None = None,
    ) -> MergeResult:
        """Merge the branch into the remote's main; with `tested_head`, only that very commit."""
        try:
            if dirty := await changed_files(worktree):
                return MergeResult(ok=False, error=f"uncommitted changes: {', '.join(dirty[:5])}")
            head = await _rev(worktree, f"refs/heads/{branch}")
            if tested_head is not None and head != tested_head:
                return MergeResult(
                    ok=False, error=f"{branch} moved after it was tested ({tested_head[:10]})"
                )
            try:
                return await self._merge_with_retries(worktree, branch, main_branch, message)
            finally:
                back = await _back_to_branch(worktree, branch)
                if not back.ok:
                    log.error("cannot switch %s back to %s: %s", worktree, branch, back.err)
        except Exception as exc:  # the merge gate must get an outcome, never an exception
            log.exception("merge of %s failed", branch)
            return MergeResult(ok=False, error=redact(f"merge failed: {exc}"))

    async def _merge_with_retries(
        self, worktree: Path, branch: str, main_branch: str, message: str
    ) -> MergeResult:
        for _ in range(1 + MERGE_RETRIES):
            outcome = await self._merge_once(worktree, branch, main_branch, message)
            if outcome is not None:
                return outcome
            log.info("%s moved while merging %s; retrying", main_branch, branch)
        return MergeResult(ok=False, error=f"{main_branch} kept moving; gave up merging {branch}")

    async def _merge_once(
        self, worktree: Path, branch: str, main_branch: str, message: str
    ) -> MergeResult | None:
        """One attempt; None means the push lost a race with another push to main."""
        main_ref = f"refs/remotes/origin/{main_branch}"
        fetched = await self._fetch_worktree(worktree)
        if not fetched.ok:
            return MergeResult(
                ok=False, error=f"fetch failed: {_tail(fetched.err)}", transient=True
            )
        base = await _rev(worktree, main_ref)
        if base is None:
            return MergeResult(ok=False, error=f"branch {main_branch} not found on the remote")
        if await _rev(worktree, f"refs/heads/{branch}") is None:
            return MergeResult(ok=False, error=f"branch {branch} not found")
        detached = await run_git("checkout", "-q", "--detach", base, cwd=worktree)
        if not detached.ok:
            return MergeResult(ok=False, error=f"cannot check out {main_branch}: {detached.err}")
        merged = await run_git(
            "merge", "--no-ff", "--no-edit", "-m", message, f"refs/heads/{branch}", cwd=worktree
        )
        if not merged.ok:
            return await _abort_merge(worktree, merged)
        sha = await _rev(worktree, "HEAD")
        if sha == base:  # already merged (a rerun after a successful push)
            return MergeResult(ok=True, sha=base)
        async with await self._shared_refs(worktree):
            pushed = await run_git(
                "push",
                "--quiet",
                "origin",
                f"HEAD:refs/heads/{main_branch}",
                cwd=worktree,
                timeout_s=NETWORK_TIMEOUT_S,
            )
        if pushed.ok:
            return MergeResult(ok=True, sha=sha)
        await self._fetch_worktree(worktree)
        if await _rev(worktree, main_ref) != base:
            return None
        return MergeResult(ok=False, error=f"push to {main_branch} failed: {_tail(pushed.err)}")

    async def rebase_onto_main(self, worktree: Path, branch: str, main_branch: str) -> RebaseResult:
        """Bring the task branch onto the remote's current main, in the task's own worktree."""
        fetched = await self._fetch_worktree(worktree)
        if not fetched.ok:
            error = f"fetch failed: {_tail(fetched.err)}"
            return RebaseResult(ok=False, error=error, transient=True)
        main = await _rev(worktree, f"refs/remotes/origin/{main_branch}")
        if main is None:
            return RebaseResult(ok=False, error=f"branch {main_branch} not found on the remote")
        if _rebase_under_way(worktree):  # a run cut off mid-rebase: start it over
            await _back_to_branch(worktree, branch)
        if await _is_ancestor(worktree, main, "HEAD"):
            return RebaseResult(ok=True, head=await _rev(worktree, "HEAD"), main=main)
        rebased = await run_git("rebase", "--no-autostash", main, cwd=worktree)
        if rebased.ok:
            return RebaseResult(ok=True, rebased=True, head=await _rev(worktree, "HEAD"), main=main)
        res = await run_git("diff", "--name-only", "-z", "--diff-filter=U", cwd=worktree)
        conflicts = tuple(sorted({name for name in res.out.split("\0") if name}))
        await run_git("rebase", "--abort", cwd=worktree)
        reason = f"conflict in {', '.join(conflicts)}" if conflicts else _tail(rebased.err)
        return RebaseResult(
            ok=False, conflict_files=conflicts, error=f"rebase onto {main_branch}: {reason}"
        )

    async def force_push_branch(
        self, worktree: Path, branch: str, expected: str | None
    ) -> GitResult:
        """Push a rebased task branch, only over the head we last saw there (never main)."""
        lease = f"--force-with-lease=refs/heads/{branch}:{expected or ''}"
        async with await self._shared_refs(worktree):
            return await run_git(
                "push",
                "--quiet",
                lease,
                "origin",
                f"HEAD:refs/heads/{branch}",
                cwd=worktree,
                timeout_s=NETWORK_TIMEOUT_S,
            )

    async def remote_head(self, worktree: Path, branch: str) -> str | None:
        """The branch's head on the remote as last fetched; None when it is not there."""
        return await _rev(worktree, f"refs/remotes/origin/{branch}")

    async def changed_between(self, worktree: Path, older: str, newer: str) -> list[str] | None:
        """Files that differ between two commits; None when either is unknown."""
        diff = await run_git("diff", "--name-only", "-z", older, newer, cwd=worktree)
        return [name for name in diff.out.split("\0") if name] if diff.ok else None

    async def file_on_main(self, worktree: Path, main_branch: str, path: str) -> str | None:
        """A file as it is on the remote's main (fetched first); None when absent."""
        await self._fetch_worktree(worktree)
        shown = await run_git("show", f"refs/remotes/origin/{main_branch}:{path}", cwd=worktree)
        return shown.out if shown.ok else None

    async def _fetch_worktree(self, worktree: Path) -> GitResult:
        async with await self._shared_refs(worktree):
            return await _fetch(worktree)

    async def remove_worktree(self, project: str, work_item: str) -> None:
        try:
            repo = self.repo_dir(project)
            path = self.worktree_dir(project, work_item)
            self._verified = {entry for entry in self._verified if entry[0] != path}
            if repo.is_dir():
                async with self._lock(repo):
                    await run_git("worktree", "remove", "--force", "--force", str(path), cwd=repo)
                    await run_git("worktree", "prune", cwd=repo)
            await _rmtree(path)
        except Exception:  # cleanup must never fail a task
            log.exception("cannot remove worktree %s/%s", project, work_item)


def _clone_target(repo: Path) -> Path:
    if repo.exists():  # never delete what may hold another clone's branches
        raise GitError(f"{repo} exists but is not a bare git repository")
    repo.parent.mkdir(parents=True, exist_ok=True)
    return repo.with_name(repo.name + ".partial")


async def _rmtree(path: Path) -> None:
    await asyncio.to_thread(shutil.rmtree, path, ignore_errors=True)


def _remote_source(remote: str) -> str:
    """An existing local path becomes absolute (git resolves relative ones against cwd)."""
    if "://" not in remote and Path(remote).exists():
        return str(Path(remote).resolve())
    return remote


async def _configure(repo: Path, source: str) -> None:
    """Idempotent: origin/<branch> refs, the current remote URL, the prompt file ignored."""
    await run_git("config", "remote.origin.url", source, cwd=repo)
    await run_git("config", "remote.origin.fetch", "+refs/heads/*:refs/remotes/origin/*", cwd=repo)
    exclude = repo / "info" / "exclude"
    exclude.parent.mkdir(exist_ok=True)
    lines = exclude.read_text(encoding="utf-8").splitlines() if exclude.exists() else []
    if PROMPT_FILE not in lines:
        exclude.write_text("\n".join([*lines, PROMPT_FILE]) + "\n", encoding="utf-8")


async def _is_bare_repo(path: Path) -> bool:
    if not (path / "HEAD").is_file():
        return False
    res = await run_git("rev-parse", "--is-bare-repository", cwd=path)
    return res.ok and res.out.strip() == "true"


async def _is_worktree(path: Path) -> bool:
    if not (path / ".git").exists():
        return False
    res = await run_git("rev-parse", "--show-toplevel", cwd=path)
    return res.ok and _same_path(Path(res.out.strip()), path)


def _worktree_gitdir(worktree: Path) -> Path | None:
    """The worktree's own git directory, from its `.git` file (gitrepository-layout)."""
    try:
        pointer = (worktree / ".git").read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not pointer.startswith("gitdir:"):
        return None
    return worktree / pointer.removeprefix("gitdir:").strip()


def _rebase_under_way(worktree: Path) -> bool:
    gitdir = _worktree_gitdir(worktree)
    return gitdir is not None and any((gitdir / n).exists() for n in REBASE_DIRS)


REBASE_DIRS = ("rebase-merge", "rebase-apply")


def _plainly_on_branch(worktree: Path, branch: str) -> bool:
    """The worktree's HEAD names `branch` and no merge or rebase is under way, read from
    its files rather than by starting git."""
    gitdir = _worktree_gitdir(worktree)
    try:
        head = (gitdir / "HEAD").read_text(encoding="utf-8").strip() if gitdir else ""
    except (OSError, UnicodeDecodeError):
        return False
    busy = ("MERGE_HEAD", "CHERRY_PICK_HEAD", *REBASE_DIRS)
    return head == f"ref: refs/heads/{branch}" and not any((gitdir / n).exists() for n in busy)


def _same_path(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


REF_LOCK_RETRIES = 3


async def _fetch(cwd: Path) -> GitResult:
    """Fetch origin; again when a ref was locked by another git process (an agent's own
    fetch or push in its worktree shares the refs of the one repository)."""
    for attempt in range(REF_LOCK_RETRIES + 1):
        res = await run_git(
            "fetch", "--quiet", "--prune", "origin", cwd=cwd, timeout_s=NETWORK_TIMEOUT_S
        )
        if res.ok or "cannot lock ref" not in res.err or attempt == REF_LOCK_RETRIES:
            return res
        await asyncio.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


async def _check_branch_name(branch: str) -> None:
    res = await run_git("check-ref-format", f"refs/heads/{branch}")
    if branch.startswith("-") or not res.ok:
        raise GitError(f"invalid branch name: {branch!r}")


async def _recover_detached(worktree: Path, branch: str) -> None:
    """A worktree left detached (a crash inside merge_to_main) goes back to its branch."""
    if await _current_branch(worktree) is None:
        res = await _back_to_branch(worktree, branch)
        if not res.ok:
            log.warning("cannot switch %s back to %s: %s", worktree, branch, _tail(res.err))


async def _worktree_add_args(
    repo: Path, path: Path, remote: str, main_branch: str, branch: str
) -> list[str]:
    """Where the task branch starts: the local branch when it already holds everything the
    remote has (it may carry unpushed commits), else origin/<branch>, else origin/<main>."""
    local = await _rev(repo, f"refs/heads/{branch}")
    pushed = await _rev(repo, f"refs/remotes/origin/{branch}")
    if local and (pushed is None or await _is_ancestor(repo, pushed, local)):
        return [str(path), branch]
    if pushed:
        return ["--no-track", "-B", branch, str(path), pushed]
    main = await _rev(repo, f"refs/remotes/origin/{main_branch}")
    if main is None:
        raise GitError(f"main branch {main_branch!r} not found on remote {redact(remote)}")
    return ["--no-track", "-B", branch, str(path), main]


async def _is_ancestor(repo: Path, ancestor: str, descendant: str) -> bool:
    res = await run_git("merge-base", "--is-ancestor", ancestor, descendant, cwd=repo)
    return res.code == 0


async def _abort_merge(worktree: Path, merged: GitResult) -> MergeResult:
    res = await run_git("diff", "--name-only", "-z", "--diff-filter=U", cwd=worktree)
    conflicts = tuple(sorted({name for name in res.out.split("\0") if name}))
    await run_git("merge", "--abort", cwd=worktree)
    if conflicts:
        return MergeResult(
            ok=False, conflict_files=conflicts, error=f"merge conflict in {', '.join(conflicts)}"
        )
    return MergeResult(ok=False, error=f"merge failed: {_tail(merged.err or merged.out)}")

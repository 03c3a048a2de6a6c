"""The README, executed: every fenced block in README.md is run by a check here, or exempt with a reason.

A block says which by an HTML comment on the line right before its fence (GitHub does not show it)::

    <!-- readme-test: NAME -->            run by the check registered for NAME with @runs below
    <!-- readme-test: skip: REASON -->    exempt, and why

``test_every_block_is_run_or_exempt`` fails for a block with neither, a NAME no check runs, or a check
whose block is gone, so a new snippet cannot slip in untested and a check cannot go stale.

The checks take each block's text from the README itself and run it as written, in bash or Python,
against the emulator and a throwaway SQLite ``AIRFLOW_HOME``. The only changes are placeholders, each
asserted to be present so that a substitution cannot silently stop applying:

* port 8765 (the emulator's example port) becomes a free port, so that parallel runs never collide;
* ``https://api.hubapi.com`` and the ``pat-na1-…`` token become the emulator where a command would
  talk to HubSpot (no test talks to the real HubSpot);
* ``git+<this repository>`` becomes the wheel built from this checkout, and example file paths
  become files in the test's tmp folder.

The install steps run in a fresh virtualenv: the built wheel and the README's stated requirements,
installed with ``uv pip install`` (uv's cache keeps that to seconds). Without uv, or without PyPI and
the packages in uv's cache, those checks skip with the reason; under
``HUBSPOT_PROVIDER_REQUIRE_SERVICES=1`` (set by ``.ci/run``) they fail instead.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from services import missing

from hubspot_provider.testing import HubSpotEmulator

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
UV = REPO / ".tools" / "uv" / "bin" / "uv"
EXAMPLE_PORT = "8765"
DAG_FILES = ("hubspot_consent_sync.py", "hubspot_dead_letter_replay.py")

pytestmark = pytest.mark.timeout(900)


# --------------------------------------------------------------------------- the README's blocks

FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<lang>[\w-]*)\s*$")
MARKER = re.compile(r"^\s*<!--\s*readme-test:\s*(?P<what>.*?)\s*-->\s*$")
NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence, 1-based
    lang: str
    text: str  # the body, with the fence's indentation removed
    marker: str | None  # what the readme-test comment says, if there is one

    @property
    def where(self) -> str:
        first = next((line for line in self.text.splitlines() if line.strip()), "")
        return f"README.md:{self.line} (```{self.lang} block starting {first.strip()[:60]!r})"


def blocks_of(text: str) -> list[Block]:
    """Every fenced block of a Markdown text, with the readme-test comment right before its fence."""
    lines = text.splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        closing = re.compile(rf"^ *{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        end = next((j for j in range(i + 1, len(lines)) if closing.match(lines[j])), None)
        if end is None:
            raise AssertionError(f"README.md:{i + 1}: a fenced block that is never closed")
        body = "\n".join(
            line[len(indent) :] if line.startswith(indent) else line.lstrip() for line in lines[i + 1 : end]
        )
        marker = MARKER.match(lines[i - 1]) if i > 0 else None
        found.append(Block(i + 1, opening["lang"], body + "\n", marker["what"] if marker else None))
        i = end + 1
    return found


# Block name -> the test function that runs it; filled by @runs.
CHECKS: dict[str, str] = {}


def runs(*names: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a test as the one that runs the README blocks marked with these names."""

    def register(test: Callable[..., Any]) -> Callable[..., Any]:
        for name in names:
            assert name not in CHECKS, f"two checks claim the block {name!r}"
            CHECKS[name] = test.__name__
        return test

    return register


def coverage_problems(text: str, checks: dict[str, str]) -> list[str]:
    """Why the blocks of ``text`` are not each run by one of ``checks`` or exempt; empty when they are."""
    problems: list[str] = []
    seen: dict[str, Block] = {}
    for block in blocks_of(text):
        what = block.marker
        if what is None:
            problems.append(
                f"{block.where} is neither run by a test nor exempt: put <!-- readme-test: NAME --> (a "
                "check in tests/test_readme.py) or <!-- readme-test: skip: REASON --> on the line right "
                "before its fence"
            )
        elif what.startswith("skip"):
            if not re.fullmatch(r"skip:\s*\S.*", what):
                problems.append(
                    f"{block.where} is exempt without a reason: write <!-- readme-test: skip: REASON -->"
                )
        elif not NAME.match(what):
            problems.append(
                f"{block.where}: {what!r} is not a check name (lower-case letters, digits, dashes)"
            )
        elif what in seen:
            problems.append(f"{block.where} and README.md:{seen[what].line} are both named {what!r}")
        else:
            seen[what] = block
            if what not in checks:
                problems.append(
                    f"{block.where} is named {what!r}, but no check in tests/test_readme.py runs it"
                )
    for name, test in checks.items():
        if name not in seen:
            problems.append(f"{test} runs the README block {name!r}, which the README no longer has")
    return problems


def readme() -> str:
    return README.read_text(encoding="utf-8")


def block(name: str) -> str:
    """The text of the README block marked ``name``."""
    (found,) = [b for b in blocks_of(readme()) if b.marker == name] or [None]
    assert found is not None, f"README.md has no block marked <!-- readme-test: {name} -->"
    return found.text


def adapt(text: str, *replacements: tuple[str, str]) -> str:
    """``text`` with placeholders replaced; each must be there, so a substitution cannot silently lapse."""
    for old, new in replacements:
        assert old in text, f"{old!r} is no longer in:\n{text}"
        text = text.replace(old, new)
    return text


def prose(pattern: str) -> list[str]:
    """What ``pattern`` captures in the README's text (outside fenced blocks too), line breaks as spaces."""
    return re.findall(pattern, re.sub(r"\s*\n\s*", " ", readme()))


def commands(text: str) -> list[str]:
    """The command lines of a shell block, comments and blank lines dropped, continuations joined."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [
        line
        for line in (
            shlex.join(shlex.split(raw, comments=True)) if raw.strip() else "" for raw in joined.splitlines()
        )
        if line
    ]


def test_every_block_is_run_or_exempt():
    problems = coverage_problems(readme(), CHECKS)
    assert not problems, "\n".join(problems)


def test_the_coverage_check_catches_what_it_must():
    text = "\n".join(
        [
            "```bash",
            "echo unmarked",
            "```",
            "<!-- readme-test: skip -->",
            "```",
            "no reason",
            "```",
            "<!-- readme-test: nobody-runs-this -->",
            "```python",
            "print(1)",
            "```",
            "<!-- readme-test: known -->",
            "  ```",
            "  indented",
            "  ```",
            "<!-- readme-test: known -->",
            "```",
            "twice",
            "```",
            "<!-- readme-test: skip: a drawing -->",
            "```",
            "fine",
            "```",
        ]
    )
    problems = coverage_problems(text, {"known": "test_known", "vanished": "test_vanished"})
    assert [p.split(" (```")[0].split(":")[1] if p.startswith("README.md:") else p for p in problems] == [
        "1",
        "5",
        "9",
        "17",
        "test_vanished runs the README block 'vanished', which the README no longer has",
    ]
    assert "neither run by a test nor exempt" in problems[0]
    assert "without a reason" in problems[1]
    assert "no check in tests/test_readme.py runs it" in problems[2]
    assert "both named 'known'" in problems[3]
    assert blocks_of(text)[3].text == "indented\n"


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def base_env(home: Path, bin_dir: Path) -> dict[str, str]:
    """A user's shell: no Airflow settings of the test session, ``bin_dir`` first on PATH."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AIRFLOW", "HUBSPOT_", "PYTHON", "VIRTUAL_ENV"))
    }
    env.update(
        {
            "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
            "AIRFLOW_HOME": str(home),
            # Airflow's own example DAGs would only slow every command down.
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        }
    )
    return env


def tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


def sh(
    script: str, env: dict[str, str], cwd: Path, *, timeout: float = 300, ok: bool = True
) -> subprocess.CompletedProcess:
    """Run ``script`` in bash (errexit, nounset, pipefail); with ``ok`` it must succeed."""
    done = subprocess.run(
        ["bash", "-c", "set -euo pipefail\n" + script],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if ok:
        assert done.returncode == 0, (
            f"$ {script}\nexit status {done.returncode}\n"
            f"--- stdout\n{tail(done.stdout)}\n--- stderr\n{tail(done.stderr)}"
        )
    return done


def exported(script: str, env: dict[str, str], cwd: Path, *names: str) -> dict[str, str]:
    """The variables a block of ``export`` lines sets, as bash parses its quoting."""
    shown = "".join(f'printf "%s\\0" "${{{name}}}"\n' for name in names)
    values = sh(script + "\n" + shown, env, cwd).stdout.split("\0")[:-1]
    return dict(zip(names, values))


class Lines:
    """A process's stdout read line by line in a thread, so that waiting for a line has a timeout."""

    def __init__(self, process: subprocess.Popen) -> None:
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, args=(process.stdout,), daemon=True).start()

    def _pump(self, stream: Any) -> None:
        for line in stream:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def until(self, last: str, timeout_s: float = 60) -> list[str]:
        seen: list[str] = []
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self._queue.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line {last!r} within {timeout_s:.0f}s; got {seen}") from None
            if line is None:
                raise AssertionError(f"the process ended before printing {last!r}; got {seen}")
            seen.append(line)
            if line.strip() == last:
                return seen


def stop(process: subprocess.Popen, sig: int = signal.SIGTERM) -> int:
    """Stop a process started with ``start_new_session`` and everything it forked."""
    if process.poll() is None:
        os.killpg(process.pid, sig)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return process.returncode


def wait_for(what: str, check: Callable[[], Any], logs: Path, timeout_s: float = 300) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = check()
        except sqlite3.OperationalError:  # the metadata DB not migrated yet, or busy
            value = None
        if value:
            return value
        time.sleep(1)
    logs_text = "\n".join(
        f"--- {log.name}\n{tail(log.read_text(errors='replace'), 30)}" for log in sorted(logs.glob("*.log"))
    )
    raise AssertionError(f"timed out waiting for {what}\n{logs_text}")


def query(db: Path, sql: str, *args: Any) -> list[tuple]:
    connection = sqlite3.connect(db, timeout=30)
    try:
        return connection.execute(sql, args).fetchall()
    finally:
        connection.close()


# --------------------------------------------------------------------------- shared set-up


@pytest.fixture(scope="module")
def emulator() -> Iterator[HubSpotEmulator]:
    with HubSpotEmulator() as hs:
        yield hs


def consent_table(path: Path, rows: list[tuple]) -> None:
    """A consent source made with the README's own DDL, holding ``rows``."""
    connection = sqlite3.connect(path)
    try:
        connection.executescript(block("consent-ddl"))
        connection.executemany("INSERT INTO consent_events VALUES (?, ?, ?, ?, ?, ?)", rows)
        connection.commit()
    finally:
        connection.close()


def copy_dags(home: Path) -> None:
    """Step 2 of "Running the example DAGs": the two DAG files into the DAGs folder ($AIRFLOW_HOME/dags)."""
    dags = home / "dags"
    dags.mkdir(parents=True, exist_ok=True)
    for name in DAG_FILES:
        shutil.copy(REPO / "dags" / name, dags / name)


@pytest.fixture(scope="module")
def cli_home(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A migrated SQLite AIRFLOW_HOME with the example DAGs in its DAGs folder and stored."""
    home = tmp_path_factory.mktemp("airflow-home")
    copy_dags(home)
    env = base_env(home, Path(sys.executable).parent)
    env["AIRFLOW__HUBSPOT__TASK_RETRIES"] = "0"  # `dags test` would sit out a failed task's retry delay
    sh("airflow db migrate\nairflow dags reserialize", env, home)
    return home, env


# --------------------------------------------------------------------------- the two commands


def summary_rows(text: str) -> list[tuple[str, str]]:
    rows = []
    for line in text.splitlines():
        if line.startswith("  ") and re.match(r"  \S.*?\s{2,}\S", line):
            label, value = re.split(r"\s{2,}", line.strip(), maxsplit=1)
            rows.append((label, value))
    return rows


@runs("the-two-commands", "demo-summary")
def test_the_two_commands_run_and_the_demo_prints_the_summary_shown():
    demo, test = commands(block("the-two-commands"))
    assert (demo, test) == ("./bin/demo", "./bin/test")
    done = sh(demo, {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}, REPO, timeout=600)
    shown = summary_rows(block("demo-summary"))
    printed = summary_rows(done.stdout)
    assert [label for label, _ in printed] == [label for label, _ in shown], done.stdout
    for (label, expected), (_, actual) in zip(shown, printed):
        pattern = re.escape(expected).replace("…", r"[^/\s]+")
        if label == "HubSpot traffic":  # retries and speed vary with the seeded faults' timing
            pattern = re.sub(r"\d+", r"\\d+", pattern)
        assert re.fullmatch(pattern, actual), (
            f"{label}: the README shows {expected!r}, the demo printed {actual!r}"
        )

    # ./bin/test passes its arguments to pytest: here one quick test of this file.
    ran = sh(
        f"{test} -q -p no:cacheprovider tests/test_readme.py -k test_the_coverage_check_catches_what_it_must",
        {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")},
        REPO,
    )
    assert re.search(r"\b1 passed\b", ran.stdout), ran.stdout


# --------------------------------------------------------------------------- a fresh virtualenv


def pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
        return True
    except OSError:
        return False


@dataclass
class FreshVenv:
    root: Path
    python: Path
    env: dict[str, str]
    work: Path

    def sh(self, script: str, **kwargs: Any) -> subprocess.CompletedProcess:
        return sh(script, self.env, self.work, **kwargs)


def install_command(wheel: Path) -> tuple[list[str], list[str]]:
    """The README's install line as uv runs it: (pip's arguments, the requirements listed under it)."""
    (line,) = commands(block("install"))
    args = shlex.split(line)
    assert args[:2] == ["pip", "install"], line
    # The examples extra, as the README names it: `pip install "hubspot-provider[examples]"`.
    (extra,) = prose(r'`pip install "hubspot-provider\[(\w+)\]"`')
    packages = [
        f"hubspot-provider[{extra}] @ {wheel.as_uri()}" if "<this repository>" in arg else arg
        for arg in args[2:]
    ]
    assert any(wheel.as_uri() in p for p in packages), line
    (listed,) = prose(r"Requirements: (- Python .*?) The example DAGs")
    python = re.search(r"Python ≥ (\d+)\.(\d+)", listed)
    assert python and sys.version_info[:2] >= (int(python[1]), int(python[2])), listed
    requirements = re.findall(r"`([a-z][\w.-]*(?:\[[\w,]+\])?(?:[<>=!~][^`]*)?)`", listed)
    assert requirements, listed
    return packages, requirements


def uv(args: list[str], env: dict[str, str], what: str) -> None:
    """Run uv; without PyPI, again from uv's cache alone, and skip (fail, when required) if that fails."""
    command = [str(UV), *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode == 0:
        return
    if pypi_reachable():
        raise AssertionError(f"{shlex.join(command)} failed:\n{done.stderr[-3000:]}")
    offline = subprocess.run([*command, "--offline"], env=env, capture_output=True, text=True, timeout=600)
    if offline.returncode != 0:
        missing(f"PyPI is unreachable and uv's cache lacks {what}: {tail(offline.stderr, 3)}")


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory) -> FreshVenv:
    """A new virtualenv with only the built wheel and the README's requirements, installed as it says."""
    if not UV.exists():
        missing(f"uv is not installed at {UV.relative_to(REPO)} (./bin/_env installs it)")
    root = tmp_path_factory.mktemp("fresh-venv")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PYTHON", "VIRTUAL_ENV"))}
    uv(["build", "--wheel", "--out-dir", str(root / "dist"), str(REPO)], env, "the build backend")
    (wheel,) = (root / "dist").glob("hubspot_provider-*.whl")
    venv = root / "venv"
    uv(["venv", "--quiet", "--python", sys.executable, str(venv)], env, "a Python")
    packages, requirements = install_command(wheel)
    python = ["--python", str(venv / "bin" / "python")]
    uv(["pip", "install", "--quiet", *python, *packages, *requirements], env, "what the README lists")
    work = root / "work"
    work.mkdir()
    home = root / "airflow-home"
    home.mkdir()
    return FreshVenv(
        root, venv / "bin" / "python", {**base_env(home, venv / "bin"), "VIRTUAL_ENV": str(venv)}, work
    )


@runs("install")
def test_a_fresh_virtualenv_installs_the_wheel_with_the_stated_requirements(fresh_venv):
    shown = fresh_venv.sh(
        "python -c 'import hubspot_provider, importlib.metadata as m; "
        'print(hubspot_provider.__file__); print(m.version("hubspot-provider"))\''
        "\npython -c 'import pytest' 2>/dev/null && echo has-pytest || echo no-pytest"
    ).stdout.splitlines()
    assert shown[0].startswith(str(fresh_venv.root / "venv")), shown  # the wheel, not this checkout
    assert shown[1] == "0.1.0"
    assert shown[2] == "no-pytest"  # nothing of the project's own environment leaked in
    # Everything the wheel declares is installed and consistent.
    fresh_venv.sh(f"{shlex.quote(str(UV))} pip check --python {shlex.quote(str(fresh_venv.python))}")


def console(text: str) -> list[tuple[str, list[str]]]:
    """A console block as (command, the lines it prints)."""
    steps: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        elif line.strip():
            steps[-1][1].append(line)
    return steps


def same_lines(expected: list[str], printed: str) -> bool:
    """Whether ``printed`` is ``expected``, table padding aside, with ``...`` for an elided part."""
    actual = [" ".join(line.split()) for line in printed.splitlines() if line.strip()]
    if len(actual) != len(expected):
        return False
    return all(
        re.fullmatch(re.escape(" ".join(e.split())).replace(r"\.\.\.", ".*"), a)
        for e, a in zip(expected, actual)
    )


@runs("providers-discovered", "config-declared")
def test_airflow_discovers_the_provider_and_its_setting_as_shown(fresh_venv):
    for name in ("providers-discovered", "config-declared"):
        for command, expected in console(block(name)):
            printed = fresh_venv.sh(command).stdout
            assert same_lines(expected, printed), (
                f"$ {command}\nthe README shows:\n{expected}\nit printed:\n{printed}"
            )


@runs("example-dags")
def test_the_wheel_ships_the_example_dags_and_they_load_where_the_readme_copies_them(fresh_venv):
    dags = fresh_venv.root / "dags-folder"
    dags.mkdir()
    env = {**fresh_venv.env, "AIRFLOW__CORE__DAGS_FOLDER": str(dags)}
    sh("airflow db migrate", env, fresh_venv.work)  # the user's Airflow has its database
    for command, expected in console(block("example-dags")):
        printed = sh(command, env, fresh_venv.work).stdout
        # Airflow's CLI prints a warning (no graphviz) on stdout before its answer.
        shown = "\n".join(printed.strip().splitlines()[-len(expected):]) if expected else printed
        assert same_lines(expected, shown), f"$ {command}\nthe README shows:\n{expected}\nit printed:\n{printed}"
    assert sorted(p.name for p in dags.glob("*.py")) == ["hubspot_consent_sync.py", "hubspot_dead_letter_replay.py"]


def read_statuses(emulator_url: str, token: str, emails: list[str], monkeypatch) -> dict[str, dict[int, str]]:
    """Statuses as HubSpot's read API answers them, through this session's own hook."""
    from hubspot_provider.hooks.hubspot import HubSpotHook

    monkeypatch.setenv(
        "AIRFLOW_CONN_README_CHECK",
        json.dumps({"conn_type": "hubspot", "host": emulator_url, "password": token}),
    )
    statuses = HubSpotHook("readme_check").read_statuses(emails)
    return {
        email: {sid: getattr(s.status, "value", s.status) for sid, s in by_id.items()}
        for email, by_id in statuses.items()
    }


@runs("emulator-cli", "hook-script-env", "hook-script", "hook-request")
def test_the_emulator_cli_and_a_script_using_the_hook(fresh_venv, monkeypatch):
    (cli,) = prose(r"`(python -m hubspot_provider\.testing\.emulator --port 8765 [^`]*)`")
    port = str(free_port())
    started = subprocess.Popen(
        shlex.split(adapt(cli, (EXAMPLE_PORT, port))),
        env=fresh_venv.env,
        cwd=fresh_venv.work,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        printed = Lines(started).until("Stop it with Ctrl+C.")
        assert printed == adapt(block("emulator-cli"), (EXAMPLE_PORT, port)).rstrip("\n").splitlines()

        # A script outside a task gets its connection from the environment, as the README shows.
        (fresh_venv.work / "write_statuses.py").write_text(block("hook-script"))
        run = fresh_venv.sh(adapt(block("hook-script-env"), (EXAMPLE_PORT, port)))
        assert re.search(
            r"^2 submitted: 2 succeeded \(2 changed\), 0 superseded, 0 failed;", run.stdout, re.M
        ), run.stdout
        assert read_statuses(
            f"http://127.0.0.1:{port}",
            "pat-emulator-token",
            ["ada@example.com", "bob@example.com"],
            monkeypatch,
        ) == {"ada@example.com": {1001: "SUBSCRIBED"}, "bob@example.com": {1001: "UNSUBSCRIBED"}}

        # hook.request(...) continues the same script.
        (fresh_venv.work / "request.py").write_text(
            block("hook-script")
            + block("hook-request")
            + "assert answer.status_code == 200 and answer.correlation_id and answer.json()['results']\n"
            + "print('definitions:', len(answer.json()['results']))\n"
        )
        run = fresh_venv.sh(
            adapt(
                block("hook-script-env"),
                (EXAMPLE_PORT, port),
                ("python write_statuses.py", "python request.py"),
            )
        )
        assert "definitions: 3" in run.stdout, run.stdout
    finally:
        # Ctrl+C, as the CLI says: it stops cleanly.
        assert stop(started, signal.SIGINT) == 0


@runs("emulator-snippet")
def test_the_emulator_snippet_runs_as_written(fresh_venv):
    from hubspot_provider.testing.emulator import INJECT_KINDS

    snippet = block("emulator-snippet")
    (fresh_venv.work / "emulator_snippet.py").write_text(snippet)
    fresh_venv.sh("python emulator_snippet.py")
    (kinds,) = re.findall(r"Kinds: (.*?) \(hubspot_provider", re.sub(r"\n\s*#\s*", " ", snippet))
    assert tuple(kind.strip() for kind in kinds.split(",")) == INJECT_KINDS


@runs("operator")
def test_the_operator_example_builds_an_operator(fresh_venv):
    (fresh_venv.work / "operator_example.py").write_text(
        block("operator") + "print(type(write).__name__, write.task_id, write.pool, write.deferrable)\n"
    )
    out = fresh_venv.sh("python operator_example.py").stdout
    assert out.splitlines()[-1] == "HubSpotWriteStatusesOperator write_statuses hubspot_api True"


# --------------------------------------------------------------------------- connections


@runs("env-json-form")
def test_the_json_and_uri_forms_give_the_settings_they_show(tmp_path, monkeypatch, emulator):
    from hubspot_provider.hooks.hubspot import HubSpotHook

    env = base_env(tmp_path, Path(sys.executable).parent)
    value = exported(block("env-json-form"), env, tmp_path, "AIRFLOW_CONN_HUBSPOT_DEFAULT")
    monkeypatch.setenv("AIRFLOW_CONN_HUBSPOT_DEFAULT", value["AIRFLOW_CONN_HUBSPOT_DEFAULT"])
    settings = HubSpotHook().settings
    assert (settings.base_url, settings.batch_size, str(settings.portal_timezone)) == (
        "https://api.hubapi.com",
        100,
        "Europe/Berlin",
    )

    hubspot_uri, emulator_uri = prose(r"`(hubspot://[^`]+)`")
    monkeypatch.setenv("AIRFLOW_CONN_HUBSPOT_DEFAULT", hubspot_uri)
    settings = HubSpotHook().settings
    assert (settings.base_url, settings.batch_size) == ("https://api.hubapi.com", 100)  # "100" converted

    monkeypatch.setenv(
        "AIRFLOW_CONN_HUBSPOT_DEFAULT", adapt(emulator_uri, (EXAMPLE_PORT, str(emulator.port)))
    )
    report = HubSpotHook().write_statuses(
        [{"subscriberIdString": "uri@example.com", "subscriptionId": 1002, "statusState": "SUBSCRIBED"}]
    )
    assert report.succeeded == 1
    assert emulator.status_of("uri@example.com", 1002)["status"] == "SUBSCRIBED"


@runs("uri-form-tls-error")
def test_https_against_the_emulator_is_reported_as_the_scheme(monkeypatch, emulator):
    """Over real sockets: the URI form without /http speaks TLS to the plain-http emulator."""
    from hubspot_provider.exceptions import HubSpotConfigError
    from hubspot_provider.hooks.hubspot import HubSpotHook

    (uri,) = [u for u in prose(r"`(hubspot://[^`]+)`") if u.endswith("/http")]
    monkeypatch.setenv(
        "AIRFLOW_CONN_HUBSPOT_DEFAULT", adapt(uri, (EXAMPLE_PORT, str(emulator.port)), ("/http", ""))
    )
    before = len(emulator.requests)
    with pytest.raises(HubSpotConfigError) as raised:
        HubSpotHook(max_retries=5).write_statuses(
            [{"subscriberIdString": "tls@example.com", "subscriptionId": 1001, "statusState": "SUBSCRIBED"}]
        )
    shown = adapt(block("uri-form-tls-error"), (EXAMPLE_PORT, str(emulator.port))).strip()
    # The TLS library's name for the failure differs between OpenSSL versions.
    pattern = re.escape(shown).replace(re.escape("(WRONG_VERSION_NUMBER)"), r"\([A-Z_]+\)")
    assert re.fullmatch(pattern, f"{type(raised.value).__name__}: {raised.value}"), str(raised.value)
    assert "unavailable" not in str(raised.value) and "Re-run later" not in str(raised.value)
    # Not retried, and nothing reached the emulator's API.
    assert (raised.value.partial_report.requests, raised.value.partial_report.retries) == (1, 0)
    assert len(emulator.requests) == before and emulator.status_of("tls@example.com", 1001) is None


@runs("ui-test-message")
def test_the_connection_test_message_is_the_one_shown(hubspot_conn, emulator):
    from hubspot_provider.hooks.hubspot import HubSpotHook

    assert HubSpotHook(hubspot_conn(emulator)).test_connection() == (
        True,
        adapt(block("ui-test-message"), (EXAMPLE_PORT, str(emulator.port))).strip(),
    )


@runs("cli-connections")
def test_the_cli_connection_commands_print_what_the_readme_says(cli_home, emulator):
    home, env = cli_home
    env = {**env, "HUBSPOT_TOKEN": emulator.token}
    script = adapt(
        block("cli-connections"), ("--conn-host https://api.hubapi.com", f"--conn-host {emulator.url}")
    )
    try:
        out = sh(script, env, home).stdout
        assert re.search(r"^Connection success!$", out, re.M), out
        assert "Connected to HubSpot" not in out  # the message of a successful test shows only in the UI

        # A script outside a task does not see the stored connection (Airflow 3): the README's words.
        (home / "write_statuses.py").write_text(block("hook-script"))
        failed = sh("python write_statuses.py", env, home, ok=False)
        (said,) = prose(r"``(AirflowNotFoundException: The conn_id `hubspot_default` isn't defined)``")
        assert failed.returncode != 0 and said in failed.stderr, failed.stderr[-2000:]

        # A failed test: "Connection failed!", the message the README quotes, exit status 1.
        (message,) = prose(r"A failed test names the connection and what is wrong, for example `([^`]+)`")
        sh("airflow connections delete hubspot_default", env, home)
        broken = adapt(script, ('"Europe/Berlin"', '"Mars/Olympus"'))
        failed = sh(broken, env, home, ok=False)
        assert failed.returncode == 1, failed.stdout + failed.stderr
        assert re.search(rf"^Connection failed!\n{re.escape(message)}$", failed.stdout, re.M), failed.stdout
    finally:
        sh("airflow connections delete hubspot_default", env, home, ok=False)


# --------------------------------------------------------------------------- the ledger's SQL


def columns(db: sqlite3.Connection, table: str) -> list[tuple[str, str, int]]:
    return [
        (name, kind, notnull) for _, name, kind, notnull, _, _ in db.execute(f"PRAGMA table_info({table})")
    ]


@runs("ledger-ddl", "ledger-query")
def test_the_ledger_ddl_and_query_run_on_sqlite():
    from hubspot_provider.ledger import LEDGER_DDL

    shown, shipped = sqlite3.connect(":memory:"), sqlite3.connect(":memory:")
    shown.executescript(block("ledger-ddl"))
    shipped.executescript(LEDGER_DDL)
    assert columns(shown, "hubspot_consent_ledger") == columns(shipped, "hubspot_consent_ledger")
    names = [name for name, _, _ in columns(shown, "hubspot_consent_ledger")]
    record = {name: None for name in names}
    for email, sent_at in (
        ("Ada@Example.com", "2026-03-11T02:00:01Z"),
        ("ada@example.com", "2026-03-10T02:00:00Z"),
        ("bob@example.com", "2026-03-10T02:00:00Z"),
    ):
        record.update(
            subscriber_id_string=email,
            sent_at=sent_at,
            channel="EMAIL",
            status_state="SUBSCRIBED",
            outcome="SUCCEEDED",
            subscription_id=1001,
        )
        shown.execute(
            f"INSERT INTO hubspot_consent_ledger ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
            [record[n] for n in names],
        )
    rows = shown.execute(block("ledger-query")).fetchall()
    assert [row[0] for row in rows] == [
        "2026-03-10T02:00:00Z",
        "2026-03-11T02:00:01Z",
    ]  # ada's, any case, in order


# --------------------------------------------------------------------------- the example DAGs


@runs("consent-ddl", "sqlite-connection", "dags-test")
def test_dags_test_syncs_a_day_from_a_sqlite_source_and_nothing_before_the_start_date(
    cli_home, tmp_path, emulator
):
    from hubspot_provider.consent import SOURCE_COLUMNS

    home, env = cli_home
    source = tmp_path / "consent.db"
    consent_table(
        source,
        [
            (
                "ada@example.com",
                1001,
                "SUBSCRIBED",
                "CONSENT_WITH_NOTICE",
                "Ticked the box at sign-up",
                "2026-03-10 09:00:00",
            ),
            ("bob@example.com", 1002, "SUBSCRIBED", None, None, "2026-03-10T08:00:00+01:00"),
            ("bob@example.com", 1002, "UNSUBSCRIBED", None, None, "2026-03-10 18:30:00"),
            ("cy@example.com", 1001, "SUBSCRIBED", None, None, "2026-03-11 00:00:00"),  # the next day
        ],
    )
    db = sqlite3.connect(source)
    assert [name for _, name, *_ in db.execute("PRAGMA table_info(consent_events)")] == list(SOURCE_COLUMNS)
    assert db.execute("SELECT name FROM sqlite_master WHERE type = 'index'").fetchall() == [
        ("consent_events_occurred_at",)
    ]
    db.close()

    connections = adapt(block("sqlite-connection"), ("/var/lib/consent/consent.db", str(source)))
    connections += f"export AIRFLOW_CONN_HUBSPOT_DEFAULT={shlex.quote(emulator.airflow_connection())}\n"
    day, before_start = commands(block("dags-test"))
    storage = home / "hubspot_consent"

    sh(connections + day, env, home, timeout=600)
    assert {
        (e, s): emulator.status_of(e, s)["status"]
        for e, s in (("ada@example.com", 1001), ("bob@example.com", 1002))
    } == {("ada@example.com", 1001): "SUBSCRIBED", ("bob@example.com", 1002): "UNSUBSCRIBED"}
    assert emulator.status_of("cy@example.com", 1001) is None  # not the interval's
    (run,) = [json.loads(p.read_text()) for p in storage.glob("*/summary.json")]
    assert run["data_interval_start"].startswith("2026-03-10") and run["succeeded"] == 2

    runs_before, requests_before = sorted(storage.iterdir()), len(emulator.requests)
    done = sh(connections + before_start, env, home, timeout=600)
    assert re.search(r"Marking run .* successful", done.stdout + done.stderr)
    assert sorted(storage.iterdir()) == runs_before and len(emulator.requests) == requests_before
    (start,) = prose(r"`hubspot_consent_sync` has `start_date` (\d{4}-\d\d-\d\d) \(UTC\)")
    assert before_start.split()[-1] < start
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(dag_folder=str(REPO / "dags")).dags["hubspot_consent_sync"]
    assert (dag.start_date.isoformat(), dag.catchup) == (f"{start}T00:00:00+00:00", False)


@runs("dag-connections")
def test_the_dag_connections_parse(tmp_path, monkeypatch):
    from airflow.sdk import BaseHook

    from hubspot_provider.hooks.hubspot import HubSpotHook

    values = exported(
        block("dag-connections"),
        base_env(tmp_path, Path(sys.executable).parent),
        tmp_path,
        "AIRFLOW_CONN_HUBSPOT_DEFAULT",
        "AIRFLOW_CONN_HUBSPOT_CONSENT_SOURCE",
    )
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    source = BaseHook.get_connection("hubspot_consent_source")
    assert (source.conn_type, source.host, source.schema) == ("postgres", "db", "crm")
    assert HubSpotHook().settings.base_url == "https://api.hubapi.com"


@runs("backfill", "replay-trigger")
def test_backfill_and_replay_commands_create_their_runs(cli_home):
    home, env = cli_home
    db = home / "airflow.db"
    (backfill,) = commands(block("backfill"))
    sh(backfill, env, home)
    created = query(
        db,
        "SELECT logical_date FROM dag_run WHERE dag_id = ? AND run_type = 'backfill' ORDER BY logical_date",
        "hubspot_consent_sync",
    )
    first, last = re.search(r"--from-date (\S+) --to-date (\S+)", backfill).groups()
    # One run per day of the range, logical date D for day D.
    span = (datetime.fromisoformat(last) - datetime.fromisoformat(first)).days
    assert [str(d[0])[:10] for d in created] == [
        (datetime.fromisoformat(first) + timedelta(days=n)).date().isoformat() for n in range(span + 1)
    ]

    (trigger,) = commands(block("replay-trigger"))
    sh(trigger, env, home)
    (conf,) = query(db, "SELECT conf FROM dag_run WHERE dag_id = ?", "hubspot_dead_letter_replay")
    given = json.loads(shlex.split(trigger)[shlex.split(trigger).index("--conf") + 1])
    assert json.loads(conf[0]) == given


@runs("services", "unpause")
def test_the_four_services_run_the_latest_whole_day_after_unpause(tmp_path, emulator):
    home = tmp_path / "airflow"
    copy_dags(home)
    now = datetime.now(timezone.utc)
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    # A contact for each of the last days (and today, should midnight pass): only the latest whole day's
    # is synced.
    days = {today - timedelta(days=n): f"day-{n}@example.com" for n in (0, 1, 2, 3)}
    source = tmp_path / "consent.db"
    consent_table(
        source,
        [
            (email, 1003, "SUBSCRIBED", None, None, (day + timedelta(hours=12)).strftime("%Y-%m-%d %H:%M:%S"))
            for day, email in days.items()
        ],
    )
    api_port = free_port()
    env = base_env(home, Path(sys.executable).parent)
    env.update(
        {
            # The README's defaults (port 8080, log servers on 8793 and 8794) moved to free ports, so that
            # other Airflows on this machine cannot collide; tasks find the API server as the README says.
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(api_port),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
            # Embedded SQLite shared by four processes: wait for its lock instead of failing.
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}?timeout=60",
            "AIRFLOW__HUBSPOT__TASK_RETRIES": "0",
            "AIRFLOW_CONN_HUBSPOT_DEFAULT": emulator.airflow_connection(),
        }
    )
    env.update(
        exported(
            adapt(block("sqlite-connection"), ("/var/lib/consent/consent.db", str(source))),
            env,
            tmp_path,
            "AIRFLOW_CONN_HUBSPOT_CONSENT_SOURCE",
        )
    )
    migrate, *services = commands(block("services"))
    assert migrate == "airflow db migrate"
    assert [s.split()[1] for s in services] == ["api-server", "scheduler", "dag-processor", "triggerer"]
    sh(migrate, env, home)
    started: list[subprocess.Popen] = []
    db = home / "airflow.db"
    try:
        for service in services:
            log = (home / f"{service.split()[1]}.log").open("w")
            started.append(
                subprocess.Popen(
                    ["bash", "-c", f"exec {service}"],
                    env=env,
                    cwd=home,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        wait_for(
            "the DAG processor to store the DAG",
            lambda: query(db, "SELECT 1 FROM dag WHERE dag_id = ?", "hubspot_consent_sync"),
            home,
        )
        (unpause,) = commands(block("unpause"))
        sh(unpause, env, home)

        def finished() -> list[tuple] | None:
            rows = query(
                db,
                "SELECT run_type, state, data_interval_start, data_interval_end FROM dag_run "
                "WHERE dag_id = ?",
                "hubspot_consent_sync",
            )
            return rows if rows and all(state in ("success", "failed") for _, state, _, _ in rows) else None

        rows = wait_for("the scheduled run to finish", finished, home, timeout_s=480)
        ((run_type, state, start, end),) = (
            rows  # catchup is off: one run, not one per day since the start date
        )
        assert (run_type, state) == ("scheduled", "success"), rows
        start = datetime.fromisoformat(str(start)).replace(tzinfo=timezone.utc)
        assert datetime.fromisoformat(str(end)).replace(tzinfo=timezone.utc) - start == timedelta(days=1)
        assert start in (today - timedelta(days=1), today), (
            start
        )  # the latest whole day when it was scheduled
        assert {email: emulator.status_of(email, 1003) is not None for email in days.values()} == {
            email: day == start for day, email in days.items()
        }
        # The scheduler's start created the pool.
        assert query(db, "SELECT slots FROM slot_pool WHERE pool = 'hubspot_api'") == [(2,)]
    finally:
        for process in started:
            stop(process)


# --------------------------------------------------------------------------- the layout


@runs("layout")
def test_the_layout_names_what_is_there():
    parent = None
    named = []
    for line in block("layout").splitlines():
        indent = len(line) - len(line.lstrip())
        if not line.strip() or indent > 2:  # a description's continuation
            continue
        path = line.split()[0]
        if indent == 0:
            parent = path
            named.append(path)
        else:
            named.append(f"{parent}{path}")
    missing = [path for path in named if not (REPO / path).exists()]
    assert named and not missing, f"the Development section names what is not there: {missing}"


# --------------------------------------------------------------------------- the source's indexes


@runs("coarse-key-index")
def test_the_readme_index_on_the_coarse_email_key_is_the_one_a_backfill_probes(postgres, tmp_path, caplog):
    from airflow.providers.postgres.hooks.postgres import PostgresHook
    from test_real_databases import execute

    from hubspot_provider import consent

    schema = f"readme_{os.getpid()}_{int(time.time())}"
    # The README's table and index, in a schema of their own: 50 events on the day backfilled, then
    # 29 days of 2,000 events, each event of its own contact.
    execute(postgres, f"CREATE SCHEMA {schema}", f"SET search_path TO {schema}",
            block("consent-ddl"), block("coarse-key-index"),
            "INSERT INTO consent_events SELECT 'c' || i || '@example.com', 1001, 'SUBSCRIBED', NULL, NULL, "
            "TIMESTAMPTZ '2026-03-01 00:00:00+00' + i * INTERVAL '1 minute' FROM generate_series(0, 49) AS i",
            "INSERT INTO consent_events SELECT 'd' || i || '@example.com', 1001, 'SUBSCRIBED', NULL, NULL, "
            "TIMESTAMPTZ '2026-03-02 00:00:00+00' + (i / 2000) * INTERVAL '1 day' + (i % 86400) * INTERVAL '1 second' "
            "FROM generate_series(0, 57999) AS i",
            # A later opt-out of one of the day's contacts, stored in another case.
            "INSERT INTO consent_events VALUES (' C7@Example.COM', 1001, 'UNSUBSCRIBED', NULL, NULL, "
            "TIMESTAMPTZ '2026-03-20 10:00:00+00')",
            "ANALYZE consent_events")
    try:
        probe = consent._later_query(f"{schema}.consent_events", "postgres", "%s",
                                     datetime(2026, 3, 2, tzinfo=timezone.utc), ["c7@example.com"])
        assert consent._postgres_probes_index(PostgresHook(postgres_conn_id="pg_source"), *probe)
        with caplog.at_level("INFO", logger="hubspot_provider.consent"):
            counts = consent.extract_consent_events(
                source_conn_id="pg_source", source_table=f"{schema}.consent_events",
                data_interval_start=datetime(2026, 3, 1, tzinfo=timezone.utc),
                data_interval_end=datetime(2026, 3, 2, tzinfo=timezone.utc), run_uri=(tmp_path / "run").as_uri())
    finally:
        execute(postgres, f"DROP SCHEMA {schema} CASCADE")
    assert "50 contacts of the interval, probed through the index on the coarse email key" in caplog.text
    assert (counts["in_interval"], counts["superseded_later"], counts["staged"]) == (50, 1, 49)
    # The day's 50 contacts, each read once (its own event, inside the day of slack), and c7's later
    # opt-out: not the 58,000 events of the 29 days after it.
    assert counts["later_rows_read"] == 51


@runs("coarse-key-column-mariadb")
def test_the_readme_generated_key_column_is_the_one_a_mariadb_backfill_probes(mariadb, tmp_path, caplog, task_log):
    from test_real_databases import execute

    from hubspot_provider import consent

    table = f"consent_events_{os.getpid()}_{int(time.time())}"
    day = datetime(2026, 3, 1)
    rows = [(f"c{i}@example.com", 1001, "SUBSCRIBED", day + timedelta(minutes=i)) for i in range(50)]
    rows += [(f"d{i}@example.com", 1001, "SUBSCRIBED", day + timedelta(days=1 + i // 200, seconds=i)) for i in range(2000)]
    rows.append((" C7@Example.COM", 1001, "UNSUBSCRIBED", datetime(2026, 3, 20, 10)))  # c7's later opt-out
    # The README's table as MariaDB takes it (occurred_at a DATETIME(6) in UTC), then its column.
    execute(mariadb,
            f"CREATE TABLE {table} (email VARCHAR(254) CHARACTER SET utf8mb4, subscription_id BIGINT, "
            "status VARCHAR(16), legal_basis VARCHAR(40), legal_basis_explanation TEXT, occurred_at DATETIME(6))",
            block("coarse-key-column-mariadb").replace("consent_events", table),
            rows=rows, insert=f"INSERT INTO {table} (email, subscription_id, status, occurred_at) VALUES (%s, %s, %s, %s)")
    try:
        with caplog.at_level("INFO", logger="hubspot_provider.consent"):
            counts = consent.extract_consent_events(
                source_conn_id="mariadb_source", source_table=table,
                data_interval_start=datetime(2026, 3, 1, tzinfo=timezone.utc),
                data_interval_end=datetime(2026, 3, 2, tzinfo=timezone.utc), run_uri=(tmp_path / "run").as_uri())
    finally:
        execute(mariadb, f"DROP TABLE {table}")
    # Where the log goes depends on whether Airflow has set up its logging yet: read both.
    logged = caplog.text + task_log()
    assert f"50 contacts of the interval, probed through the index on email_coarse_key ({table}_email_key" in logged
    assert (counts["in_interval"], counts["superseded_later"], counts["staged"]) == (50, 1, 49)
    # The day's 50 contacts, each read once, and c7's later opt-out: not the 2,000 later events.
    assert counts["later_rows_read"] == 51

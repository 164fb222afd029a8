"""pipelines.tracking.progress: bars only on a terminal, never when disabled, forced for logs and tests."""

import io

import pytest

from pipelines.cli import build_parser, main
from pipelines.tracking.progress import PROGRESS_ENV, progress_bar, progress_enabled, quiet_if


class _Tty(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(PROGRESS_ENV, raising=False)


def _drain(bar):
    for _ in bar:
        pass
    bar.close()


def test_bar_is_silent_when_stderr_is_not_a_terminal():
    out = io.StringIO()
    _drain(progress_bar(range(3), desc="studies", stream=out))
    assert out.getvalue() == ""


def test_bar_is_silent_when_disabled_on_a_terminal(monkeypatch):
    out = _Tty()
    _drain(progress_bar(range(3), desc="studies", progress=False, stream=out))
    assert out.getvalue() == ""
    monkeypatch.setenv(PROGRESS_ENV, "0")
    _drain(progress_bar(range(3), desc="studies", progress=True, stream=out))
    assert out.getvalue() == ""


def test_bar_shows_on_a_terminal():
    out = _Tty()
    _drain(progress_bar(range(3), desc="studies", stream=out, leave=True))
    assert "studies" in out.getvalue() and "3/3" in out.getvalue()


def test_force_shows_the_bar_without_a_terminal_but_not_against_progress_false(monkeypatch):
    monkeypatch.setenv(PROGRESS_ENV, "force")
    out = io.StringIO()
    _drain(progress_bar(range(4), desc="runs", stream=out, leave=True))
    assert "runs" in out.getvalue() and "4/4" in out.getvalue()
    assert not progress_enabled(False, stream=out)


def test_quiet_if_turns_bars_off_for_the_block_only():
    with quiet_if(True):
        assert not progress_enabled(True, stream=_Tty())
    assert progress_enabled(True, stream=_Tty())


@pytest.mark.parametrize("argv", [
    ["compare", "--run-ids", "a", "b"],
    ["restore-augment", "--manifest", "m.csv", "--out", "o", "--check-only"],
    ["enhance-sweep"],
    ["manifest", "audit", "--manifest", "m.csv"],
    ["benchmark-quality", "--bundle", "alz_hybrid", "--dataset-dir", "d"],
])
def test_long_commands_accept_quiet(argv):
    parser = build_parser()
    assert parser.parse_args(argv).quiet is False
    assert parser.parse_args(argv[:1] + (argv[1:2] if argv[0] == "manifest" else []) + ["--quiet"]
                             + argv[(2 if argv[0] == "manifest" else 1):]).quiet is True


def test_main_quiet_sets_the_switch_while_the_command_runs(monkeypatch):
    import os

    seen = {}
    parser = build_parser()

    def fake_func(args):
        seen["env"] = os.environ.get(PROGRESS_ENV)
        return 0

    args = parser.parse_args(["enhance-sweep", "--quiet"])
    args.func = fake_func
    monkeypatch.setattr("pipelines.cli.build_parser", lambda: type("P", (), {"parse_args": lambda self, a: args})())
    assert main(["enhance-sweep", "--quiet"]) == 0
    assert seen["env"] == "0" and PROGRESS_ENV not in os.environ

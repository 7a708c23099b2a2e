"""The command line for scripts and clusters: global options before or after the command,
progress bars off on request, and the documented exit statuses (`kneetf.cli.exits`)."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from kneetf.cli import exits
from kneetf.cli.main import main, progress_wanted


@pytest.mark.parametrize("argv, level", [
    (["-q", "train", "--resume", "--out", "empty"], logging.WARNING),
    (["train", "--resume", "--out", "empty", "-v"], logging.DEBUG),
    (["--no-progress", "-v", "train", "--resume", "--out", "empty"], logging.DEBUG),
    (["train", "--resume", "--out", "empty"], logging.INFO),
])
def test_global_options_before_or_after_the_command(argv, level, capsys) -> None:
    assert main(argv) == exits.EXIT_ERROR
    assert "no run to resume" in capsys.readouterr().err
    assert logging.getLogger().level == level


def test_verbose_and_quiet_exclude_each_other() -> None:
    with pytest.raises(SystemExit) as e:
        main(["-v", "train", "-q"])
    assert e.value.code == exits.EXIT_USAGE


def test_progress_bars_off_on_request(monkeypatch) -> None:
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    assert progress_wanted() and not progress_wanted(no_progress=True) and not progress_wanted(quiet=True)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert not progress_wanted()
    monkeypatch.setenv("TQDM_DISABLE", "0")
    assert progress_wanted()


@pytest.mark.parametrize("argv, env, verbose", [
    ([], None, "auto"), (["--no-progress"], None, 2), (["-q"], None, 0), ([], "1", 2)])
def test_training_progress_follows_the_options(monkeypatch, tmp_path, argv, env, verbose) -> None:
    import kneetf.training.train as T

    seen = {}
    monkeypatch.setattr(T, "train", lambda *a, **kw: seen.update(kw) or {"chief": False})
    if env:
        monkeypatch.setenv("TQDM_DISABLE", env)
    else:
        monkeypatch.delenv("TQDM_DISABLE", raising=False)
    assert main(["train", "--out", str(tmp_path / "run"), *argv]) == exits.EXIT_OK
    assert seen["verbose"] == verbose


def test_every_command_takes_the_global_options() -> None:
    from kneetf.cli.main import COMMANDS, _command_parser

    for name in COMMANDS:
        text = _command_parser(name)[0].format_help()
        for option in ("--verbose", "--quiet", "--no-progress"):
            assert option in text, (name, option)


def test_a_crash_is_a_short_message_and_a_log_file(monkeypatch, capsys) -> None:
    import kneetf.cli.synth as synth

    def bug(args):
        return {}["missing"]

    monkeypatch.setattr(synth, "run", bug)
    assert main(["synth", "--out", "x"]) == exits.EXIT_CRASH
    err = capsys.readouterr().err
    assert "crashed: KeyError: 'missing'" in err and "Traceback" not in err
    log = Path(err.split("the traceback is in ")[1].split()[0])
    assert "Traceback" in log.read_text() and "def bug" not in err
    log.unlink()


def test_ctrl_c_exits_130(monkeypatch, capsys) -> None:
    import kneetf.cli.synth as synth

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(synth, "run", interrupted)
    assert main(["synth", "--out", "x"]) == exits.EXIT_INTERRUPT == 130
    assert "interrupted" in capsys.readouterr().err


def test_an_output_path_that_is_a_file_is_an_error_not_a_crash(tmp_path, capsys) -> None:
    """`--out FILE` where a folder is made: FileExistsError from mkdir is the user's error (1)."""
    (tmp_path / "afile").write_text("x")
    assert main(["train", "--preset", "tiny", "--synthetic-n", "8", "--epochs", "1",
                 "--out", str(tmp_path / "afile")]) == exits.EXIT_ERROR
    err = capsys.readouterr().err
    assert "error: [Errno 17] File exists" in err and "crashed" not in err


@pytest.mark.parametrize("verbose", [False, True])
def test_pydicom_logs_only_with_verbose(tmp_path, verbose) -> None:
    """pydicom logs every decoder it tried (with tracebacks) before kneetf reports the file once."""
    import subprocess
    import sys

    script = ("import logging, sys\nimport kneetf.cli.synth as s\n"
              "s.run = lambda args: logging.getLogger('pydicom.pixels.decoders.base').error('decoder noise') or 0\n"
              "from kneetf.cli.main import main\nsys.exit(main(sys.argv[1:]))\n")
    argv = [sys.executable, "-c", script, *(["-v"] if verbose else []), "synth", "--out", str(tmp_path / "x")]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and ("decoder noise" in done.stderr) == verbose

"""`quantkit --help` lists every command on one line of its own, with its one-line help."""
import subprocess
import sys

from quantkit.cli import build_parser


def test_top_level_help_lists_each_command_on_one_line():
    out = subprocess.run([sys.executable, "-m", "quantkit.cli", "--help"], capture_output=True, text=True,
                         env={"COLUMNS": "80", "PATH": ""}, check=True).stdout
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    helps = {c.dest: c.help for c in sub._choices_actions}
    assert set(helps) == set(sub.choices) and len(helps) >= 10
    lines = out.splitlines()
    for name, text in helps.items():
        rows = [l for l in lines if l.split()[:1] == [name]]
        assert len(rows) == 1, (name, rows)
        assert rows[0].split(None, 1)[1] == text  # the whole help on the command's own line
        assert len(rows[0]) <= 80

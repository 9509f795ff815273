"""The README's table of supported architectures is the matrix's own lists, as
scripts/architectures_table.py writes it."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_readme_table_is_the_matrix():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "architectures_table.py"), "--check"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr

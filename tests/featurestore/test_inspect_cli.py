"""`featurestore inspect`'s first line counts images and runs in correct English."""

from typer.testing import CliRunner

from cli.inspect_store import counted
from cli.main import app


def test_counts_take_the_plural_except_for_one():
    assert [counted(n, "run") for n in (0, 1, 2)] == ["0 runs", "1 run", "2 runs"]


def test_inspect_of_a_one_run_store_says_1_run(make_run):
    w = make_run()  # one run; the store holds n + 4 = 14 images
    result = CliRunner().invoke(app, ["inspect", str(w.path)])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == f"{w.path}: 14 images, 1 run"

"""Progress of the long stage-2 commands: a rich bar on stderr (drawn on a terminal only), one line
per epoch of a trained head, both off with --quiet, and `--json` stdout that is the JSON document
alone; every command takes --block/--blocks and --timestep/--timesteps as one option."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import subprocess
import sys
import threading
from pathlib import Path

import click
import numpy as np
import pytest
import typer.main
from typer.testing import CliRunner

from cli.main import app
from featurestore.store import FeatureStore
from pipelines import progress

sys.path.append(str(Path(__file__).parents[1] / "featurestore"))
from store_builders import manifest  # noqa: E402

N, CHUNK = 48, 8
BLOCKS = {"down": (3, 4, 4), "mid": (4, 2, 2)}
TIMESTEPS = [10, None]
ALIASES = (("--block", "--blocks"), ("--timestep", "--timesteps"))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """Random features of N images of 3 classes: the first half train photos, the rest test sketches."""
    path = tmp_path_factory.mktemp("progress") / "s.zarr"
    fs = FeatureStore.open(str(path), mode="a")
    ids, labels = np.arange(N), np.arange(N) % 3
    half = N // 2
    rows = np.concatenate([
        fs.add_images("toy", manifest(ids[:half], labels[:half], split="train", domain="photo")),
        fs.add_images("toy", manifest(ids[half:], labels[half:], split="test", domain="sketch")),
    ])
    run = fs.create_run({"name": "progress"}, arrays=BLOCKS, timesteps=TIMESTEPS, rows=rows, chunk_rows=CHUNK,
                        dtype="float32", provenance={})
    rng = np.random.default_rng(0)
    for chunk in range(run.n_chunks):
        n = len(range(N)[run.chunk_slice(chunk)])
        features = {(t, b): rng.standard_normal((n, *shape)).astype(np.float32)
                    for t in TIMESTEPS for b, shape in BLOCKS.items()}
        run.write_chunk(chunk, features, np.zeros(n, bool), [""] * n)
    return str(path)


@pytest.fixture(autouse=True)
def _loud():
    """Each test starts with progress on (a --quiet command leaves it off in this process)."""
    progress.set_quiet(False)
    yield
    progress.set_quiet(False)


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


COMMANDS = {  # the spellings alternate between the command's own and its alias
    "sweep": ["--block", "mid", "--timestep", "10", "--k", "3"],
    "knn": ["--blocks", "mid", "--timesteps", "10", "--k", "3"],
    "retrieve": ["--blocks", "mid", "--timesteps", "none", "--map-at", "all,5", "--precision-at", "5"],
    "fewshot": ["--head", "knn", "--shots", "1,2", "--block", "down", "--timestep", "10"],
    "probe": ["--blocks", "down", "--timesteps", "none"],
}


@pytest.mark.parametrize("command", COMMANDS)
def test_json_alone_on_stdout_and_nothing_on_stderr_without_a_terminal(store, tmp_path, command):
    """No terminal: no bar; these commands train no head, so stderr stays empty."""
    result = invoke(command, store, *COMMANDS[command], "--out", tmp_path, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert result.stderr == ""
    if command == "fewshot":  # fitted, not trained: no epochs
        assert all(s["epoch_log"] is None for s in doc["classifiers"][0]["scores"])


def test_fewshot_trained_head_prints_one_line_per_epoch_and_records_it(store, tmp_path):
    args = ["fewshot", store, "--head", "linear", "--shots", "1,2", "--seeds", "0,1", "--blocks", "mid",
            "--timesteps", "10", "--epochs", "3", "--out", tmp_path, "--json"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    (head,) = doc["classifiers"]
    expected = []
    for score in head["scores"]:
        assert len(score["epoch_log"]) == 2  # one list per seed
        for seed, records in zip(doc["seeds"], score["epoch_log"]):
            assert [r["epoch"] for r in records] == [1, 2, 3]
            assert all(r["val_top1"] is None and r["train_loss"] > 0 and r["seconds"] > 0 for r in records)
            expected += [f"{head['name']} seed {seed} {score['shots']}-shot  epoch {r['epoch']}/3  train loss "
                         f"{r['train_loss']:.4f}  val top-1 n/a  lr {r['lr']:.3g}  {r['seconds']:.2f} s" for r in records]
    assert sorted(result.stderr.splitlines()) == sorted(expected) and len(expected) == 2 * 2 * 3
    (saved,) = tmp_path.glob("fewshot-*.json")
    assert json.loads(saved.read_text()) == doc

    quiet = invoke(*args, "-q")
    assert quiet.exit_code == 0 and quiet.stderr == ""
    assert [s["top1"] for s in json.loads(quiet.stdout)["classifiers"][0]["scores"]] == \
        [s["top1"] for s in head["scores"]]
    assert list(tmp_path.glob("fewshot-*.json")) == [saved]  # the seconds are not in the file's digest


def on_a_terminal(*args: str) -> tuple[str, str]:
    """Run `featurestore args` with stderr on a pseudo-terminal, stdout on a pipe: (stdout, stderr)."""
    main, side = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "cli.main", *args], stdout=subprocess.PIPE, stderr=side,
                               stdin=subprocess.DEVNULL, cwd=Path(__file__).parents[2],
                               env={**os.environ, "COLUMNS": "120", "TERM": "xterm"})
    os.close(side)
    chunks: list[bytes] = []

    def drain() -> None:  # a full terminal buffer would block the child
        while True:
            try:
                data = os.read(main, 65536)
            except OSError:  # the child closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain)
    reader.start()
    stdout, _ = process.communicate(timeout=120)
    reader.join(timeout=10)
    os.close(main)
    assert process.returncode == 0, b"".join(chunks).decode(errors="replace")
    return stdout.decode(), b"".join(chunks).decode(errors="replace")


@pytest.mark.parametrize("quiet", [False, True])
def test_the_bar_is_drawn_on_a_terminals_stderr_never_on_stdout(store, tmp_path, quiet):
    stdout, stderr = on_a_terminal("knn", store, "--block", "mid", "--timestep", "10", "--k", "3", "--out",
                                   str(tmp_path), "--json", *(["--quiet"] if quiet else []))
    assert json.loads(stdout)["block"] == "mid" and "━" not in stdout
    if quiet:
        assert "knn" not in stderr and "━" not in stderr
    else:  # the last frame: every test and train image read
        assert re.search(r"knn.*t=10 mid.*━.*48/48", stderr), stderr


class Terminal(io.StringIO):
    """A stderr that says it is a terminal and records what is written to it."""

    def isatty(self) -> bool:
        return True

    def text(self) -> str:
        """What was written, without the terminal's control sequences."""
        return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", self.getvalue())


def test_nested_bars_share_one_display_and_logs_print_above_it(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stderr", terminal := Terminal())  # in the test: pytest sets sys.stderr before it
    with progress.bar("outer", "first", 2) as outer:
        with progress.bar("inner", "pass", 4) as inner:
            inner(4)
            progress.log("epoch 1/2 done")
            print("a result")  # stays on stdout (rich would divert it to the bar's stream)
        outer(1, description="second")
        outer()
    written = terminal.text()
    assert "outer first" in written and "inner pass" in written, written
    assert "\repoch 1/2 done\n" in written  # a line of its own, above the bars
    last = written.rsplit("outer", 1)[1]  # the final frame: the inner bar is gone
    assert last.startswith(" second") and "2/2" in last and "inner" not in last, written
    assert capsys.readouterr().out == "a result\n" and "a result" not in written


def test_quiet_draws_and_logs_nothing(monkeypatch):
    monkeypatch.setattr(sys, "stderr", terminal := Terminal())
    progress.set_quiet(True)
    with progress.bar("outer", "first", 1) as advance:
        progress.log("a line")
        advance()
    assert terminal.getvalue() == ""
    progress.set_quiet(False)  # the same, drawn
    with progress.bar("outer", "first", 1) as advance:
        progress.log("a line")
        advance()
    assert "outer first" in terminal.text() and "a line" in terminal.text()


def commands(group: click.Group, prefix: tuple[str, ...] = ()):
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from commands(command, (*prefix, name))
        else:
            yield (*prefix, name), command


def test_every_command_takes_both_spellings_of_block_and_timestep():
    """So that no command, present or future, forgets one."""
    checked = set()
    for path, command in commands(typer.main.get_command(app)):
        names = {name for param in command.params for name in param.opts}
        help_text = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "250"}).stdout  # no name cut short
        for pair in ALIASES:
            if names & set(pair):
                assert set(pair) <= names, f"{' '.join(path)} lacks {set(pair) - names}"
                param = next(p for p in command.params if set(pair) <= set(p.opts))
                assert param.multiple, f"{' '.join(path)} {pair[0]}: given twice, the last value would win silently"
                assert all(re.search(rf"{spelling}\b(?!s)", help_text) for spelling in pair), help_text
                checked.add(path[-1])
    assert {"probe", "knn", "sweep", "fewshot", "retrieve", "extract", "cka"} <= checked


@pytest.mark.parametrize(("command", "args", "message"), [
    ("knn", ["--blocks", "mid,down", "--timestep", "10"], "--block takes one value here, got 'mid,down'"),
    ("knn", ["--block", "mid", "--timesteps", "10,none"], "--timestep takes one value here, got '10,none'"),
    ("retrieve", ["--block", "mid", "--timesteps", "10,none"], "--timestep takes one value here"),
    ("knn", ["--block", "mid", "--block", "down", "--timestep", "10"], "--block takes one value here, got 'mid,down'"),
    ("retrieve", ["--block", "mid", "--timestep", "10", "--timestep", "none"], "--timestep takes one value here"),
])
def test_a_plural_spelling_with_several_values_is_refused_where_one_is_taken(store, tmp_path, command, args, message):
    result = invoke(command, store, *args, "--out", tmp_path)
    assert result.exit_code == 1 and result.output.count("\n") == 1 and result.output.startswith("error: ")
    assert message in result.output, result.output


@pytest.mark.parametrize("command", ["sweep", "fewshot"])
def test_a_repeated_option_keeps_every_value(store, tmp_path, command):
    """`--blocks mid --blocks down` once kept only the last value, silently."""
    extra = ["--k", "3"] if command == "sweep" else ["--head", "knn", "--shots", "1"]
    result = invoke(command, store, "--blocks", "mid", "--block", "down", "--timestep", "10", "--timesteps", "none",
                    *extra, "--out", tmp_path, "--json", "--quiet")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    if command == "sweep":
        assert {(r["timestep"], r["block"]) for r in doc["rows"]} == {(t, b) for t in (10, None) for b in ("mid", "down")}
    else:
        assert doc["config"]["blocks"] == ["mid", "down"] and doc["config"]["timesteps"] == [10, None]

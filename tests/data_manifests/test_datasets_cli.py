"""`featurestore datasets list`: the names --dataset accepts, with the YAML's title."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from cli.main import app
from data_manifests.manifest import list_datasets, load_dataset


def test_datasets_list_json_names_every_shipped_yaml_with_its_title():
    result = CliRunner().invoke(app, ["datasets", "list", "--json"])
    assert result.exit_code == 0, result.output
    entries = {e["name"]: e["description"] for e in json.loads(result.output)}
    assert list(entries) == list_datasets() and {"demo", "mnist-test", "cifar10-test", "sketchy"} <= entries.keys()
    assert entries["cifar10-test"] == "CIFAR-10 test set"
    assert entries["coop-dtd"] == "Describable Textures (DTD r1.0.1) with CoOp's fixed split"
    assert entries["sketchy"].endswith("in the ZS-SBIR layout")  # the title spans two comment lines
    assert all(entries.values())


def test_datasets_list_prints_one_line_per_name_that_load_dataset_takes():
    result = CliRunner().invoke(app, ["datasets", "list"])
    assert result.exit_code == 0, result.output
    names = [line.split()[0] for line in result.output.splitlines()]
    assert names == list_datasets()
    assert len(load_dataset(names[names.index("demo")])) == 2000

from __future__ import annotations

import re

import yaml

from .helpers import REPO


def _schema_keys(schema: dict, prefix: str = "") -> set[str]:
    keys = set()
    for name, spec in schema.get("properties", {}).items():
        if spec.get("type") == "object" and "properties" in spec:
            keys |= _schema_keys(spec, f"{prefix}{name}.")
        else:
            keys.add(prefix + name)
    return keys


def test_config_readme_documents_exactly_the_schema_keys():
    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
    documented = set(re.findall(r"^\| `([a-z_.]+)` \|", (REPO / "config/README.md").read_text(), re.M))
    assert documented == _schema_keys(schema)


def test_every_schema_key_has_a_description_and_a_default():
    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())

    def walk(spec, path):
        for name, sub in spec.get("properties", {}).items():
            assert "description" in sub, f"{path}{name} has no description"
            assert "default" in sub, f"{path}{name} has no default"
            walk(sub, f"{path}{name}.")

    walk(schema, "")

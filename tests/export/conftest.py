"""Shared fixtures for the export tests: the tiny LDM, its specs and its ONNX files."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_model(tiny_ldm_dir):
    """The tiny LDM loaded back from its checkpoint folder (EMA weights = training weights)."""
    from ldm.pretrained import load_pretrained

    return load_pretrained(tiny_ldm_dir)


@pytest.fixture(scope="session")
def tiny_specs(tiny_model):
    from export.specs import build_specs

    return build_specs(tiny_model.config)


@pytest.fixture(scope="session")
def tiny_onnx(tiny_model, tiny_specs, tmp_path_factory):
    """name -> model.onnx of each exported graph (exported once per session)."""
    from export.onnx_export import export_onnx
    from export.specs import GRAPHS

    root = tmp_path_factory.mktemp("onnx")
    return {name: export_onnx(GRAPHS[name](tiny_model), spec, root / name / "model.onnx")
            for name, spec in tiny_specs.items()}

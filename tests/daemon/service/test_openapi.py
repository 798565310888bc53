"""daemon/service/openapi.yaml is valid OpenAPI 3.1 and describes exactly the routes the app serves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import daemon.service
from daemon.service.api import routes

yaml = pytest.importorskip("yaml", reason="pyyaml is in the [test] extra")

SPEC = Path(daemon.service.__file__).parent / "openapi.yaml"


def _spec() -> dict:
    return yaml.safe_load(SPEC.read_text())


def _app_routes() -> set[tuple[str, str]]:
    return {(route.method.lower(), route.path) for route in routes}  # type: ignore[attr-defined]


def _spec_routes(spec: dict) -> set[tuple[str, str]]:
    methods = {"get", "post", "put", "patch", "delete"}
    return {(m, path) for path, item in spec["paths"].items() for m in item if m in methods}


def test_every_route_is_documented_and_every_documented_route_exists() -> None:
    app, documented = _app_routes(), _spec_routes(_spec())
    assert app - documented == set(), "routes missing from daemon/service/openapi.yaml"
    assert documented - app == set(), "daemon/service/openapi.yaml documents routes the app does not serve"


def test_path_parameters_are_declared() -> None:
    for path, item in _spec()["paths"].items():
        names = set(re.findall(r"{(\w+)}", path))
        for method, operation in item.items():
            declared = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
            assert declared == names, f"{method.upper()} {path}"


def test_spec_is_valid_openapi_3_1() -> None:
    validator = pytest.importorskip("openapi_spec_validator", reason="openapi-spec-validator not installed")
    spec = _spec()
    assert spec["openapi"].startswith("3.1")
    validator.validate(spec)


def test_every_operation_has_an_id_and_a_success_response() -> None:
    ids = []
    for path, item in _spec()["paths"].items():
        for method, operation in item.items():
            ids.append(operation["operationId"])
            assert "200" in operation["responses"], f"{method.upper()} {path}"
    assert len(ids) == len(set(ids))

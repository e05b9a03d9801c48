"""docs/configuration.md is generated from voiceprint/config.py and must match it.

Each parameter is described once, in its ``Field(description=...)``; the page is rendered from the
schema by scripts/gen_config_docs.py, so a new or changed parameter without a regenerated page
fails here rather than leaving the documentation stale.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
from pydantic import BaseModel

from voiceprint.config import Params

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gen_config_docs.py"
PAGE = REPO / "docs" / "configuration.md"


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_config_docs", SCRIPT)
    assert spec is not None and spec.loader is not None, SCRIPT
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _leaf_keys(model: type[BaseModel], prefix: str) -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += _leaf_keys(ann, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def test_configuration_page_is_up_to_date() -> None:
    expected = _generator().render()
    current = PAGE.read_text(encoding="utf-8") if PAGE.exists() else ""
    if current != expected:
        pytest.fail(
            f"{PAGE.relative_to(REPO)} does not match voiceprint/config.py: run python scripts/gen_config_docs.py"
        )


def test_rendering_is_deterministic() -> None:
    gen = _generator()
    assert gen.render() == gen.render()


def test_every_parameter_is_described_and_listed() -> None:
    text = _generator().render()
    keys = _leaf_keys(Params, "")
    assert "model.aam.margin" in keys and "model.augment.kinds" in keys  # the nested sections are walked
    for key in keys:
        assert f"| `{key}` |" in text, f"{key} missing from the generated page"


def test_a_field_without_a_description_is_refused() -> None:
    from pydantic import Field

    from voiceprint.config import _Section

    class Undocumented(_Section):
        documented: int = Field(default=1, description="Has one.")
        bare: int = 2

    with pytest.raises(ValueError, match=r"without a description.*'x\.bare'"):
        _generator().render_section("x", Undocumented, 2)

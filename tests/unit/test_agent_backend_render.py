"""examples/agent_backend/render.py: a displayed PNG is kept (base64) in its output, so
the HTTP result and the MCP server's image content carry it; the kept-bytes cap holds."""

from __future__ import annotations

import pytest


@pytest.fixture
def render(monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "examples"))
    from agent_backend import render

    return render


def display(data: dict) -> dict:
    return {"msg_type": "display_data", "content": {"data": data, "metadata": {}}}


def test_displayed_png_is_kept_with_its_text(render):
    execution = render.Execution()
    execution.handle(display({"text/plain": "<Figure size 640x480>", "image/png": "iVBORw0K\n"}))
    execution.handle(display({"text/plain": "plain"}))
    first, second = execution.outputs
    assert first["png"] == "iVBORw0K" and first["mime_types"] == ["image/png", "text/plain"]
    assert "png" not in second
    # The text says where the image went (a model reading only text knows there is one).
    assert execution.chunks == ["<Figure size 640x480>\n",
                                "[image/png, 6 bytes: base64 in outputs[0].png]\n", "plain\n"]


def test_images_count_against_the_kept_bytes(render):
    execution = render.Execution(limit=1000)
    execution.handle(display({"image/png": "A" * 2000}))
    assert execution.outputs == []
    assert "output truncated" in execution.chunks[-1]

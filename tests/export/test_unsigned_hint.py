"""The unsigned-bundle warning names only switches the device side really has."""

import re

from edge_agent import config as agent_config
from edge_agent.cli import _parser
from export.bundle import UNSIGNED_WARNING
from export_helpers import REPO


def _agent_flags(cmd: str) -> set[str]:
    sub = next(a for a in _parser()._actions if a.dest == "cmd").choices[cmd]
    return {s for a in sub._actions for s in a.option_strings}


def test_warning_and_docs_name_the_agent_config_key_and_the_verify_flag():
    assert "bundle.allow_unsigned" in UNSIGNED_WARNING
    assert "allow_unsigned" in {f.name for f in agent_config.Bundle.__dataclass_fields__.values()}
    assert "--allow-unsigned" in _agent_flags("verify") and "--allow-unsigned" not in _agent_flags("run")
    docs = (REPO / "docs" / "export.md").read_text()
    for text in (UNSIGNED_WARNING, docs):
        # every --allow-unsigned mentioned is tied to `edge-agent verify`, never to starting the agent
        for m in re.finditer(r"--allow-unsigned", text):
            assert "verify" in text[max(0, m.start() - 60):m.start()], text[max(0, m.start() - 80):m.end()]
    assert "started with `--allow-unsigned`" not in docs

"""The agent's import graph never reaches torch, meta_train or export (the device has none of them)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

CHECK = """
import sys
import edge_agent.agent, edge_agent.cli, edge_agent.config, edge_agent.model, edge_agent.protocol
import edge_agent.simulator, edge_agent.state, edge_agent.transport
import edge_agent.cli as cli
cli._parser()
bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'meta_train', 'export'))
print(bad)
sys.exit(1 if bad else 0)
"""


def test_edge_agent_never_imports_torch():
    r = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_sources_do_not_mention_forbidden_imports():
    for path in (REPO / "edge_agent").glob("*.py"):
        for line in path.read_text().splitlines():
            s = line.strip()
            if s.startswith(("import ", "from ")):
                assert not any(w in s.split() for w in ("torch", "meta_train", "export")), f"{path.name}: {s}"
                assert not s.startswith(("from torch", "from meta_train", "from export", "import torch")), s

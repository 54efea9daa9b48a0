"""Text rendering of the declared flow (for `opal topology show` and the README)."""

from __future__ import annotations

from topology.declared import Topology


def render_flow(topo: Topology) -> str:
    """One line per consumer group: inputs --[group: process]--> outputs."""
    lines = ["flow:"]
    for g in topo.groups:
        lines.append(f"  {' + '.join(g.reads)}")
        lines.append(f"      --[{g.group_id}: {g.process}]-->")
        for w in g.writes:
            lines.append(f"          {w}")
    return "\n".join(lines)

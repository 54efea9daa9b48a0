"""`opal topology ...`: apply and show the declared Kafka topics and consumer groups."""

from __future__ import annotations

import typer
from rich.table import Table

from opal.commands.common import console, exits_on, require_kafka, resolved_settings
from workers.kafka_clients import make_admin

app = typer.Typer(help="Kafka topics and consumer groups.", no_args_is_help=True)


@app.command("apply")
def topology_apply() -> None:
    """Create missing topics, verify existing ones; exit 1 on a mismatch."""

    from topology.admin import TopologyMismatchError, apply_topology
    from topology.declared import build_topology

    s = resolved_settings()
    require_kafka(s)
    with exits_on(TopologyMismatchError, code=1):
        results = apply_topology(make_admin(s.kafka), build_topology(s))
    table = Table("topic", "status", "detail", title=f"topology on {s.kafka.bootstrap}")
    for r in results:
        table.add_row(r.name, r.status, r.detail)
    console.print(table)


@app.command("show")
def topology_show() -> None:
    """Print the declared topics, consumer groups and the flow between them."""
    from topology.declared import build_topology
    from topology.render import render_flow

    topo = build_topology(resolved_settings())
    t = Table("topic", "partitions", "key", "value", "configs", "purpose", title="topics")
    for spec in topo.topics:
        t.add_row(
            spec.name,
            str(spec.partitions),
            spec.key,
            spec.value.__name__,
            ", ".join(f"{k}={v}" for k, v in spec.configs.items()),
            spec.description,
        )
    console.print(t)
    g = Table("group", "reads", "writes", "process", title="consumer groups")
    for grp in topo.groups:
        g.add_row(grp.group_id, "\n".join(grp.reads), "\n".join(grp.writes), grp.process)
    console.print(g)
    console.print(render_flow(topo), markup=False, highlight=False)

"""Join the per-node manifests of a multi-node run (--num-nodes K --node-rank I) into manifest.json.

Checks that every node finished with the same settings and that the shards cover every unit.
"""
from __future__ import annotations

from data_prep.commands._common import reports_errors

HELP = "merge per-node manifests (manifest.node-*-of-*.json) into manifest.json"


def add_arguments(parser):
    parser.add_argument("dir", help="shard directory shared by the nodes")


@reports_errors
def run(args) -> int:
    from data_prep.pipeline import merge_node_manifests

    merged = merge_node_manifests(args.dir)
    t = merged["splits"]
    print(f"merged {merged['nodes']} node manifests: {t['train']['shards']} train shards "
          f"({t['train']['samples']:,} samples), {t['val']['shards']} val shards ({t['val']['samples']:,} samples)")
    return 0

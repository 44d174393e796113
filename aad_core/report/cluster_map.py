"""``cluster_map.png``: drawn from the projection ``aad cluster`` saves (``cluster_map.json``).

The cluster stage computes the 2-D PCA projection (numbers, pipeline layer); drawing it with
matplotlib belongs with the other plots, so ``aad cluster`` and the report call this after the stage.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from aad_core.artifacts import ClusterMap, ClusterState, png_path

if TYPE_CHECKING:
    from aad_core.workspace import Workspace

log = logging.getLogger(__name__)


def draw_cluster_map(ws: Workspace) -> Path | None:
    """``cluster_map.png`` of the current clusters, drawn now if the cluster stage left a projection
    not drawn yet. None when there is nothing to draw or matplotlib is not installed."""
    path = png_path(ws)
    if path.exists():
        return path
    cluster_map = ClusterMap.load_optional(ws)
    state = ClusterState.load_optional(ws)
    if cluster_map is None or state is None:
        return None
    from aad_core.report import plots

    try:
        return plots.write_cluster_map(path, cluster_map, state.clusters)
    except ImportError as err:  # matplotlib is an optional extra
        log.warning("cluster map not drawn (%s); pip install 'aad[eval]'", err)
        return None

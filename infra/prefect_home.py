"""Where Prefect keeps its state when no server is configured: inside the project's data folder.

Prefect reads its settings when it is first imported, so this runs before any Prefect import: with
``PREFECT_API_URL`` set, runs go to that server and nothing is changed; without it, runs use a Prefect
home under the data folder (never the user's ``~/.prefect``), and telemetry is off either way.
"""

from __future__ import annotations

import os
from pathlib import Path


def use_project_prefect_home(data_folder: Path) -> Path | None:
    """Point Prefect at ``data_folder/prefect`` unless a server or a home is already configured."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if os.environ.get("PREFECT_API_URL") or os.environ.get("PREFECT_HOME"):
        return None
    home = Path(data_folder).resolve() / "prefect"
    home.mkdir(parents=True, exist_ok=True)
    os.environ["PREFECT_HOME"] = str(home)
    return home

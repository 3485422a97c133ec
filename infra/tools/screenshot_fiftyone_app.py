"""Screenshots of the FiftyOne App: one group of the demo's pairs catalogue (the cat's pair), and the
generated image of the demo's evaluation with the lowest DINO, with its scores, in the DreamBench catalogue.

    python infra/tools/screenshot_fiftyone_app.py [--data /tmp/blipdiff-app] [--dataset blipdiff-demo] [--port 5252]

Runs `blipdiff demo` (which catalogues its pairs into DATASET and its evaluation into DATASET-dreambench),
starts `blipdiff app` on 127.0.0.1, and has headless Chromium (Debian's `chromium`) capture into docs/img/
the group of the cat's pair, and the saved view `lowest-dino` with that image open in the sample modal.
Everything it starts, it stops.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from blipdiff.infra.tools.screenshots import IMAGES, find_chromium, screenshot, wait_for

BLIPDIFF = Path(sys.executable).parent / "blipdiff"


def cat_group_id(dataset_name: str) -> str:
    from fiftyone import ViewField as F

    from blipdiff.datasets.catalog import import_fiftyone

    fo = import_fiftyone()

    return fo.load_dataset(dataset_name).match(F("label") == "Cat").first().group.id


def lowest_dino_sample_id(dataset_name: str) -> str:
    """The lowest-DINO image of the run the demo just catalogued: the catalogue keeps earlier runs (other
    demos' too), whose folders may be gone."""
    from blipdiff.datasets.catalog import import_fiftyone

    fo = import_fiftyone()

    return fo.load_dataset(dataset_name).load_saved_view("latest-run").sort_by("dino").first().id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "blipdiff-app")
    parser.add_argument("--dataset", default="blipdiff-demo")
    parser.add_argument("--port", type=int, default=5252)
    args = parser.parse_args()
    chromium = find_chromium()
    demo = subprocess.run([str(BLIPDIFF), "demo", "--out", str(args.data), "--dataset", args.dataset],
                          capture_output=True, text=True, timeout=900)
    if demo.returncode != 0:
        sys.exit(f"the demo failed:\n{demo.stderr[-3000:]}")
    group = cat_group_id(args.dataset)
    evaluations = f"{args.dataset}-dreambench"
    sample = lowest_dino_sample_id(evaluations)
    # One App for both: a page's path names its dataset.
    app = subprocess.Popen([str(BLIPDIFF), "app", "--dataset", args.dataset, "--port", str(args.port)],
                           start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{args.port}"
        wait_for(base, 180)
        IMAGES.mkdir(parents=True, exist_ok=True)
        # Wide enough that the group's carousel shows all five slices.
        screenshot(chromium, f"{base}/datasets/{args.dataset}?groupId={group}", IMAGES / "fiftyone-catalog-group.png",
                   size="1920,1000")
        # Tall enough that the modal's sidebar reaches the scores.
        screenshot(chromium, f"{base}/datasets/{evaluations}?view=lowest-dino&id={sample}",
                   IMAGES / "fiftyone-dreambench.png", size="1600,1700")
    finally:
        os.killpg(app.pid, signal.SIGTERM)
        app.wait(timeout=60)


if __name__ == "__main__":
    main()

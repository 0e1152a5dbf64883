"""Split: positives -> train / test, and the same split of train -> train' / validation.

``temporal_user`` is the protocol of docs/protocol.md: each user's positives sorted by (timestamp,
item id), the last floor(f * n + 0.5) to test, users with fewer than ``min_user_positives`` train-only.
"""

from __future__ import annotations

import pandas as pd

from fuserec.config import Params
from fuserec.data.dataset import INTERACTIONS_FILE
from fuserec.layout import Layout
from fuserec.manifest import write_json
from fuserec.splitting import split_all


def split(params: Params) -> str:
    if params.task == "rating":  # the rating task's split: same folders, its own content
        from fuserec.stages.rating.split import split as rating_split

        return rating_split(params)
    layout = Layout(params.outputs_dir)
    frame = pd.read_parquet(layout.clean / INTERACTIONS_FILE)
    parts = split_all(frame, params.split)
    layout.split.mkdir(parents=True, exist_ok=True)
    for name, part in parts.items():
        part.to_parquet(layout.split_file(name), index=False)
    summary = {name: {"interactions": len(p), "users": int(p["user"].nunique())} for name, p in parts.items()}
    write_json(layout.split / "summary.json", {"method": params.split.method, **summary})
    return str(layout.split)

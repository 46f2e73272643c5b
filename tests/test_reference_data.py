"""Every published-figure CSV in data/reference parses, and every row says where it came from."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

REF = Path(__file__).resolve().parent.parent / "data" / "reference"
FILES = sorted(REF.glob("*.csv"))
VALUE_COLUMNS = ("value", "value_high", "ratio", "ratio_high")


def test_there_is_reference_data():
    assert FILES, f"no CSV files in {REF}"
    assert (REF / "README.md").exists()


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_reference_csv(path):
    df = pd.read_csv(path, dtype={"verified": str, "source": str})
    assert len(df) > 0, f"{path.name} has no rows"
    for col in ("source", "source_url", "verified", "via"):
        assert col in df.columns, f"{path.name} lacks a {col!r} column"
    src = df["source"].fillna("").astype(str).str.strip()
    assert (src != "").all(), f"{path.name}: rows without a source: {list(df.index[src == ''])}"
    bad = sorted(set(df["verified"].fillna("")) - {"yes", "secondary", "no"})
    assert not bad, f"{path.name}: verified must be yes, secondary or no, found {bad}"
    # a secondary figure names the text it was read in
    sec = df[df["verified"] == "secondary"]
    assert sec["via"].fillna("").astype(str).str.strip().ne("").all(), f"{path.name}: secondary rows without via"
    for col in VALUE_COLUMNS:
        if col in df.columns:
            vals = df[col].dropna()
            num = pd.to_numeric(vals, errors="coerce")
            assert num.notna().all(), f"{path.name}: non-numeric {col}: {list(vals[num.isna()])}"

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


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_every_reference_file_is_used(path):
    """A reference file that no lesson or module reads is dead weight: use it or remove it."""
    root = REF.parent.parent
    sources = [*(root / "vmlab").rglob("*.py"), *(root / "notebooks").rglob("*.ipynb")]
    users = [p for p in sources if ".ipynb_checkpoints" not in p.parts and path.name in p.read_text()]
    assert users, f"{path.name}: no module in vmlab/ and no notebook reads it"


def test_mmu_rows_agree_with_the_walk_arithmetic():
    """The 2D page walk's worst case is (n+1)(m+1)-1 page-table references, plus one for the data."""
    df = pd.read_csv(REF / "mmu_virtualization.csv")
    for _, r in df[df.metric.str.startswith("max_2d_walk")].iterrows():
        n, m = int(r.guest_levels), int(r.host_levels)
        refs = (n + 1) * (m + 1) - 1
        assert r.value == (refs + 1 if "with_data" in r.metric else refs), r.metric

"""The Tmall 2014 brand log reader, and the data source that uses it."""

from __future__ import annotations

import pandas as pd
import pytest

from fedml.config import DataConfig
from fedml.data.schema import EVENT, ITEM, RATING, TIMESTAMP, USER
from fedml.data.sources import load_source
from fedml.data.tmall import DATA_FILE, load_tmall
from tests.conftest import DATA_DIR

TMALL_DIR = DATA_DIR / "tmall-brand-2014"


def _write(tmp_path, text: str):
    path = tmp_path / DATA_FILE
    path.write_text(text)
    return path


def test_reads_the_funnel_and_the_day(tmp_path):
    _write(tmp_path, "user_id,brand_id,type,visit_datetime\n7,100,0,4-15\n7,100,1,8-15\n8,200,2,6-4\n8,201,3,6-4\n")
    df = load_tmall(tmp_path)  # the folder or the file
    assert df[EVENT].tolist() == ["view", "purchase", "favourite", "cart"]
    assert df[USER].tolist() == ["7", "7", "8", "8"] and df[ITEM].tolist() == ["100", "100", "200", "201"]
    assert df[RATING].isna().all()
    expected = [pd.Timestamp(f"2014-{d} 00:00", tz="UTC").timestamp() for d in ("04-15", "08-15", "06-04", "06-04")]
    assert df[TIMESTAMP].tolist() == expected and df[TIMESTAMP].dtype == "int64"
    assert load_tmall(tmp_path / DATA_FILE).equals(df)


@pytest.mark.parametrize(
    "text, match",
    [
        ("user,brand,type,date\n1,2,0,4-15\n", "expected header"),
        ("user_id,brand_id,type,visit_datetime\n1,2,0,4-15\n1,2,5,4-16\n", "line 3: type '5'"),
        ("user_id,brand_id,type,visit_datetime\n1,2,0,4-15\n1,2,0,13-1\n", "line 3: visit_datetime '13-1'"),
    ],
)
def test_errors_name_the_file_and_line(tmp_path, text, match):
    path = _write(tmp_path, text)
    with pytest.raises(ValueError, match=match) as info:
        load_tmall(path)
    assert str(path) in str(info.value)
    with pytest.raises(FileNotFoundError, match="Tmall log not found"):
        load_tmall(tmp_path / "absent")


@pytest.mark.realdata
@pytest.mark.skipif(not TMALL_DIR.exists(), reason=f"{TMALL_DIR} not found (set FEDML_DATA_DIR)")
def test_source_reads_the_real_log():
    source = load_source(DataConfig(source="tmall", path=str(TMALL_DIR)))
    df = source.interactions
    assert source.name == "tmall-brand-2014" and len(df) == 182_880
    assert df[USER].nunique() == 884 and df[ITEM].nunique() == 9_531
    assert df[EVENT].value_counts().to_dict() == {"view": 174_539, "purchase": 6_984, "favourite": 1_204, "cart": 153}
    days = pd.to_datetime(df[TIMESTAMP], unit="s").dt.strftime("%m-%d")
    assert days.min() == "04-15" and days.max() == "08-15" and days.nunique() == 123

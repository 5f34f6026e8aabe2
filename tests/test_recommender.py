"""The recommender on a hand-made two-cluster item table, and the same model as an MLflow pyfunc."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import fedml
from fedml.data.ids import IdMap
from fedml.models.mf import FOLD_IN_ITERATIONS, ItemTable, fold_in, score_all
from fedml.serving.recommender import IDS_FILE, Recommender

CLUSTER = 6  # items i0..i5 share one direction, i6..i11 another
A = [f"i{i}" for i in range(CLUSTER)]
B = [f"i{i}" for i in range(CLUSTER, 2 * CLUSTER)]
SHOPPERS = ["alice@example.com", "bob-4711"]  # in the training IdMap; must not be published


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def table() -> ItemTable:
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[2.0, 0.0, 0.0]] * CLUSTER + [[0.0, 2.0, 0.0]] * CLUSTER)
    embeddings = centres + 0.1 * torch.randn(2 * CLUSTER, 3, generator=generator)
    bias = 0.05 * torch.randn(2 * CLUSTER, generator=generator)
    return ItemTable(embeddings, bias)


@pytest.fixture(scope="module")
def recommender(table) -> Recommender:
    return Recommender(table=table, ids=IdMap(users=SHOPPERS, items=A + B), negatives=4, fold_in_l2=1.0)


def test_fold_in_prefers_items_like_the_history(table):
    vectors = fold_in(table, [np.array([0, 1]), np.array([6, 7, 8])], negatives=4, l2=1.0)
    scores = score_all(table, vectors)
    assert scores.shape == (2, 2 * CLUSTER)
    # shopper of cluster A: every unseen A item above every B item; and the other way round
    assert scores[0, 2:CLUSTER].min() > scores[0, CLUSTER:].max()
    assert scores[1, [9, 10, 11]].min() > scores[1, :CLUSTER].max()
    # deterministic: the same computation gives the same vectors
    again = fold_in(table, [np.array([0, 1]), np.array([6, 7, 8])], negatives=4, l2=1.0)
    assert torch.equal(vectors, again)


def test_recommends_k_unseen_items_of_the_same_taste(recommender):
    rec = recommender.recommend(["i0", "i1"], k=3)
    assert len(rec.items) == len(rec.scores) == 3
    assert set(rec.items) <= set(A) - {"i0", "i1"}
    assert rec.scores == sorted(rec.scores, reverse=True)
    assert rec.unknown_items == []
    # k beyond the unseen catalogue: everything not seen, history still excluded
    everything = recommender.recommend(["i0", "i1"], k=50)
    assert sorted(everything.items) == sorted(set(A + B) - {"i0", "i1"})
    assert everything.items[:4] and set(everything.items[:4]) == set(A) - {"i0", "i1"}


def test_new_shopper_gets_recommendations_from_history_alone(recommender):
    # nobody with this history was ever trained: the user vector comes from fold-in
    rec = recommender.recommend(["i7", "i9", "i6"], k=3)
    assert set(rec.items) <= set(B) - {"i6", "i7", "i9"}
    cold = recommender.recommend([], k=4)  # no history at all: still k items (by bias)
    assert len(cold.items) == 4 and cold.unknown_items == []


def test_unknown_items_are_reported_not_fatal(recommender):
    rec = recommender.recommend(["i0", "no-such-item", "i1", "gone"], k=3)
    assert rec.unknown_items == ["no-such-item", "gone"]
    assert rec.items == recommender.recommend(["i0", "i1"], k=3).items
    only_unknown = recommender.recommend(["x"], k=2)
    assert only_unknown.unknown_items == ["x"] and len(only_unknown.items) == 2


def test_deterministic_and_batch_equals_single(recommender):
    histories = [["i0", "i1"], ["i8"], ["i0", "i0", "i6"], []]
    first = recommender.recommend_many(histories, k=4)
    assert recommender.recommend_many(histories, k=4) == first
    # one at a time: the same items (scores equal up to float32 rounding of the batched solve)
    single = [recommender.recommend(h, k=4) for h in histories]
    assert [r.items for r in single] == [r.items for r in first]
    for one, batched in zip(single, first):
        assert one.scores == pytest.approx(batched.scores, rel=1e-5, abs=1e-6)
    # duplicates in the history count once, order does not matter
    assert recommender.recommend(["i6", "i0"], k=4).items == first[2].items


@pytest.mark.parametrize("k", [0, -1])
def test_k_below_one_raises(recommender, k):
    with pytest.raises(ValueError, match="k must be at least 1"):
        recommender.recommend(["i0"], k=k)


def test_save_load_round_trip_without_user_ids(recommender, tmp_path):
    directory = recommender.save(tmp_path / "model")
    loaded = Recommender.load(directory)
    for history in (["i0", "i1"], ["i6"], ["zz", "i3"], []):
        assert loaded.recommend(history, k=5) == recommender.recommend(history, k=5)
    assert (loaded.negatives, loaded.fold_in_l2, loaded.fold_in_iterations) == (4, 1.0, FOLD_IN_ITERATIONS)
    torch.testing.assert_close(loaded.table.embeddings, recommender.table.embeddings)
    ids = json.loads((directory / IDS_FILE).read_text())
    assert ids["users"] == [] and ids["items"] == A + B
    assert loaded.ids.users == [] and loaded.ids.items == A + B
    # no shopper id anywhere in the published files
    for path in directory.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            assert not any(shopper.encode() in content for shopper in SHOPPERS), path


# --- MLflow pyfunc --------------------------------------------------------------------------------

REQUEST = pd.DataFrame({"history": [["i1", "i2"], ["i3"]], "k": [3, 2]})


@pytest.fixture(scope="module")
def logged_model(recommender, tmp_path_factory):
    """The recommender logged as a pyfunc model into a throw-away local tracking store."""
    env = pytest.MonkeyPatch()
    env.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow
    import mlflow.pyfunc

    from fedml.serving.pyfunc import ShoppingGuideModel, signature

    tmp = tmp_path_factory.mktemp("mlflow")
    directory = recommender.save(tmp / "recommender")
    previous_uri, previous_path = mlflow.get_tracking_uri(), list(sys.path)
    tracking_uri = f"sqlite:///{tmp}/mlflow.db"
    mlflow.set_tracking_uri(tracking_uri)
    try:
        experiment = mlflow.create_experiment("recommender-test", artifact_location=(tmp / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*input example was not provided")
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=ShoppingGuideModel(),
                artifacts={"recommender": str(directory)},
                signature=signature(),
                pip_requirements=["torch==2.13.0"],
                code_paths=[str(Path(fedml.__file__).parent)],  # the package folder, cwd-independent
            )
        model = mlflow.pyfunc.load_model(info.model_uri)  # prepends the logged code folder to sys.path
        yield dict(info=info, model=model, tracking_uri=tracking_uri, tmp=tmp)
    finally:
        sys.path[:] = previous_path
        mlflow.set_tracking_uri(previous_uri)
        env.undo()


def _as_records(frame: pd.DataFrame) -> list[dict]:
    return [{key: list(value) for key, value in row.items()} for row in frame.to_dict("records")]


def test_pyfunc_predicts_what_the_recommender_recommends(logged_model, recommender):
    out = logged_model["model"].predict(REQUEST)
    assert list(out.columns) == ["items", "scores", "unknown_items"]
    expected = [recommender.recommend(["i1", "i2"], k=3), recommender.recommend(["i3"], k=2)]
    assert out["items"].tolist() == [e.items for e in expected]
    for got, want in zip(out["scores"], expected):
        assert got == pytest.approx(want.scores, rel=1e-6)
    assert out["unknown_items"].tolist() == [[], []]


def test_pyfunc_input_formats(logged_model, recommender):
    from mlflow.exceptions import MlflowException

    model = logged_model["model"]
    expected = _as_records(model.predict(REQUEST))
    # numpy arrays in the cells and an int32 k pass schema enforcement too
    arrays = pd.DataFrame({"history": [np.array(["i1", "i2"]), np.array(["i3"])], "k": np.array([3, 2], np.int32)})
    assert _as_records(model.predict(arrays)) == expected
    # the optional k column may be left out (10 items, here every unseen one)
    no_k = model.predict(REQUEST[["history"]])
    assert no_k["items"].tolist() == [recommender.recommend(["i1", "i2"]).items, recommender.recommend(["i3"]).items]
    # unknown ids come back, an empty history is a cold start
    mixed = model.predict(pd.DataFrame({"history": [["i1", "nope"], []], "k": [2, 2]}))
    assert mixed["unknown_items"].tolist() == [["nope"], []]
    # what MLflow's schema enforcement rejects for Array(string): a plain string and None cells
    for cell in ("i1,i2", None):
        with pytest.raises(MlflowException, match="Expected data to be list or numpy array"):
            model.predict(pd.DataFrame({"history": [cell], "k": [2]}))


def test_pyfunc_rest_payload_round_trip(logged_model):
    # the JSON body `mlflow models serve` receives, parsed as the scoring server parses it
    from mlflow.pyfunc.scoring_server import infer_and_parse_data, predictions_to_json

    model = logged_model["model"]
    body = {"dataframe_split": {"columns": ["history", "k"], "data": [[["i1", "i2"], 3], [["i3"], 2]]}}
    frame = infer_and_parse_data(body, schema=model.metadata.get_input_schema())
    out = model.predict(frame)
    assert _as_records(out) == _as_records(model.predict(REQUEST))
    buffer = io.StringIO()
    predictions_to_json(out, buffer)
    assert json.loads(buffer.getvalue())["predictions"][0]["items"] == out["items"][0]


def test_pyfunc_loads_from_its_own_code_in_a_fresh_process(logged_model, tmp_path):
    """Only the logged code makes ``fedml`` importable: no checkout on the path, another cwd."""
    script = (
        "import json, sys, mlflow.pyfunc, pandas as pd\n"
        "model = mlflow.pyfunc.load_model(sys.argv[1])\n"
        "import fedml\n"
        "out = model.predict(pd.DataFrame({'history': [['i1', 'i2'], ['i3']], 'k': [3, 2]}))\n"
        "print(json.dumps({'fedml': fedml.__file__, 'items': out['items'].tolist()}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(MLFLOW_TRACKING_URI=logged_model["tracking_uri"], MLFLOW_DISABLE_TELEMETRY="true")
    result = subprocess.run(
        [sys.executable, "-c", script, logged_model["info"].model_uri],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["items"] == logged_model["model"].predict(REQUEST)["items"].tolist()
    # fedml came from the model's code folder, not from this checkout
    assert Path(payload["fedml"]).resolve().parent.parent.name == "code"
    assert Path(fedml.__file__).resolve().parent.parent != Path(payload["fedml"]).resolve().parent.parent


def test_the_configured_fold_in_cap_is_the_library_default():
    from fedml.config import ModelConfig

    assert ModelConfig().fold_in_iterations == FOLD_IN_ITERATIONS == Recommender.fold_in_iterations

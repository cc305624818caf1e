"""split: deterministic, disjoint, complete; a question never straddles two splits."""

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qatune.errors import QatuneError
from qatune.formats import dedup_key, question_text
from qatune.split import split_counts, split_rows


def make_rows(spec):
    """spec: list of (question number, topic) -> canonical rows; repeated numbers share a question."""
    return [
        {
            "id": f"{i:04d}",
            "prompt": [{"role": "user", "content": f"Question {q}?"}],
            "chosen": f"A{i}",
            "rejected": None,
            "topic": t,
        }
        for i, (q, t) in enumerate(spec)
    ]


specs = st.lists(st.tuples(st.integers(0, 40), st.sampled_from(["a", "b", "c"])), min_size=10, max_size=80)


@settings(max_examples=100, deadline=None)
@given(specs, st.integers(0, 10_000), st.sampled_from([0.1, 0.2, 2]), st.sampled_from(["topic", None]))
def test_split_is_complete_disjoint_grouped_and_deterministic(spec, seed, size, stratify):
    rows = make_rows(spec)
    out = split_rows(rows, size, size, seed, stratify)
    ids = [r["id"] for part in out.values() for r in part]
    assert sorted(ids) == sorted(r["id"] for r in rows)  # complete, and disjoint (no id twice)
    owner = {}
    for name, part in out.items():
        for r in part:
            key = dedup_key(question_text(r["prompt"]))
            assert owner.setdefault(key, name) == name, "a question straddles two splits"
    again = split_rows(list(reversed(rows)), size, size, seed, stratify)
    assert {k: [r["id"] for r in v] for k, v in again.items()} == {
        k: [r["id"] for r in v] for k, v in out.items()
    }


def test_fractions_counts_and_stratification():
    rows = make_rows([(i, "abcd"[i % 4]) for i in range(400)])
    out = split_rows(rows, 0.1, 0.2, seed=1)
    assert (len(out["val"]), len(out["test"]), len(out["train"])) == (40, 80, 280)
    assert Counter(r["topic"] for r in out["test"]) == {t: 20 for t in "abcd"}
    out = split_rows(rows, 50, 30, seed=1)
    assert (len(out["val"]), len(out["test"])) == (50, 30)


def test_different_seed_different_split():
    rows = make_rows([(i, "a") for i in range(100)])
    a, b = split_rows(rows, 0.2, 0.2, 1), split_rows(rows, 0.2, 0.2, 2)
    assert {r["id"] for r in a["test"]} != {r["id"] for r in b["test"]}


def test_too_big_val_and_test_is_an_error():
    with pytest.raises(QatuneError, match="leaves no training rows"):
        split_rows(make_rows([(i, "a") for i in range(10)]), 5, 5, 0)
    with pytest.raises(QatuneError, match="neither a fraction"):
        split_rows(make_rows([(i, "a") for i in range(10)]), 1.5, 1, 0)


def test_counts():
    out = split_rows(make_rows([(i, "ab"[i % 2]) for i in range(20)]), 0.1, 0.1, 0)
    c = split_counts(out)
    assert sum(c["rows"].values()) == 20 and c["by_topic"]["a"]["test"] == 1


def test_sources_with_use_as_keep_their_own_split_as_given():
    train = [{**r, "source": "train_file"} for r in make_rows([(q, "a") for q in range(50)])]
    val = [
        {**r, "id": f"v{r['id']}", "source": "val_file"}
        for r in make_rows([(q, "a") for q in range(100, 108)])
    ]
    given = {"train_file": "train", "val_file": "val"}
    out = split_rows(train + val, 0, 0, seed=3, given=given)
    assert sorted(r["id"] for r in out["val"]) == sorted(r["id"] for r in val)  # exactly the file, no more
    assert len(out["train"]) == 50 and out["test"] == []
    assert out == split_rows(list(reversed(train + val)), 0, 0, seed=3, given=given)
    counts = split_counts(out)
    assert counts["rows"] == {"train": 50, "val": 8, "test": 0} and counts["questions_in_two_splits"] == 0
    # a given val file with one question that is also in train is kept as given, and the count says so
    leak = [{**val[0], "id": "leak", "prompt": train[0]["prompt"]}]
    assert split_counts(split_rows(train + leak, 0, 0, 3, given=given))["questions_in_two_splits"] == 1
    # given train, the other rows are split by fraction: seed 001 plus a test split carved from a third file
    extra = [
        {**r, "id": f"x{r['id']}", "source": "more"} for r in make_rows([(q, "a") for q in range(200, 220)])
    ]
    out = split_rows(train + val + extra, 0, 0.5, seed=3, given=given)
    assert len(out["test"]) == 10 and all(r["source"] == "more" for r in out["test"])
    with pytest.raises(QatuneError, match="every source has use_as"):
        split_rows(train + val, 0.1, 0, seed=3, given=given)


def test_params_refuse_a_fraction_for_a_split_a_source_gives():
    import yaml

    from qatune.params import PARAMS_FILE, parse_params

    with open(PARAMS_FILE) as f:
        data = yaml.safe_load(f)
    data["fetch"]["sources"].append({"name": "v", "type": "local", "path": "v.jsonl", "use_as": "val"})
    with pytest.raises(QatuneError, match="split.val is 0.1 but a source has use_as: val"):
        parse_params(data)
    data["split"]["test"] = 0
    data["split"]["val"] = 0
    with pytest.raises(QatuneError, match="there is no test split"):
        parse_params(data)
    data["evaluate"]["split"] = "val"
    assert parse_params(data).evaluate.split == "val"

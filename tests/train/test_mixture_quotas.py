"""Quotas: how a mixture's total is shared among its tasks (hand-worked cases)."""
from shoptune.train.mixture import MixtureConfig, _quotas

SIZES = {"a": 100, "b": 100, "c": 100, "rank": 300}


def test_temperature_large_is_uniform_and_quotas_sum_to_total():
    q = _quotas(SIZES, MixtureConfig(total=10, temperature=1000.0))
    assert sum(q.values()) == 10 and sorted(q.values()) == [2, 2, 3, 3]


def test_weights_alone_select_the_listed_tasks():
    q = _quotas(SIZES, MixtureConfig(total=40, weights={"a": 1, "rank": 3}))
    assert q == {"a": 10, "b": 0, "c": 0, "rank": 30}


def test_star_weight_applies_to_unlisted_tasks_so_one_task_can_be_boosted():
    q = _quotas(SIZES, MixtureConfig(total=80, weights={"*": 1, "rank": 5}))
    assert q == {"a": 10, "b": 10, "c": 10, "rank": 50}


def test_quota_never_exceeds_the_pool_without_upsampling():
    q = _quotas({"a": 5, "b": 100}, MixtureConfig(total=40, weights={"*": 1}))
    assert q == {"a": 5, "b": 20}
    assert _quotas({"a": 5, "b": 100}, MixtureConfig(total=40, weights={"*": 1}, upsample=True))["a"] == 20

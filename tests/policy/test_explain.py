"""`explain`: the rows decide applies, the table, the diff and their JSON, and the goldens."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from jitgate.policy import explain, model
from jitgate.policy.explain import Aspect, Change, Reach
from tests.policy import golden

BASE = """
[connections.replica]
kind = "postgres"
environment = "production"
read_only = true

[connections.pods]
kind = "kubernetes"
environment = "staging"
namespace = "payments"

[[bindings]]
group = "platform"
connection = "replica"
max_ttl = "5m"

[[bindings]]
group = "sre"
connection = "replica"
max_ttl = "10m"
require_reason = true
max_concurrent = 2

[[bindings]]
group = "platform"
connection = "pods"
max_ttl = 90
"""


def example(path: object = golden.EXAMPLE) -> model.Policy:
    return model.load(golden.ROOT / str(path))


def row(**changes: object) -> Reach:
    base = Reach(
        group="g",
        connection="c",
        kind="postgres",
        environment="staging",
        read_only=True,
        namespace="",
        max_ttl=300,
        require_reason=True,
        max_concurrent=1,
        binding="bindings[0]",
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def test_rows_keep_file_order() -> None:
    rows = explain.reach(model.parse(BASE))
    assert [(r.group, r.connection, r.max_ttl, r.binding) for r in rows] == [
        ("platform", "replica", 300, "bindings[0]"),
        ("sre", "replica", 600, "bindings[1]"),
        ("platform", "pods", 90, "bindings[2]"),
    ]
    assert (rows[1].require_reason, rows[1].max_concurrent) == (True, 2)
    assert (rows[2].kind, rows[2].namespace) == ("kubernetes", "payments")
    assert (rows[0].read_only, rows[0].environment) == (True, "production")


def test_filters() -> None:
    policy = model.parse(BASE)
    assert [r.connection for r in explain.reach(policy, group="platform")] == ["replica", "pods"]
    assert [r.group for r in explain.reach(policy, connection="replica")] == ["platform", "sre"]
    assert explain.reach(policy, group="sre", connection="pods") == []
    assert explain.reach(policy, group="nobody") == []


def test_only_bindings_decide_can_apply() -> None:
    text = BASE + '[[bindings]]\ngroup="x"\nconnection="nope"\nmax_ttl=1\n'
    text += '[[bindings]]\ngroup="sre"\nconnection="replica"\nmax_ttl=1\n'
    rows = explain.reach(model.read(text))  # read: these are lint errors
    assert [r.binding for r in rows] == ["bindings[0]", "bindings[1]", "bindings[2]"]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (5, "5s"),
        (60, "1m"),
        (90, "1m30s"),
        (300, "5m"),
        (3600, "1h"),
        (5430, "1h30m30s"),
        (0, "0s"),
    ],
)
def test_duration(seconds: int, text: str) -> None:
    assert explain.duration(seconds) == text


def test_the_table_aligns_wide_characters() -> None:
    rows = [row(group="数据"), row(group="data")]
    lines = explain.render_table(rows).splitlines()
    assert lines[1].index("c ") == lines[2].index("c ") - 2  # each wide character is two columns
    assert all(line == line.rstrip() for line in lines)


def test_the_table_escapes_control_characters() -> None:
    text = explain.render_table([row(group="evil\x1b]0;owned\x07", namespace="\u202ens")])
    assert not {"\x1b", "\x07", "\u202e"} & set(text)
    assert "evil\\x1b]0;owned\\x07" in text
    assert "\\u202ens" in text


def test_the_table_notes_when_row_order_decides() -> None:
    text = explain.render_table(explain.reach(model.parse(BASE)))
    assert "Several groups reach replica: an identity in more than one" in text
    alone = explain.render_table(explain.reach(model.parse(BASE), group="platform"))
    assert "Several" not in alone


def test_an_empty_table() -> None:
    assert explain.render_table([]) == "no group reaches any connection\n"


@pytest.mark.parametrize(
    ("old", "new", "kind"),
    [
        ({"max_ttl": 300}, {"max_ttl": 600}, "widened"),
        ({"max_ttl": 600}, {"max_ttl": 300}, "narrowed"),
        ({"require_reason": True}, {"require_reason": False}, "widened"),
        ({"require_reason": False}, {"require_reason": True}, "narrowed"),
        ({"max_concurrent": 1}, {"max_concurrent": 2}, "widened"),
        ({"max_concurrent": 1}, {"max_concurrent": None}, "widened"),
        ({"max_concurrent": None}, {"max_concurrent": 5}, "narrowed"),
        ({"read_only": True}, {"read_only": False}, "widened"),
        ({"read_only": False}, {"read_only": True}, "narrowed"),
        ({"namespace": "a"}, {"namespace": "b"}, "widened"),
        ({"kind": "postgres"}, {"kind": "ssh"}, "widened"),
        ({"environment": "staging"}, {"environment": "production"}, "changed"),
    ],
)
def test_each_aspect_moves_one_way(
    old: dict[str, object], new: dict[str, object], kind: str
) -> None:
    wider, narrower, other = explain._compare(row(**old), row(**new))
    (field,) = old
    found = {"widened": wider, "narrowed": narrower, "changed": other}
    assert found.pop(kind) == (Aspect(field, old[field], new[field]),)  # type: ignore[arg-type]
    assert all(not aspects for aspects in found.values())


def test_a_change_can_widen_and_narrow_at_once() -> None:
    old = model.parse(BASE)
    new = model.parse(BASE.replace('max_ttl = "10m"\nrequire_reason = true', 'max_ttl = "1m"'))
    found = explain.diff(old, new)
    assert found.widened == (
        Change(group="sre", connection="replica", aspects=(Aspect("require_reason", True, False),)),
    )
    assert found.narrowed == (
        Change(group="sre", connection="replica", aspects=(Aspect("max_ttl", 600, 60),)),
    )
    assert found.widens


def test_added_and_removed() -> None:
    old = model.parse(BASE)
    new = model.parse(BASE.replace('group = "sre"', 'group = "dba"'))
    found = explain.diff(old, new)
    assert [(r.group, r.connection) for r in found.added] == [("dba", "replica")]
    assert [(r.group, r.connection) for r in found.removed] == [("sre", "replica")]
    assert found.widens
    assert not explain.diff(new, new).widens


def test_removing_alone_does_not_widen() -> None:
    old = model.parse(BASE)
    new = model.parse(BASE.split('[[bindings]]\ngroup = "sre"')[0])
    found = explain.diff(old, new)
    assert len(found.removed) == 2
    assert not found.widens


def test_reordering_groups_on_a_connection_is_reported() -> None:
    # Each group keeps its terms; only which binding comes first moves.
    swapped = model.parse(BASE)
    bindings = (swapped.bindings[1], swapped.bindings[0], swapped.bindings[2])
    moved = replace(swapped, bindings=bindings)
    found = explain.diff(swapped, moved)
    assert (found.added, found.removed) == ((), ())
    assert (found.widened, found.narrowed) == ((), ())
    assert found.changed == (
        Change(
            group="",
            connection="replica",
            aspects=(Aspect("order", ("platform", "sre"), ("sre", "platform")),),
        ),
    )
    assert "replica: order platform, sre -> sre, platform" in explain.render_diff(found)
    assert explain.diff(swapped, moved, group="nobody").changed == ()
    assert explain.diff(swapped, moved, connection="pods").changed == ()


def test_no_change() -> None:
    policy = model.parse(BASE)
    assert explain.diff(policy, policy) == explain.ReachDiff()
    assert explain.render_diff(explain.ReachDiff()) == "no change in reach\n"


def test_json_parses_with_sorted_keys() -> None:
    policy = example()
    table = json.loads(explain.table_json(policy, explain.reach(policy)))
    assert list(table) == ["policy", "reach"]
    assert list(table["reach"][0]) == sorted(table["reach"][0])
    assert table["policy"]["version"] == policy.version
    found = json.loads(explain.diff_json(explain.diff(policy, example(golden.WIDENED))))
    assert list(found) == sorted(found)
    assert found["widens"] is True


def test_golden_table() -> None:
    policy = example()
    golden.check("explain-example.txt", explain.render_table(explain.reach(policy)))
    golden.check("explain-example.json", explain.table_json(policy, explain.reach(policy)))
    widened = explain.reach(example(golden.WIDENED))
    golden.check("explain-widened.txt", explain.render_table(widened))  # with the order note


def test_golden_diff() -> None:
    found = explain.diff(example(), example(golden.WIDENED))
    golden.check("diff-widened.txt", explain.render_diff(found))
    golden.check("diff-widened.json", explain.diff_json(found))

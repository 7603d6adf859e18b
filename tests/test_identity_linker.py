"""The cross-camera linker: links need several agreeing windows, contradicted links are
undone, and two tracks seen in one frame of one camera are never one identity."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamvg.identity import Linker

A0, B0, B1, C0 = ("cam0", 0), ("cam1", 0), ("cam1", 1), ("cam2", 0)


def test_one_window_never_links_however_often_it_votes() -> None:
    lk = Linker(min_agree=3)
    for _ in range(10):
        lk.vote(A0, B0, agree=True, window="w0")
    assert lk.global_id(A0) != lk.global_id(B0)
    lk.vote(A0, B0, agree=True, window="w1")
    assert lk.global_id(A0) != lk.global_id(B0)
    lk.vote(A0, B0, agree=True, window="w2")
    assert lk.global_id(A0) == lk.global_id(B0)


def test_repeated_contradictions_undo_a_link_and_the_split_returns_to_its_own_id() -> None:
    lk = Linker(min_agree=2, max_contradiction=0.5)
    lk.see("cam0", 0.0, [0])
    lk.see("cam1", 0.0, [0])
    own = lk.global_id(B0)
    for w in range(3):
        lk.vote(A0, B0, agree=True, window=f"a{w}")
    assert lk.global_id(B0) == lk.global_id(A0) == 0  # the older id wins
    lk.vote(A0, B0, agree=False, window="c0")  # one contradiction: 1 <= 0.5 * 3, still linked
    assert lk.linked(A0, B0)
    lk.vote(A0, B0, agree=False, window="c1")
    assert not lk.linked(A0, B0)
    assert lk.global_id(B0) == own and lk.global_id(A0) == 0
    assert lk.links_made == 1 and lk.links_undone == 1


def test_same_frame_tracks_are_never_joined_even_through_a_third_camera() -> None:
    lk = Linker(min_agree=1)
    lk.see("cam1", 1.0, [0, 1])  # B0 and B1 are two objects
    lk.vote(A0, B0, agree=True, window="w0")
    lk.vote(A0, B0, agree=True, window="w1")  # the stronger link goes first
    lk.vote(A0, B1, agree=True, window="w2")
    assert lk.global_id(A0) == lk.global_id(B0)
    assert lk.global_id(B1) != lk.global_id(B0)


def test_a_conflict_learnt_later_splits_an_identity() -> None:
    lk = Linker(min_agree=1)
    lk.vote(A0, B0, agree=True, window="w0")
    lk.vote(A0, B1, agree=True, window="w1")
    lk.vote(A0, B0, agree=True, window="w2")
    assert len({lk.global_id(k) for k in (A0, B0, B1)}) == 1  # B0, B1 never seen together yet
    lk.see("cam1", 5.0, [0, 1])
    assert lk.global_id(B0) != lk.global_id(B1)
    assert lk.global_id(A0) == lk.global_id(B0)  # the stronger link is kept


def test_votes_within_one_camera_are_ignored() -> None:
    lk = Linker(min_agree=1)
    lk.vote(B0, B1, agree=True, window="w0")
    assert lk.global_id(B0) != lk.global_id(B1)
    assert not lk.evidence


@pytest.mark.parametrize("bad", [{"min_agree": 0}, {"max_contradiction": 1.5}])
def test_bad_settings_say_which(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        Linker(**bad)  # type: ignore[arg-type]


_cams = st.sampled_from(["cam0", "cam1", "cam2"])
_keys = st.tuples(_cams, st.integers(0, 3))
_ops = st.lists(
    st.one_of(
        st.tuples(st.just("see"), _cams, st.lists(st.integers(0, 3), min_size=2, max_size=4, unique=True)),
        st.tuples(st.just("vote"), _keys, _keys, st.booleans(), st.integers(0, 20)),
    ),
    max_size=80,
)


@settings(max_examples=100, deadline=None)
@given(ops=_ops, min_agree=st.integers(1, 3))
def test_no_sequence_of_votes_puts_two_objects_of_one_frame_in_one_identity(
    ops: list[tuple], min_agree: int
) -> None:
    lk = Linker(min_agree=min_agree)
    together: list[tuple[tuple[str, int], tuple[str, int]]] = []
    for op in ops:
        if op[0] == "see":
            _, cam, ids = op
            lk.see(cam, 0.0, ids)
            together += [((cam, a), (cam, b)) for a in ids for b in ids if a < b]
        else:
            _, a, b, agree, w = op
            lk.vote(a, b, agree=agree, window=f"w{w}")
        for a, b in together:
            assert lk.global_id(a) != lk.global_id(b)
    # Every known track is in exactly one identity, whose id is one of its members' home ids.
    groups = lk.identities()
    members = [k for ks in groups.values() for k in ks]
    assert sorted(members) == sorted(lk.tracks)
    for gid, ks in groups.items():
        assert gid == min(lk.tracks[k].home_id for k in ks)
    # The state survives a JSON round trip with the same identities.
    again = Linker.from_state(json.loads(json.dumps(lk.state())))
    assert again.identities() == groups


def test_hand_over_state_is_refused_when_it_is_not_a_linker_state() -> None:
    with pytest.raises(ValueError, match="not a linker state"):
        Linker.from_state({"format": "something/v9"})

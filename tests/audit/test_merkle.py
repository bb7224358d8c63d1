"""The Merkle tree: published CT vectors, the RFC's own recursion, and proofs that must fail."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jitgate.audit import merkle
from jitgate.audit.merkle import (
    EMPTY_ROOT,
    CompactRange,
    ProofError,
    Tree,
    check_consistency,
    check_inclusion,
    leaf_hash,
    node_hash,
    root_from_leaves,
    verify_consistency,
    verify_inclusion,
)

from . import merkle_vectors as kat

ENTRIES = [bytes.fromhex(x) for x in kat.LEAVES_HEX]
ROOTS = [bytes.fromhex(x) for x in kat.ROOTS_HEX]
SOME_HASH = hashlib.sha256(b"not a node of any tree here").digest()
MAX_UINT64 = (1 << 64) - 1


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


class Rfc6962:
    """MTH, PATH and PROOF as RFC 6962 section 2.1 writes them, D[lo:hi] as (lo, hi).

    Written from the RFC text with hashlib alone; subtree hashes are memoised so
    that checking every proof of a few-hundred-leaf tree stays quick.
    """

    def __init__(self, entries: Sequence[bytes]) -> None:
        self.d = list(entries)
        self._memo: dict[tuple[int, int], bytes] = {}

    @staticmethod
    def split(n: int) -> int:
        """k, the largest power of two smaller than n (n > 1)."""
        k = 1
        while k * 2 < n:
            k *= 2
        return k

    def mth(self, lo: int, hi: int) -> bytes:
        """MTH(D[lo:hi])."""
        if (lo, hi) not in self._memo:
            n = hi - lo
            if n == 0:
                value = _sha256(b"")  # MTH({}) = SHA-256()
            elif n == 1:
                value = _sha256(b"\x00" + self.d[lo])  # MTH({d(0)}) = SHA-256(0x00 || d(0))
            else:
                k = self.split(n)
                value = _sha256(b"\x01" + self.mth(lo, lo + k) + self.mth(lo + k, hi))
            self._memo[lo, hi] = value
        return self._memo[lo, hi]

    def path(self, m: int, lo: int, hi: int) -> list[bytes]:
        """PATH(m, D[lo:hi]) (RFC 6962 section 2.1.1)."""
        n = hi - lo
        if n == 1:
            return []
        k = self.split(n)
        if m < k:
            return [*self.path(m, lo, lo + k), self.mth(lo + k, hi)]
        return [*self.path(m - k, lo + k, hi), self.mth(lo, lo + k)]

    def proof(self, m: int, n: int) -> list[bytes]:
        """PROOF(m, D[n]) = SUBPROOF(m, D[n], true) (RFC 6962 section 2.1.2)."""
        return self.subproof(m, 0, n, True)

    def subproof(self, m: int, lo: int, hi: int, b: bool) -> list[bytes]:
        """SUBPROOF(m, D[lo:hi], b), m counted from lo."""
        n = hi - lo
        if m == n:
            return [] if b else [self.mth(lo, hi)]
        k = self.split(n)
        if m <= k:
            return [*self.subproof(m, lo, lo + k, b), self.mth(lo + k, hi)]
        return [*self.subproof(m - k, lo + k, hi, False), self.mth(lo, lo + k)]


def entries_for(size: int, salt: bytes = b"") -> list[bytes]:
    return [salt + i.to_bytes(4, "big") for i in range(size)]


def built(entries: Sequence[bytes]) -> Tree:
    return Tree(leaf_hash(e) for e in entries)


def flip(value: bytes, byte: int, bit: int) -> bytes:
    changed = bytearray(value)
    changed[byte] ^= 1 << bit
    return bytes(changed)


def flipped(proof: Sequence[bytes]) -> list[tuple[str, list[bytes]]]:
    """One bit flipped in each element, near each end of it."""
    out = []
    for i in range(len(proof)):
        for byte, bit in ((0, 3), (31, 0)):
            wrong = list(proof)
            wrong[i] = flip(wrong[i], byte, bit)
            out.append((f"proof[{i}] byte {byte} bit {bit} flipped", wrong))
    return out


def inclusion_probes(
    leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> list[tuple[str, tuple[Any, ...]]]:
    """Each way of breaking one valid inclusion proof, as verify_inclusion arguments."""
    p = list(proof)
    probes: list[tuple[str, tuple[Any, ...]]] = [
        ("index - 1", (leaf, index - 1, size, p, root)),
        ("index + 1", (leaf, index + 1, size, p, root)),
        ("index ^ 2", (leaf, index ^ 2, size, p, root)),
        ("size * 2", (leaf, index, size * 2, p, root)),
        ("size // 2", (leaf, index, size // 2, p, root)),
        ("short wrong leaf", (b"WrongLeaf", index, size, p, root)),
        ("wrong leaf", (flip(leaf, 0, 0), index, size, p, root)),
        ("empty root", (leaf, index, size, p, EMPTY_ROOT)),
        ("random root", (leaf, index, size, p, SOME_HASH)),
        ("trailing garbage", (leaf, index, size, [*p, b""], root)),
        ("trailing hash", (leaf, index, size, [*p, SOME_HASH], root)),
        ("trailing root", (leaf, index, size, [*p, root], root)),
        ("preceding garbage", (leaf, index, size, [b"", *p], root)),
        ("preceding hash", (leaf, index, size, [SOME_HASH, *p], root)),
        ("preceding root", (leaf, index, size, [root, *p], root)),
    ]
    if p:
        # With a path, the root is not the leaf, so swapping them changes something.
        probes += [
            ("leaf and root swapped", (root, index, size, p, leaf)),
            ("empty proof", (leaf, index, size, [], root)),
            ("last element removed", (leaf, index, size, p[:-1], root)),
            ("first element removed", (leaf, index, size, p[1:], root)),
            ("element inserted", (leaf, index, size, [p[0], SOME_HASH, *p[1:]], root)),
            ("element doubled", (leaf, index, size, [p[0], *p], root)),
        ]
    if len(p) > 1:
        probes.append(("first two swapped", (leaf, index, size, [p[1], p[0], *p[2:]], root)))
    probes += [(desc, (leaf, index, size, wrong, root)) for desc, wrong in flipped(p)]
    return probes


def consistency_probes(
    old: int, new: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> list[tuple[str, tuple[Any, ...]]]:
    """Each way of breaking one valid, non-empty consistency proof.

    Not new + 1, nor size + 1 for inclusion: RFC 9162's checks bind a size only as
    far as the path's shape, and sizes with the same shape verify alike. A signed
    tree head binds the size to its root.
    """
    p = list(proof)
    probes: list[tuple[str, tuple[Any, ...]]] = [
        ("old - 1", (old - 1, new, old_root, new_root, p)),
        ("old + 1", (old + 1, new, old_root, new_root, p)),
        ("old ^ 2", (old ^ 2, new, old_root, new_root, p)),
        ("new * 2", (old, new * 2, old_root, new_root, p)),
        ("new // 2", (old, new // 2, old_root, new_root, p)),
        ("sizes swapped", (new, old, old_root, new_root, p)),
        ("short wrong old root", (old, new, b"WrongRoot", new_root, p)),
        ("short wrong new root", (old, new, old_root, b"WrongRoot", p)),
        ("wrong old root", (old, new, flip(old_root, 5, 5), new_root, p)),
        ("wrong new root", (old, new, old_root, flip(new_root, 5, 5), p)),
        ("roots swapped", (old, new, new_root, old_root, p)),
        ("random old root", (old, new, SOME_HASH, new_root, p)),
        ("random new root", (old, new, old_root, SOME_HASH, p)),
        ("empty roots", (old, new, EMPTY_ROOT, EMPTY_ROOT, p)),
        ("empty proof", (old, new, old_root, new_root, [])),
        ("last element removed", (old, new, old_root, new_root, p[:-1])),
        ("first element removed", (old, new, old_root, new_root, p[1:])),
        ("trailing garbage", (old, new, old_root, new_root, [*p, b""])),
        ("trailing old root", (old, new, old_root, new_root, [*p, old_root])),
        ("trailing new root", (old, new, old_root, new_root, [*p, new_root])),
        ("trailing hash", (old, new, old_root, new_root, [*p, SOME_HASH])),
        ("preceding garbage", (old, new, old_root, new_root, [b"", *p])),
        ("preceding old root", (old, new, old_root, new_root, [old_root, *p])),
        ("preceding new root", (old, new, old_root, new_root, [new_root, *p])),
        ("preceding proof[0]", (old, new, old_root, new_root, [p[0], *p])),
        ("element inserted", (old, new, old_root, new_root, [p[0], SOME_HASH, *p[1:]])),
    ]
    if len(p) > 1:
        probes.append(("first two swapped", (old, new, old_root, new_root, [p[1], p[0], *p[2:]])))
    probes += [(desc, (old, new, old_root, new_root, wrong)) for desc, wrong in flipped(p)]
    return probes


def accepted(
    probes: list[tuple[str, tuple[Any, ...]]],
    verify: Callable[..., bool],
    check: Callable[..., None],
) -> list[str]:
    """The probes verify accepts, or check fails to reject with ProofError."""
    wrong = []
    for desc, args in probes:
        if verify(*args):
            wrong.append(desc)
        else:
            with pytest.raises(ProofError):
                check(*args)
    return wrong


def assert_inclusion_holds(tree: Tree, ref: Rfc6962, index: int, size: int) -> None:
    proof = tree.inclusion_proof(index, size)
    assert proof == ref.path(index, 0, size)
    root = tree.root(size)
    leaf = tree.leaf(index)
    assert verify_inclusion(leaf, index, size, proof, root)
    check_inclusion(leaf, index, size, proof, root)


def assert_consistency_holds(tree: Tree, ref: Rfc6962, old: int, new: int) -> None:
    proof = tree.consistency_proof(old, new)
    assert proof == ref.proof(old, new)
    assert verify_consistency(old, new, tree.root(old), tree.root(new), proof)
    check_consistency(old, new, tree.root(old), tree.root(new), proof)


# --- Known answers --------------------------------------------------------------------


def test_hashes_match_the_published_vectors() -> None:
    assert EMPTY_ROOT.hex() == kat.EMPTY_ROOT_HEX
    for data, want in kat.LEAF_HASHES_HEX:
        assert leaf_hash(data).hex() == want
    for left, right, want in kat.NODE_HASHES_HEX:
        assert node_hash(left, right).hex() == want


def test_roots_match_the_published_vectors_at_every_size() -> None:
    tree = Tree()
    stream = CompactRange()
    assert tree.root() == stream.root() == root_from_leaves([]) == EMPTY_ROOT
    for n, entry in enumerate(ENTRIES, start=1):
        tree.append(leaf_hash(entry))
        stream.append(leaf_hash(entry))
        assert tree.size == stream.size == n
        assert tree.root() == stream.root() == ROOTS[n - 1]
        assert tree.root(0) == EMPTY_ROOT
        # Earlier sizes stay answerable from the grown tree.
        assert [tree.root(m) for m in range(1, n + 1)] == ROOTS[:n]
    assert root_from_leaves(leaf_hash(e) for e in ENTRIES) == ROOTS[-1]
    assert Rfc6962(ENTRIES).mth(0, 8) == ROOTS[-1]


@pytest.mark.parametrize(("index", "size", "path"), kat.INCLUSION)
def test_inclusion_proofs_match_the_published_vectors(
    index: int, size: int, path: tuple[str, ...]
) -> None:
    tree = built(ENTRIES)
    proof = [bytes.fromhex(x) for x in path]
    assert tree.inclusion_proof(index, size) == proof
    assert Rfc6962(ENTRIES).path(index, 0, size) == proof
    leaf = leaf_hash(ENTRIES[index])
    assert verify_inclusion(leaf, index, size, proof, ROOTS[size - 1])
    probes = inclusion_probes(leaf, index, size, proof, ROOTS[size - 1])
    assert accepted(probes, verify_inclusion, check_inclusion) == []


@pytest.mark.parametrize(("old", "new", "path"), kat.CONSISTENCY)
def test_consistency_proofs_match_the_published_vectors(
    old: int, new: int, path: tuple[str, ...]
) -> None:
    tree = built(ENTRIES)
    proof = [bytes.fromhex(x) for x in path]
    assert tree.consistency_proof(old, new) == proof
    assert Rfc6962(ENTRIES).proof(old, new) == proof
    old_root, new_root = ROOTS[old - 1], ROOTS[new - 1]
    assert verify_consistency(old, new, old_root, new_root, proof)
    if proof:
        probes = consistency_probes(old, new, old_root, new_root, proof)
        assert accepted(probes, verify_consistency, check_consistency) == []


def shape_hashes(ref: Rfc6962, shape: kat.Shape) -> list[bytes]:
    """The proof a published node-id shape names, in the tree ref holds."""
    _, _, ids, rehash = shape
    hashes = [ref.mth(i << level, (i + 1) << level) for level, i in ids]
    if rehash is None:
        return hashes
    begin, end = rehash
    folded = hashes[begin]
    for h in hashes[begin + 1 : end]:
        folded = _sha256(b"\x01" + h + folded)
    return [*hashes[:begin], folded, *hashes[end:]]


@pytest.mark.parametrize("shape", kat.INCLUSION_SHAPES, ids=lambda s: f"{s[0]}:{s[1]}")
def test_inclusion_proofs_take_the_published_nodes(shape: kat.Shape) -> None:
    entries = entries_for(128)
    ref = Rfc6962(entries)
    size, index = shape[0], shape[1]
    want = shape_hashes(ref, shape)
    assert ref.path(index, 0, size) == want
    assert built(entries).inclusion_proof(index, size) == want


@pytest.mark.parametrize("shape", kat.CONSISTENCY_SHAPES, ids=lambda s: f"{s[0]}:{s[1]}")
def test_consistency_proofs_take_the_published_nodes(shape: kat.Shape) -> None:
    entries = entries_for(128)
    ref = Rfc6962(entries)
    old, new = shape[0], shape[1]
    want = shape_hashes(ref, shape)
    assert ref.proof(old, new) == want
    assert built(entries).consistency_proof(old, new) == want


# --- Edge cases the CT verifier tests probe, with this module's documented choices ----


@pytest.mark.parametrize(("index", "size"), [(0, 0), (0, 1), (1, 0), (2, 1)])
def test_inclusion_with_no_path_and_a_bad_root_fails(index: int, size: int) -> None:
    for leaf, root in ((SOME_HASH, b""), (b"", EMPTY_ROOT), (SOME_HASH, EMPTY_ROOT)):
        assert not verify_inclusion(leaf, index, size, [], root)


def test_a_one_leaf_tree_proves_its_leaf_with_an_empty_path() -> None:
    leaf = leaf_hash(b"data")
    assert verify_inclusion(leaf, 0, 1, [], leaf)
    assert not verify_inclusion(b"", 0, 1, [], leaf)
    assert not verify_inclusion(leaf, 0, 1, [], b"")
    assert not verify_inclusion(leaf, 1, 1, [], leaf)


def test_equal_sizes_are_consistent_only_with_equal_roots_and_no_proof() -> None:
    a, b = ROOTS[0], ROOTS[1]
    assert verify_consistency(1, 1, a, a, [])
    assert verify_consistency(8, 8, ROOTS[7], ROOTS[7], [])
    assert not verify_consistency(1, 1, a, b, [])
    assert not verify_consistency(1, 1, a, a, [a])
    assert not verify_consistency(1, 1, EMPTY_ROOT, EMPTY_ROOT, [EMPTY_ROOT])


def test_consistency_from_the_empty_tree_is_refused() -> None:
    # RFC 9162 section 2.1.4 defines consistency for 0 < first only; the CT test
    # suites accept (0, 0) and (0, n) with an empty proof, this module does not.
    for new, new_root in ((0, EMPTY_ROOT), (1, ROOTS[0]), (8, ROOTS[7])):
        assert not verify_consistency(0, new, EMPTY_ROOT, new_root, [])
        with pytest.raises(ProofError, match="empty tree"):
            check_consistency(0, new, EMPTY_ROOT, new_root, [])
    assert not verify_consistency(0, 0, EMPTY_ROOT, EMPTY_ROOT, [EMPTY_ROOT])
    with pytest.raises(ValueError, match=r"RFC 9162 section 2\.1\.4\.1"):
        built(ENTRIES).consistency_proof(0, 8)


def test_time_travel_and_an_empty_proof_are_refused() -> None:
    with pytest.raises(ProofError, match="larger than new_size"):
        check_consistency(2, 1, ROOTS[1], ROOTS[0], [])
    assert not verify_consistency(1, 0, ROOTS[0], EMPTY_ROOT, [])
    with pytest.raises(ProofError, match="the proof is empty"):
        check_consistency(1, 2, ROOTS[0], ROOTS[1], [])


_NOT_COUNTS: list[Any] = [-1, MAX_UINT64 + 1, True, 1.0, "1", None]


@pytest.mark.parametrize("bad", _NOT_COUNTS)
def test_verifiers_reject_numbers_that_are_not_uint64(bad: Any) -> None:
    tree = built(ENTRIES)
    leaf, proof, root = tree.leaf(1), tree.inclusion_proof(1, 8), tree.root()
    with pytest.raises(ProofError, match="integer from 0 to 2"):
        check_inclusion(leaf, bad, 8, proof, root)
    with pytest.raises(ProofError, match="integer from 0 to 2"):
        check_inclusion(leaf, 1, bad, proof, root)
    cproof = tree.consistency_proof(2, 8)
    with pytest.raises(ProofError, match="integer from 0 to 2"):
        check_consistency(bad, 8, tree.root(2), root, cproof)
    with pytest.raises(ProofError, match="integer from 0 to 2"):
        check_consistency(2, bad, tree.root(2), root, cproof)


def test_verifiers_reject_values_that_are_not_hashes() -> None:
    tree = built(ENTRIES)
    leaf, proof, root = tree.leaf(1), tree.inclusion_proof(1, 8), tree.root()
    not_hashes: list[Any] = [None, "", root.hex(), bytearray(root), root + b"\x00", root[:-1]]
    for bad in not_hashes:
        with pytest.raises(ProofError, match="32-byte hash"):
            check_inclusion(bad, 1, 8, proof, root)
        with pytest.raises(ProofError, match="32-byte hash"):
            check_inclusion(leaf, 1, 8, proof, bad)
        with pytest.raises(ProofError, match=r"proof element 1 is not"):
            check_inclusion(leaf, 1, 8, [proof[0], bad, proof[2]], root)
        assert not verify_consistency(2, 8, bad, root, tree.consistency_proof(2, 8))
    # A huge index or size fails by the proof's length, without a long loop.
    assert not verify_inclusion(leaf, 1, MAX_UINT64, proof, root)
    assert not verify_inclusion(leaf, MAX_UINT64 - 1, MAX_UINT64, [SOME_HASH] * 200, root)
    assert not verify_consistency(1, MAX_UINT64, ROOTS[0], root, [SOME_HASH] * 200)


def test_check_says_why_a_proof_fails() -> None:
    tree = built(entries_for(13))
    leaf, proof, root = tree.leaf(5), tree.inclusion_proof(5, 13), tree.root()
    with pytest.raises(ProofError, match="index 13 is not below the tree size 13"):
        check_inclusion(leaf, 13, 13, proof, root)
    with pytest.raises(ProofError, match="proof is longer than the path"):
        check_inclusion(leaf, 5, 13, [*proof, root], root)
    with pytest.raises(ProofError, match="proof is shorter than the path"):
        check_inclusion(leaf, 5, 13, proof[:-1], root)
    with pytest.raises(ProofError, match="does not lead to the root"):
        check_inclusion(leaf, 5, 13, [proof[0], SOME_HASH, *proof[2:]], root)
    old_root, cproof = tree.root(6), tree.consistency_proof(6, 13)
    with pytest.raises(ProofError, match="proof is longer than the path between"):
        check_consistency(6, 13, old_root, root, [*cproof, root])
    with pytest.raises(ProofError, match="proof is shorter than the path between"):
        check_consistency(6, 13, old_root, root, cproof[:-1])
    with pytest.raises(ProofError, match="does not lead to the old root"):
        check_consistency(6, 13, SOME_HASH, root, cproof)
    with pytest.raises(ProofError, match="does not lead to the new root"):
        check_consistency(6, 13, old_root, SOME_HASH, cproof)
    with pytest.raises(ProofError, match="same size take an empty proof"):
        check_consistency(6, 6, old_root, old_root, cproof)
    with pytest.raises(ProofError, match="same size have different roots"):
        check_consistency(6, 6, old_root, root, [])


# --- The tree's own argument checks ---------------------------------------------------


def test_the_tree_refuses_out_of_range_arguments() -> None:
    tree = built(ENTRIES)
    with pytest.raises(ValueError, match="size 9 is out of range: the tree has 8 leaves"):
        tree.root(9)
    with pytest.raises(ValueError, match="size -1 is out of range"):
        tree.root(-1)
    with pytest.raises(ValueError, match="leaf index 8 is out of range for a tree of size 8"):
        tree.inclusion_proof(8, 8)
    with pytest.raises(ValueError, match="leaf index 3 is out of range for a tree of size 3"):
        tree.inclusion_proof(3, 3)
    with pytest.raises(ValueError, match="leaf index -1 is out of range"):
        tree.inclusion_proof(-1, 8)
    with pytest.raises(ValueError, match="leaf index 0 is out of range for a tree of size 0"):
        tree.inclusion_proof(0, 0)
    with pytest.raises(ValueError, match="size 9 is out of range"):
        tree.inclusion_proof(0, 9)
    with pytest.raises(ValueError, match="old_size 5 is larger than new_size 4"):
        tree.consistency_proof(5, 4)
    with pytest.raises(ValueError, match="new_size 9 is out of range"):
        tree.consistency_proof(1, 9)
    with pytest.raises(ValueError, match="old_size -1 is out of range"):
        tree.consistency_proof(-1, 3)
    with pytest.raises(ValueError, match="leaf index 8 is out of range"):
        tree.leaf(8)
    assert tree.consistency_proof(8, 8) == []


def test_the_tree_takes_only_32_byte_leaf_hashes() -> None:
    not_hashes: list[Any] = [b"", b"x" * 31, b"x" * 33, "x" * 32, bytearray(32), None]
    for bad in not_hashes:
        for sink in (Tree(), CompactRange()):
            with pytest.raises(ValueError, match="a leaf hash must be 32 bytes"):
                sink.append(bad)
            assert sink.size == 0


def test_proofs_and_roots_look_up_stored_subtrees(monkeypatch: pytest.MonkeyPatch) -> None:
    size = 5000  # 0b1001110001000: a ragged right edge
    tree = built(entries_for(size))
    calls = 0
    real = merkle.node_hash

    def counting(left: bytes, right: bytes) -> bytes:
        nonlocal calls
        calls += 1
        return real(left, right)

    monkeypatch.setattr(merkle, "node_hash", counting)
    budget = size.bit_length()
    for index in (0, 1, 2047, 4095, 4096, 4999):
        calls = 0
        tree.inclusion_proof(index, size)
        assert calls <= budget, index
    for old in (1, 7, 1000, 4096, 4999):
        calls = 0
        tree.consistency_proof(old, size)
        assert calls <= budget, old
    calls = 0
    tree.root(4999)
    assert calls <= budget


# --- Against the RFC recursion, and every corruption, for many sizes ------------------


@pytest.mark.parametrize("size", range(1, 41))
def test_every_proof_at_small_sizes_verifies_and_every_corruption_fails(size: int) -> None:
    entries = entries_for(size, b"small")
    ref = Rfc6962(entries)
    tree = built(entries)
    root = tree.root()
    assert root == ref.mth(0, size)
    wrong: list[tuple[int, str]] = []
    for index in range(size):
        assert_inclusion_holds(tree, ref, index, size)
        probes = inclusion_probes(
            tree.leaf(index), index, size, tree.inclusion_proof(index, size), root
        )
        wrong += [(index, d) for d in accepted(probes, verify_inclusion, check_inclusion)]
    for old in range(1, size):
        assert_consistency_holds(tree, ref, old, size)
        proof = tree.consistency_proof(old, size)
        probes = consistency_probes(old, size, tree.root(old), root, proof)
        wrong += [(old, d) for d in accepted(probes, verify_consistency, check_consistency)]
    assert wrong == []


@settings(max_examples=100, deadline=None)
@given(size=st.integers(1, 300), salt=st.binary(max_size=8), data=st.data())
def test_every_proof_the_tree_gives_verifies_and_matches_the_rfc(
    size: int, salt: bytes, data: st.DataObject
) -> None:
    entries = entries_for(size, salt)
    ref = Rfc6962(entries)
    tree = built(entries)
    assert [tree.root(n) for n in range(size + 1)] == [ref.mth(0, n) for n in range(size + 1)]
    smaller = data.draw(st.integers(1, size), label="smaller")
    for n in {size, smaller}:
        for index in range(n):
            assert_inclusion_holds(tree, ref, index, n)
        for old in range(1, n + 1):
            assert_consistency_holds(tree, ref, old, n)


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_corrupted_proofs_fail_at_random_sizes(data: st.DataObject) -> None:
    size = data.draw(st.integers(2, 300), label="size")
    tree = built(entries_for(size, b"probe"))
    index = data.draw(st.integers(0, size - 1), label="index")
    probes = inclusion_probes(
        tree.leaf(index), index, size, tree.inclusion_proof(index, size), tree.root()
    )
    assert accepted(probes, verify_inclusion, check_inclusion) == []
    old = data.draw(st.integers(1, size - 1), label="old")
    proof = tree.consistency_proof(old, size)
    probes = consistency_probes(old, size, tree.root(old), tree.root(), proof)
    assert accepted(probes, verify_consistency, check_consistency) == []


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 40), max_size=8), salt=st.binary(max_size=4))
def test_growing_in_steps_gives_the_same_tree(sizes: list[int], salt: bytes) -> None:
    hashes = [leaf_hash(e) for e in entries_for(sum(sizes), salt)]
    whole = Tree(hashes)
    stepwise = Tree()
    stream = CompactRange()
    start = 0
    for step in sizes:
        stepwise.extend(hashes[start : start + step])
        for h in hashes[start : start + step]:
            stream.append(h)
            assert stream.root() == whole.root(stream.size)
        start += step
        assert stepwise.size == stream.size == start
        assert stepwise.root() == stream.root() == whole.root(start)
    assert [stepwise.leaf(i) for i in range(start)] == hashes
    assert root_from_leaves(hashes) == whole.root()


@settings(max_examples=60, deadline=None)
@given(total=st.integers(0, 200), data=st.data())
def test_truncate_undoes_appends_exactly(total: int, data: st.DataObject) -> None:
    leaves = [leaf_hash(i.to_bytes(4, "big")) for i in range(total)]
    cut = data.draw(st.integers(0, total))
    tree = Tree(leaves)
    tree.truncate(cut)
    assert tree.size == cut
    assert tree.root() == root_from_leaves(leaves[:cut])
    # Growing again gives the tree that was never cut.
    tree.extend(leaves[cut:])
    assert tree.root() == root_from_leaves(leaves)
    if total > 1:
        assert tree.inclusion_proof(total - 1, total) == Tree(leaves).inclusion_proof(
            total - 1, total
        )

"""The audit log's RFC 6962 / RFC 9162 Merkle tree: roots, inclusion and consistency proofs."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Sequence

HASH_SIZE = 32
"""Bytes in every hash here: SHA-256, the hash RFC 6962 section 2.1 uses."""

EMPTY_ROOT = hashlib.sha256(b"").digest()
"""The root of the empty tree: MTH({}) = SHA-256() (RFC 6962 section 2.1)."""

# RFC 9162 carries tree_size and leaf_index as uint64; proof arguments are held to
# that range, so no untrusted number makes a verifier loop for long.
_MAX_SIZE = (1 << 64) - 1

_sha256 = hashlib.sha256


def leaf_hash(data: bytes) -> bytes:
    """Return the hash of one record as a leaf: SHA-256(0x00 || data)."""
    # RFC 6962 section 2.1 (RFC 9162 section 2.1.1): MTH({d(0)}) = SHA-256(0x00 || d(0)).
    return _sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """Return the hash of an interior node: SHA-256(0x01 || left || right)."""
    # RFC 6962 section 2.1 (RFC 9162 section 2.1.1): MTH(D[n]) = SHA-256(0x01 || MTH(D[0:k]) ||
    # MTH(D[k:n])). The 0x00 / 0x01 prefixes keep a leaf from posing as a node.
    return _sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """Return k, the largest power of two smaller than n (n > 1), where MTH splits D[n]."""
    return 1 << ((n - 1).bit_length() - 1)


def _require_hash(value: object, what: str) -> bytes:
    """Return value if it is a 32-byte hash, else raise ValueError naming what it is."""
    if not isinstance(value, bytes) or len(value) != HASH_SIZE:
        raise ValueError(f"{what} must be {HASH_SIZE} bytes")
    return value


class Tree:
    """An append-only Merkle tree of leaf hashes keeping every complete subtree's hash."""

    __slots__ = ("_levels", "_size")

    def __init__(self, leaf_hashes: Iterable[bytes] = ()) -> None:
        """Start a tree holding leaf_hashes, in order."""
        # _levels[k] packs 32-byte hashes back to back: entry i is the hash of the
        # complete subtree over leaves [i * 2**k, (i + 1) * 2**k). Level 0 holds the
        # leaf hashes, level 1 half as many nodes, and so on: 2 x 32 bytes a leaf.
        # Not safe for concurrent use: serialise appends with reads.
        self._levels: list[bytearray] = [bytearray()]
        self._size = 0
        self.extend(leaf_hashes)

    @property
    def size(self) -> int:
        """The number of leaves appended so far."""
        return self._size

    def append(self, leaf_hash: bytes) -> None:
        """Add one leaf hash (see leaf_hash) at index size."""
        # The check is written out, not a call: this runs once a record.
        if not isinstance(leaf_hash, bytes) or len(leaf_hash) != HASH_SIZE:
            raise ValueError(f"a leaf hash must be {HASH_SIZE} bytes")
        n = self._size
        self._size = n + 1
        levels = self._levels
        buf = levels[0]
        buf += leaf_hash
        level = 0
        # An odd count of entries before this one means it completed a pair: their
        # parent, one level up, covers an aligned run twice as long (RFC 6962
        # section 2.1). Amortised, that is one node hash a leaf.
        while n & 1:
            h = _sha256(b"\x01" + buf[-2 * HASH_SIZE :]).digest()
            n >>= 1
            level += 1
            if level == len(levels):
                levels.append(bytearray())
            buf = levels[level]
            buf += h

    def extend(self, leaf_hashes: Iterable[bytes]) -> None:
        """Append each of leaf_hashes in order."""
        append = self.append
        for h in leaf_hashes:
            append(h)

    def truncate(self, size: int) -> None:
        """Drop every leaf from index size on: undo appends a failed commit did not store."""
        self._check_size(size, "size")
        # Level k holds the complete subtrees of 2**k leaves: size >> k of them
        # remain, and every one of those lies wholly below size.
        for level, buf in enumerate(self._levels):
            del buf[(size >> level) * HASH_SIZE :]
        self._size = size

    def leaf(self, index: int) -> bytes:
        """Return the leaf hash at index."""
        if not 0 <= index < self._size:
            raise ValueError(
                f"leaf index {index} is out of range: the tree has {self._size} leaves"
            )
        return self._node(0, index)

    def root(self, size: int | None = None) -> bytes:
        """Return MTH of the first size leaves (all of them by default)."""
        n = self._size if size is None else self._check_size(size, "size")
        return EMPTY_ROOT if n == 0 else self._mth(0, n)

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        """Return PATH(index, D[0:size]): leaf index is in the tree of the first size leaves."""
        self._check_size(size, "size")
        if not 0 <= index < size:
            raise ValueError(f"leaf index {index} is out of range for a tree of size {size}")
        # RFC 6962 section 2.1.1 (RFC 9162 section 2.1.3.1), unrolled: for m < k,
        # PATH(m, D[n]) = PATH(m, D[0:k]) : MTH(D[k:n]); for m >= k,
        # PATH(m, D[n]) = PATH(m - k, D[k:n]) : MTH(D[0:k]). Collected root first,
        # then reversed to the RFC's leaf-first order.
        path: list[bytes] = []
        lo, hi = 0, size
        while hi - lo > 1:
            k = _split(hi - lo)
            if index < lo + k:
                path.append(self._mth(lo + k, hi))
                hi = lo + k
            else:
                path.append(self._mth(lo, lo + k))
                lo += k
        path.reverse()
        return path

    def consistency_proof(self, old_size: int, new_size: int) -> list[bytes]:
        """Return PROOF(old_size, D[0:new_size]), showing the old tree is a prefix of the new."""
        self._check_size(new_size, "new_size")
        # RFC 9162 section 2.1.4.1 defines the proof for 0 < m < n only: every tree
        # extends the empty one, so there is nothing to prove from size 0 and asking
        # for it is refused. m == n gives RFC 6962's SUBPROOF(m, D[m], true) = {}.
        if old_size < 1:
            raise ValueError(
                f"old_size {old_size} is out of range: consistency is defined from size 1 "
                "(RFC 9162 section 2.1.4.1); every tree extends the empty one"
            )
        if old_size > new_size:
            raise ValueError(f"old_size {old_size} is larger than new_size {new_size}")
        # RFC 6962 section 2.1.2 (RFC 9162 section 2.1.4.1), unrolled:
        #   SUBPROOF(m, D[m], true) = {};  SUBPROOF(m, D[m], false) = {MTH(D[m])};
        #   m <= k: SUBPROOF(m, D[n], b) = SUBPROOF(m, D[0:k], b) : MTH(D[k:n]);
        #   m > k:  SUBPROOF(m, D[n], b) = SUBPROOF(m - k, D[k:n], false) : MTH(D[0:k]).
        proof: list[bytes] = []
        lo, hi, whole = 0, new_size, True
        while old_size != hi:
            k = _split(hi - lo)
            if old_size <= lo + k:
                proof.append(self._mth(lo + k, hi))
                hi = lo + k
            else:
                proof.append(self._mth(lo, lo + k))
                lo += k
                whole = False
        if not whole:
            proof.append(self._mth(lo, hi))
        proof.reverse()
        return proof

    def _check_size(self, size: int, name: str) -> int:
        """Return size if 0 <= size <= the tree's size, else raise ValueError."""
        if not 0 <= size <= self._size:
            raise ValueError(f"{name} {size} is out of range: the tree has {self._size} leaves")
        return size

    def _node(self, level: int, index: int) -> bytes:
        """Return the stored hash of complete subtree index at level."""
        start = index * HASH_SIZE
        return bytes(self._levels[level][start : start + HASH_SIZE])

    def _mth(self, lo: int, hi: int) -> bytes:
        """Return MTH(D[lo:hi]) for lo < hi <= size and lo a multiple of 2**ceil(log2(hi - lo))."""
        # Every range the PATH and PROOF recursions name has that alignment, so
        # D[lo:hi] is a run of stored complete subtrees, one per set bit of
        # hi - lo, largest first. MTH splits off the largest power of two first
        # (RFC 6962 section 2.1), so folding them from the right gives MTH. At
        # most one range in a proof is not a single subtree: O(log n) hashes.
        subtrees: list[bytes] = []
        pos = lo
        n = hi - lo
        for level in range(n.bit_length() - 1, -1, -1):
            if n >> level & 1:
                subtrees.append(self._node(level, pos >> level))
                pos += 1 << level
        result = subtrees.pop()
        while subtrees:
            result = node_hash(subtrees.pop(), result)
        return result


class CompactRange:
    """A running tree root over leaf hashes fed one at a time, in O(log n) memory."""

    __slots__ = ("_size", "_stack")

    def __init__(self, leaf_hashes: Iterable[bytes] = ()) -> None:
        """Start at size 0, then append each of leaf_hashes."""
        # _stack holds the roots of the complete subtrees that tile [0, size),
        # largest (leftmost) first: one per set bit of size.
        self._stack: list[bytes] = []
        self._size = 0
        self.extend(leaf_hashes)

    @property
    def size(self) -> int:
        """The number of leaves appended so far."""
        return self._size

    def append(self, leaf_hash: bytes) -> None:
        """Add one leaf hash at index size."""
        h = _require_hash(leaf_hash, "a leaf hash")
        stack = self._stack
        n = self._size
        # Each trailing set bit of the old size is a subtree the new leaf completes.
        while n & 1:
            h = node_hash(stack.pop(), h)
            n >>= 1
        stack.append(h)
        self._size += 1

    def extend(self, leaf_hashes: Iterable[bytes]) -> None:
        """Append each of leaf_hashes in order."""
        append = self.append
        for h in leaf_hashes:
            append(h)

    def root(self) -> bytes:
        """Return MTH of the leaves appended so far, in O(log n) hashes."""
        stack = self._stack
        if not stack:
            return EMPTY_ROOT
        # RFC 6962 section 2.1: MTH splits off the largest power of two first, so
        # the subtree roots fold from the right.
        result = stack[-1]
        for h in reversed(stack[:-1]):
            result = node_hash(h, result)
        return result


def root_from_leaves(leaf_hashes: Iterable[bytes]) -> bytes:
    """Return MTH of leaf_hashes."""
    return CompactRange(leaf_hashes).root()


class ProofError(ValueError):
    """A proof or its arguments do not verify; the message says why."""


def _proof_count(value: object, name: str) -> int:
    """Return value if it is an int in the uint64 range, else raise ProofError."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _MAX_SIZE:
        raise ProofError(f"{name} must be an integer from 0 to 2**64 - 1")
    return value


def _proof_hash(value: object, what: str) -> bytes:
    """Return value if it is a 32-byte hash, else raise ProofError."""
    if not isinstance(value, bytes) or len(value) != HASH_SIZE:
        raise ProofError(f"{what} is not a {HASH_SIZE}-byte hash")
    return value


def _proof_path(proof: Sequence[bytes]) -> list[bytes]:
    """Return proof as a list of 32-byte hashes, else raise ProofError."""
    return [_proof_hash(p, f"proof element {i}") for i, p in enumerate(proof)]


def check_inclusion(
    leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """Raise ProofError unless proof shows leaf_hash at index in the size-leaf tree with root."""
    h = _proof_hash(leaf_hash, "the leaf hash")
    expected = _proof_hash(root, "the root")
    fn = _proof_count(index, "index")
    sn = _proof_count(size, "size")
    path = _proof_path(proof)
    # RFC 9162 section 2.1.3.2, step by step.
    # 1. leaf_index must be below tree_size.
    if fn >= sn:
        raise ProofError(f"index {index} is not below the tree size {size}")
    # 2.-3. fn = leaf_index, sn = tree_size - 1, r = hash.
    sn -= 1
    r = h
    # 4. Fold in each path element on the side the leaf's position says.
    for p in path:
        if sn == 0:
            raise ProofError("the proof is longer than the path from the leaf to the root")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while fn and not fn & 1:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    # 5. The path must reach the root, and the result must be the root given.
    if sn != 0:
        raise ProofError("the proof is shorter than the path from the leaf to the root")
    if not hmac.compare_digest(r, expected):
        raise ProofError("the proof does not lead to the root")


def verify_inclusion(
    leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> bool:
    """Return whether proof shows leaf_hash at index in the size-leaf tree with root."""
    try:
        check_inclusion(leaf_hash, index, size, proof, root)
    except ProofError:
        return False
    return True


def check_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> None:
    """Raise ProofError unless proof shows the old_size tree is a prefix of the new_size tree."""
    first_hash = _proof_hash(old_root, "the old root")
    second_hash = _proof_hash(new_root, "the new root")
    first = _proof_count(old_size, "old_size")
    second = _proof_count(new_size, "new_size")
    path = _proof_path(proof)
    # RFC 9162 section 2.1.4.2 verifies 0 < first < second. Size 0 is refused, as
    # the RFC defines no proof from it (a verifier with no earlier tree head has
    # nothing to check). Equal sizes need an empty proof and equal roots: RFC
    # 6962 section 2.1.2's SUBPROOF(m, D[m], true) = {}.
    if first == 0:
        raise ProofError("consistency with the empty tree is not defined (RFC 9162 2.1.4)")
    if first > second:
        raise ProofError(f"old_size {old_size} is larger than new_size {new_size}")
    if first == second:
        if path:
            raise ProofError("trees of the same size take an empty proof")
        if not hmac.compare_digest(first_hash, second_hash):
            raise ProofError("trees of the same size have different roots")
        return
    # 1. An empty consistency_path fails.
    if not path:
        raise ProofError("the proof is empty")
    # 2. If first is an exact power of 2, prepend first_hash.
    if first & (first - 1) == 0:
        path.insert(0, first_hash)
    # 3. fn = first - 1, sn = second - 1.
    fn = first - 1
    sn = second - 1
    # 4. Shift both right while LSB(fn) is set.
    while fn & 1:
        fn >>= 1
        sn >>= 1
    # 5. fr and sr start at the first path element.
    fr = sr = path[0]
    # 6. Fold in each later element: into both roots left of the old tree's edge,
    #    into the new root alone right of it.
    for c in path[1:]:
        if sn == 0:
            raise ProofError("the proof is longer than the path between the trees")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while fn and not fn & 1:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    # 7. sn must be 0, fr the old root and sr the new root.
    if sn != 0:
        raise ProofError("the proof is shorter than the path between the trees")
    if not hmac.compare_digest(fr, first_hash):
        raise ProofError("the proof does not lead to the old root")
    if not hmac.compare_digest(sr, second_hash):
        raise ProofError("the proof does not lead to the new root")


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> bool:
    """Return whether proof shows the old_size tree is a prefix of the new_size tree."""
    try:
        check_consistency(old_size, new_size, old_root, new_root, proof)
    except ProofError:
        return False
    return True

"""Published RFC 6962 Merkle tree test vectors, as used by Certificate Transparency code.

Sources (hex copied from the files named; nothing here is computed by this project):

* google/certificate-transparency, cpp/merkletree/merkle_tree_test.cc
  (commit 0e901cacd1388fa16f78b184612f6cd16e5ceec1): kInputs, kSHA256EmptyTreeHash,
  kSHA256Roots, kSHA256Paths and kSHA256Proofs.
* transparency-dev/merkle, proof/verify_test.go
  (commit 02194e9afb6c1d95b5381350007963aa70fff472): the same leaves, roots, inclusion
  and consistency proofs, plus the consistency proof from size 6 to size 7.
* transparency-dev/merkle, rfc6962/rfc6962_test.go
  (commit 78493b07ef9b552e3379abf9e23d4da26fbe797c): single leaf and node hashes.
* transparency-dev/merkle, proof/proof_test.go
  (commit 02a3e2029520f515596d5238c54fb0ac9e19bff4): which tree nodes make up the
  inclusion and consistency proofs for sizes up to 95 (node ids, not hashes).

Both CT sources number leaves from 1 in their inclusion vectors ({leaf, snapshot});
INCLUSION below numbers them from 0, as RFC 9162's leaf_index does.
"""

from __future__ import annotations

# The eight leaves of the reference tree (kInputs), as hex.
LEAVES_HEX = (
    "",
    "00",
    "10",
    "2021",
    "3031",
    "40414243",
    "5051525354555657",
    "606162636465666768696a6b6c6d6e6f",
)

EMPTY_ROOT_HEX = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

# ROOTS_HEX[n - 1] is the root of the tree of the first n leaves (kSHA256Roots).
ROOTS_HEX = (
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
)

# (leaf index from 0, tree size, audit path) from kSHA256Paths / inclusionProofs,
# leaving out their {0, 0} entry, which names no leaf.
INCLUSION = (
    (0, 1, ()),
    (
        0,
        8,
        (
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ),
    ),
    (
        5,
        8,
        (
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ),
    ),
    (2, 3, ("fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",)),
    (
        1,
        5,
        (
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ),
    ),
)

# (old size, new size, consistency proof) from kSHA256Proofs / consistencyProofs.
CONSISTENCY = (
    (1, 1, ()),
    (
        1,
        8,
        (
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ),
    ),
    (
        6,
        8,
        (
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ),
    ),
    (
        2,
        5,
        (
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ),
    ),
    # Only in transparency-dev/merkle's verify_test.go.
    (
        6,
        7,
        (
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ),
    ),
)

# (data, SHA-256(0x00 || data)) and (left, right, SHA-256(0x01 || left || right))
# from TestRFC6962Hasher.
LEAF_HASHES_HEX = (
    (b"", "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"),
    (b"L123456", "395aa064aa4c29f7010acfe3f25db9485bbd4b91897b6ad7ad547639252b4d56"),
)
NODE_HASHES_HEX = (
    (b"N123", b"N456", "aa217fe888e47007fa15edab33c2b492a722cb106c64667fc2b044444de66bbb"),
)

# Proof shapes from proof/proof_test.go: (size, index, node ids, rehash). A node id
# is (level, index): the complete subtree over leaves [index * 2**level,
# (index + 1) * 2**level). rehash = (begin, end) folds ids[begin:end] into one hash,
# h = ids[begin], then h = node(ids[i], h) for each later i: the node at the right
# edge of a tree whose size is not a power of two. None means no folding.
NodeId = tuple[int, int]
Shape = tuple[int, int, tuple[NodeId, ...], tuple[int, int] | None]

INCLUSION_SHAPES: tuple[Shape, ...] = (
    (1, 0, (), None),
    (2, 0, ((0, 1),), None),
    (2, 1, ((0, 0),), None),
    (3, 1, ((0, 0), (0, 2)), None),
    (7, 0, ((0, 1), (1, 1), (0, 6), (1, 2)), (2, 4)),
    (7, 1, ((0, 0), (1, 1), (0, 6), (1, 2)), (2, 4)),
    (7, 2, ((0, 3), (1, 0), (0, 6), (1, 2)), (2, 4)),
    (7, 3, ((0, 2), (1, 0), (0, 6), (1, 2)), (2, 4)),
    (7, 4, ((0, 5), (0, 6), (2, 0)), None),
    (7, 5, ((0, 4), (0, 6), (2, 0)), None),
    (7, 6, ((1, 2), (2, 0)), None),
    (4, 2, ((0, 3), (1, 0)), None),
    (5, 3, ((0, 2), (1, 0), (0, 4)), None),
    (6, 3, ((0, 2), (1, 0), (1, 2)), None),
    (6, 4, ((0, 5), (2, 0)), None),
    (15, 10, ((0, 11), (1, 4), (0, 14), (1, 6), (3, 0)), (2, 4)),
    (31, 24, ((0, 25), (1, 13), (0, 30), (1, 14), (3, 2), (4, 0)), (2, 4)),
    (
        95,
        81,
        ((0, 80), (1, 41), (2, 21), (0, 94), (1, 46), (2, 22), (4, 4), (6, 0)),
        (3, 6),
    ),
)

# (old size, new size, node ids, rehash), as above.
CONSISTENCY_SHAPES: tuple[Shape, ...] = (
    (1, 2, ((0, 1),), None),
    (1, 4, ((0, 1), (1, 1)), None),
    (1, 6, ((0, 1), (1, 1), (1, 2)), None),
    (2, 3, ((0, 2),), None),
    (2, 8, ((1, 1), (2, 1)), None),
    (3, 7, ((0, 2), (0, 3), (1, 0), (0, 6), (1, 2)), (3, 5)),
    (4, 7, ((0, 6), (1, 2)), (0, 2)),
    (5, 7, ((0, 4), (0, 5), (0, 6), (2, 0)), None),
    (6, 7, ((1, 2), (0, 6), (2, 0)), None),
    (7, 8, ((0, 6), (0, 7), (1, 2), (2, 0)), None),
    (1, 1, (), None),
    (2, 2, (), None),
    (3, 3, (), None),
    (4, 4, (), None),
    (5, 5, (), None),
    (7, 7, (), None),
    (8, 8, (), None),
    (2, 4, ((1, 1),), None),
    (3, 5, ((0, 2), (0, 3), (1, 0), (0, 4)), None),
    (3, 6, ((0, 2), (0, 3), (1, 0), (1, 2)), None),
    (4, 6, ((1, 2),), None),
    (1, 7, ((0, 1), (1, 1), (0, 6), (1, 2)), (2, 4)),
    (10, 15, ((1, 4), (1, 5), (0, 14), (1, 6), (3, 0)), (2, 4)),
    (24, 31, ((3, 2), (0, 30), (1, 14), (2, 6), (4, 0)), (1, 4)),
    (
        81,
        95,
        ((0, 80), (0, 81), (1, 41), (2, 21), (0, 94), (1, 46), (2, 22), (4, 4), (6, 0)),
        (4, 7),
    ),
)

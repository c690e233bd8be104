"""Alignments of the family-contacts recipe (protein_performer/recipes/family_contacts/msa.py): A3M,
Stockholm and aligned FASTA read into the same tokens, gap filtering with the query positions of the
kept columns, DCA sequence weights against hand-counted neighbours and a brute-force pair loop, and
one clear error per bad input."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from protein_performer.data.tokenizer import Tokenizer
from protein_performer.errors import UserError
from protein_performer.recipes.family_contacts.msa import (
    GAP,
    AlignmentError,
    filter_gaps,
    n_eff,
    read_alignment,
    sequence_weights,
)


def enc(*rows: str) -> np.ndarray:
    """Expected tokens: residues by the tokenizer, '-' as GAP."""
    tok = Tokenizer()
    return np.stack([[GAP if c == "-" else int(tok.encode(c)[0]) for c in row] for row in rows]).astype(np.uint8)


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return path


A3M = """#A3M comment line
>query some description
MKLVA
>s1
MK-VA
>s2
MaKLvVA
>s3
-K.LVa
A
"""


def test_a3m_drops_insertions_and_maps_the_query(tmp_path):
    aln = read_alignment(write(tmp_path, "x.a3m", A3M))
    assert aln.ids == ["query", "s1", "s2", "s3"]
    np.testing.assert_array_equal(aln.tokens, enc("MKLVA", "MK-VA", "MKLVA", "-KLVA"))
    assert aln.tokens.dtype == np.uint8 and aln.query == 0
    np.testing.assert_array_equal(aln.columns, [0, 1, 2, 3, 4])
    assert aln.query_sequence == "MKLVA"
    # s2 as the query: its insertions a (1) and v (4) are residues of its sequence, not columns
    other = read_alignment(tmp_path / "x.a3m", query="s2")
    assert other.query == 2
    np.testing.assert_array_equal(other.columns, [0, 2, 3, 5, 6])
    # s1 as the query: its gap column has no query position
    np.testing.assert_array_equal(read_alignment(tmp_path / "x.a3m", query="s1").columns, [0, 1, -1, 2, 3])


STOCKHOLM_RF = """# STOCKHOLM 1.0
#=GF ID test
q/1-6      MK.LVAw
s1/3-8     MKeL-Av
#=GR s1/3-8 SS  HHHHHHH
s2/1-4     -K.LV-.
#=GC RF    xx.xxx.
//
"""


def test_stockholm_drops_the_rf_insert_columns(tmp_path):
    aln = read_alignment(write(tmp_path, "fam.sto", STOCKHOLM_RF))
    assert aln.ids == ["q/1-6", "s1/3-8", "s2/1-4"]
    np.testing.assert_array_equal(aln.tokens, enc("MKLVA", "MKL-A", "-KLV-"))
    np.testing.assert_array_equal(aln.columns, [0, 1, 2, 3, 4])
    # s1 as the query: e (column 3) is an insert, yet the 3rd residue of s1
    np.testing.assert_array_equal(read_alignment(tmp_path / "fam.sto", query="s1/3-8").columns, [0, 1, 3, -1, 4])


def test_stockholm_without_rf_uses_lowercase_columns_and_reads_gzip(tmp_path):
    text = "# STOCKHOLM 1.0\nq  MK-LVA\ns1 MKeL-A\ns2 -K.LVa\n//\n"
    path = tmp_path / "fam.stockholm.gz"
    path.write_bytes(gzip.compress(text.encode()))
    aln = read_alignment(path)
    np.testing.assert_array_equal(aln.tokens, enc("MKLV", "MKL-", "-KLV"))  # columns 3 and 6 hold e, a
    np.testing.assert_array_equal(aln.columns, [0, 1, 2, 3])


def test_aligned_fasta_keeps_lowercase_and_filter_drops_query_gap_columns(tmp_path):
    text = ">q\nMK-LVA\n>s1\nmk-lv.\n>s2\nMKELVA\n>s3\n--E--A\n"
    aln = read_alignment(write(tmp_path, "x.afa", text))
    np.testing.assert_array_equal(aln.tokens, enc("MK-LVA", "MK-LV-", "MKELVA", "--E--A"))
    np.testing.assert_array_equal(aln.columns, [0, 1, -1, 2, 3, 4])
    # query gap column 2 dropped; s3 gapped in 4/5 query columns > 0.5 dropped; then column 4 (A:
    # gapped in s1 only, 1/3) kept at 0.5 and dropped at 0.3
    out = filter_gaps(aln, max_row_gap=0.5, max_col_gap=0.5)
    assert out.ids == ["q", "s1", "s2"] and out.query == 0
    np.testing.assert_array_equal(out.tokens, enc("MKLVA", "MKLV-", "MKLVA"))
    np.testing.assert_array_equal(out.columns, [0, 1, 2, 3, 4])
    tight = filter_gaps(aln, max_row_gap=0.5, max_col_gap=0.3)
    np.testing.assert_array_equal(tight.columns, [0, 1, 2, 3])
    np.testing.assert_array_equal(tight.tokens, enc("MKLV", "MKLV", "MKLV"))


def test_filter_keeps_the_query_wherever_it_is_and_maps_columns(tmp_path):
    text = ">a\nMK-VA\n>q\n-KLVA\n>b\n-K-VA\n>c\nMKLVA\n"
    aln = read_alignment(write(tmp_path, "x.fasta", text), query="q")
    out = filter_gaps(aln, max_row_gap=0.3, max_col_gap=0.5)
    # query columns 1-4 (query positions 0-3); a has 1 gap of 4 (0.25) kept, b 1 of 4 kept
    assert out.ids == ["a", "q", "b", "c"] and out.query == 1
    # column L (query position 1) is gapped in a and b: 2/4 = 0.5 kept
    np.testing.assert_array_equal(out.columns, [0, 1, 2, 3])
    out = filter_gaps(aln, max_row_gap=0.3, max_col_gap=0.4)
    np.testing.assert_array_equal(out.columns, [0, 2, 3])
    np.testing.assert_array_equal(out.tokens, enc("KVA", "KVA", "KVA", "KVA"))
    assert out.query_sequence == "KVA"


def test_weights_count_neighbours_at_80_percent_identity():
    tokens = enc("AAAAA", "AAAAC", "AAACC", "CCCCC")
    # identities: 0-1 4/5, 1-2 4/5, 0-2 3/5, 3 alone -> neighbours 2, 3, 2, 1
    np.testing.assert_allclose(sequence_weights(tokens), [1 / 2, 1 / 3, 1 / 2, 1.0], rtol=1e-12)
    assert n_eff(tokens) == pytest.approx(1 / 2 + 1 / 3 + 1 / 2 + 1, rel=1e-12)
    # a gap facing a gap counts as identical: AA--- and CC--- are 3/5 identical
    gapped = enc("AA---", "CC---", "CCCCC")
    np.testing.assert_allclose(sequence_weights(gapped, threshold=0.6), [1 / 2, 1 / 2, 1.0], rtol=1e-12)
    np.testing.assert_allclose(sequence_weights(gapped, threshold=0.8), [1.0, 1.0, 1.0], rtol=1e-12)


def test_weights_match_a_pair_loop_in_any_chunk_size():
    rng = np.random.default_rng(0)
    base = rng.integers(4, 8, size=(6, 20))
    tokens = base[rng.integers(0, 6, size=40)]  # 40 noisy copies of 6 ancestors
    flip = rng.random(tokens.shape) < 0.15
    tokens = np.where(flip, rng.choice([4, 5, GAP], size=tokens.shape), tokens).astype(np.uint8)
    identity = (tokens[:, None, :] == tokens[None, :, :]).mean(-1)
    expected = 1.0 / (identity >= 0.8).sum(1)
    assert 0.1 < (expected < 1).mean() < 1  # both lone and clustered rows
    for chunk in (1, 7, 1024):
        np.testing.assert_allclose(sequence_weights(tokens, chunk=chunk), expected, rtol=1e-12)


@pytest.mark.parametrize(
    ("name", "text", "query", "expected"),
    [
        ("ragged.a3m", ">q\nMKLVA\n>s1\nMK\n>s2\nMKVAA\n", None, r"ragged.a3m: record 's1' \(header line 3\): 2 aligned columns.*5"),
        ("ragged.sto", "# STOCKHOLM 1.0\nq MKLVA\ns1 MKL\n//\n", None, r"ragged.sto: .*record 's1' has 3 columns"),
        ("empty.a3m", "#A3M\n", None, r"empty.a3m: no record, so no query"),
        ("empty.sto", "# STOCKHOLM 1.0\n//\n", None, r"empty.sto: no record"),
        ("named.fasta", ">q\nMK\n>s\nMK\n", "x", r"named.fasta: no record 'x' to use as the query"),
        ("letters.a3m", ">q\nMKLVA\n>s1\nMK\nL1A\n", None, r"letters.a3m: record 's1' \(header line 3\): invalid character '1' at position 4"),
        ("letters.sto", "# STOCKHOLM 1.0\nq MKLVA\ns1 MKJVA\n//\n", None, r"letters.sto: record 's1': invalid character 'J'"),
        ("latin1.fasta", ">q\nMK\n>s\nM\u00e9\n", None, r"latin1.fasta: record 's' \(header line 3\): non-ASCII character at position 2"),
        ("headless.fasta", "MKLVA\n>q\nMKLVA\n", None, r"headless.fasta: line 1: sequence before"),
    ],
)  # fmt: skip
def test_bad_alignments_raise_one_user_error(tmp_path, name, text, query, expected):
    with pytest.raises(UserError, match=expected) as info:
        read_alignment(write(tmp_path, name, text), query=query)
    assert isinstance(info.value, AlignmentError) and "\n" not in str(info.value)


def test_empty_after_filtering_says_what_to_loosen(tmp_path):
    aln = read_alignment(write(tmp_path, "gappy.a3m", ">q\nMKLVA\n>s1\nM----\n>s2\n--L--\n"))
    with pytest.raises(AlignmentError, match=r"gappy.a3m: empty after filtering: 0 sequence.*max_row_gap"):
        filter_gaps(aln)
    assert filter_gaps(aln, max_row_gap=0.8).ids == ["q", "s1", "s2"]
    with pytest.raises(AlignmentError, match="no residue"):
        filter_gaps(read_alignment(write(tmp_path, "blank.fasta", ">q\n---\n>s\nMKL\n")))
    with pytest.raises(AlignmentError, match="alignment file not found"):
        read_alignment(tmp_path / "missing.a3m")

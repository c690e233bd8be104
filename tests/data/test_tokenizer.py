import numpy as np
import pytest

from protein_performer.data.tokenizer import Tokenizer, UnknownResidueError


def test_vocabulary_matches_paper():
    tok = Tokenizer()
    assert tok.vocab_size == 29
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id) == (0, 1, 2, 3)
    assert len(tok.residue_ids) == 25
    assert len(set(tok.vocab().values())) == 29


def test_round_trip_lowercase_and_stop():
    tok = Tokenizer()
    seq = "ACDEFGHIKLMNPQRSTVWYBOUXZ"
    ids = tok.encode(seq)
    assert ids.dtype == np.uint8
    assert list(ids) == list(range(4, 29))
    assert tok.decode(ids) == seq
    assert tok.decode(tok.encode(seq.lower() + "*")) == seq


def test_special_tokens_in_decode():
    tok = Tokenizer()
    ids = tok.encode("MK", add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == "MK"
    assert tok.decode(ids, skip_special=False) == "^MK$"


def test_unknown_residue_policy():
    with pytest.raises(UnknownResidueError, match="position 2"):
        Tokenizer().encode("MK1A")
    with pytest.raises(UnknownResidueError):
        Tokenizer().encode("MKé")
    assert Tokenizer(unknown="X").decode(Tokenizer(unknown="X").encode("MK1A")) == "MKXA"


def test_decode_rejects_out_of_range():
    with pytest.raises(ValueError, match="out of range"):
        Tokenizer().decode([5, 40])


@pytest.mark.parametrize("causal", [False, True], ids=["bid", "uni"])
def test_frame_puts_bos_residues_and_eos_for_bid_only(causal):
    """BID ``[bos, s, eos]``, UNI ``[bos, s]``; ``special_tokens`` counts what was added and the
    returned slice maps the framed positions back to the residues."""
    tok = Tokenizer()
    residues = tok.encode("MKVLAAGW")
    ids, where = tok.frame(residues, causal)
    expected = [tok.bos_id, *residues.tolist()] + ([] if causal else [tok.eos_id])
    assert ids.dtype == np.int64 and ids.tolist() == expected
    assert len(ids) == len(residues) + tok.special_tokens(causal) == len(residues) + (1 if causal else 2)
    assert where == tok.residue_slice(len(residues)) == slice(1, 1 + len(residues))
    np.testing.assert_array_equal(ids[where], residues)  # framed position -> residue
    assert tok.decode(ids[where]) == "MKVLAAGW"
    positions = np.arange(len(ids))[where]  # residue i sits at framed position i + where.start
    assert positions.tolist() == [i + where.start for i in range(len(residues))]
    same, _ = tok.frame("MKVLAAGW", causal)  # a string is encoded first
    np.testing.assert_array_equal(same, ids)
    empty, where0 = tok.frame(residues[:0], causal)
    assert empty.tolist() == [tok.bos_id] + ([] if causal else [tok.eos_id]) and empty[where0].size == 0

"""crdt.admission: a run's proof of work per author, checked on every record before the author cap."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from crdt_testlib import SIGNERS, genesis

from crdt import (
    CapacityError,
    Contribution,
    Genesis,
    GenesisMismatchError,
    Limits,
    ModelState,
    ValidationError,
    admission_bits,
    encode_payload,
    find_admission_nonce,
    make_contribution,
)
from crdt.admission import check_admission

BASE = genesis()
BITS = 12


def gated() -> Genesis:
    return Genesis(BASE.params, BASE.fragments, {"task": "test", "admission_bits": str(BITS)})


def record(g: Genesis, signer: object, seq: int, nonce: int) -> Contribution:
    n = g.fragment_length(0)
    payload = encode_payload("dense-f32", n, None, np.full(n, 0.01, np.float32))
    return make_contribution(signer, genesis_id=g.id, seq=seq, fragment=0, codec="dense-f32",  # type: ignore[arg-type]
                             payload=payload, weight=1.0, base_version=b"\x00" * 32, admission_nonce=nonce)


def test_a_found_nonce_admits_its_author_for_its_run_only() -> None:
    g = gated()
    author = SIGNERS[0].public_key
    nonce = find_admission_nonce(g.id, author, BITS)
    check_admission(g.id, author, nonce, BITS)
    with pytest.raises(ValidationError, match="not admitted"):
        check_admission(g.id, SIGNERS[1].public_key, nonce, BITS)  # not another author's
    with pytest.raises(ValidationError, match="not admitted"):
        check_admission(BASE.id, author, nonce, 2 * BITS)  # not another run's (nor more work)


def test_records_of_unadmitted_authors_are_refused_before_they_take_a_place_under_the_cap() -> None:
    g = gated()
    state = ModelState(g, limits=Limits(max_authors=1))
    for signer in SIGNERS[1:4]:  # throwaway authors without the work: refused, and the cap stays free
        with pytest.raises(ValidationError, match="not admitted"):
            state.apply(record(g, signer, 2, nonce=1))
    honest = SIGNERS[0]
    state.apply(record(g, honest, 1, nonce=find_admission_nonce(g.id, honest.public_key, BITS)))
    assert state.contribution_count == 1
    latecomer = SIGNERS[5]  # with the work, but the cap is now taken: the cap still bounds memory
    with pytest.raises(CapacityError):
        state.apply(record(g, latecomer, 1, nonce=find_admission_nonce(g.id, latecomer.public_key, BITS)))


def test_the_nonce_is_signed_and_rides_only_when_set() -> None:
    g = gated()
    nonce = find_admission_nonce(g.id, SIGNERS[0].public_key, BITS)
    with_nonce, without = record(g, SIGNERS[0], 1, nonce), record(g, SIGNERS[0], 1, 0)
    assert Contribution.decode(with_nonce.encode()).admission_nonce == nonce
    assert len(with_nonce.encode()) > len(without.encode())
    forged = dataclasses.replace(with_nonce, admission_nonce=nonce + 1)
    with pytest.raises(ValidationError):  # the signature covers it
        Contribution.decode(forged.encode())


@pytest.mark.parametrize("raw", ["0", "41", "x", "-3"])
def test_the_work_asked_is_an_integer_in_range(raw: str) -> None:
    with pytest.raises(GenesisMismatchError):
        admission_bits(Genesis(BASE.params, BASE.fragments, {"admission_bits": raw}))
    assert admission_bits(BASE) == 0

"""TEST ONLY: the Byzantine attacker of ``[training] byzantine`` (tests/integration/test_byzantine.py).

It rewrites this node's own update before it is signed, which is exactly what a real malicious member
can do: every check a receiver makes (signature, format, ``max_norm``) still passes. It exists to show
that clipping and suspect detection work against a real daemon; never set it on a real node.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

import crdt

__all__ = ["byzantine_round"]

BYZANTINE_FLIP10_SCALE = -10.0  # "flip10": against the honest direction, ten times as loud


def byzantine_round(mode: str, result: Any, fragment_length: int) -> Any:
    """TEST ONLY: the Byzantine attacker of ``[training] byzantine`` ("" returns ``result`` unchanged).

    "flip10" decodes the honest round's payload, multiplies the values by -10 and re-encodes them with
    the same codec. The node then signs the result with its own key, exactly what a real malicious member
    can do; every check a receiver makes (signature, format, ``max_norm``) still passes.
    """
    if not mode:
        return result
    if mode != "flip10":
        raise ValueError(f"unknown byzantine mode {mode!r}")
    indices, values = crdt.decode_payload(result.codec, fragment_length, result.payload)
    # A transform codec decodes to entries, not coefficients: the attacker sends those dense instead.
    codec = "dense-f32" if result.codec in crdt.TRANSFORM_CODECS else result.codec
    payload = crdt.encode_payload(
        codec,
        fragment_length,
        None if codec in crdt.DENSE_CODECS else indices,
        (values * np.float32(BYZANTINE_FLIP10_SCALE)).astype(np.float32),
    )
    return dataclasses.replace(result, codec=codec, payload=payload, payload_bytes=len(payload))

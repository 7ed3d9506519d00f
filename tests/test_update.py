"""ClientUpdate files: round trip, and every kind of bad update rejected with a clear error."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from collabedit.collab.update import (
    ClientUpdate,
    Expectation,
    LayerUpdate,
    UpdateError,
    load_update,
)

D_OUT, D_IN = 3, 5


def _update(**kw) -> ClientUpdate:
    gen = torch.Generator().manual_seed(0)
    K = {1: torch.randn(4, D_IN, generator=gen), 2: torch.randn(4, D_IN, generator=gen)}
    R = {1: torch.randn(4, D_OUT, generator=gen), 2: torch.randn(4, D_OUT, generator=gen)}
    args = dict(base_fingerprint="abc", client_id="c1", round=0) | kw
    return ClientUpdate.from_keys_residuals(K, R, **args)


EXPECT = Expectation("abc", {1: (D_OUT, D_IN), 2: (D_OUT, D_IN)}, round=0)


def test_round_trip(tmp_path):
    u = _update()
    u.save(tmp_path / "u.safetensors")
    back = load_update(tmp_path / "u.safetensors", EXPECT)
    assert back.client_id == "c1" and back.n_edits == 4 and back.round == 0
    for layer in (1, 2):
        assert torch.equal(back.layers[layer].P, u.layers[layer].P)
        assert torch.equal(back.layers[layer].S, u.layers[layer].S)
    assert not list(tmp_path.glob(".*"))  # no temp file left


def _write_bad(tmp_path, mutate) -> str:
    u = _update()
    mutate(u)
    path = tmp_path / "bad.safetensors"
    u.save(path)
    return path


@pytest.mark.parametrize("mutate,message", [
    (lambda u: setattr(u, "base_fingerprint", "other"), "base model other"),
    (lambda u: setattr(u, "round", 3), "round 3"),
    (lambda u: u.layers[1].P.__setitem__((0, 0), float("nan")), "non-finite"),
    (lambda u: u.layers[2].S.__setitem__((0, 1), 99.0), "not symmetric"),
    (lambda u: setattr(u.layers[1], "P", torch.zeros(D_OUT + 1, D_IN, dtype=torch.float64)),
     "shape"),
    (lambda u: setattr(u.layers[1], "P", None), "missing P"),
    (lambda u: u.layers.pop(2), "layers \\[1\\]"),
    (lambda u: setattr(u.layers[1], "S", u.layers[1].S.to(torch.float16)), "dtype"),
])
def test_bad_updates_are_rejected(tmp_path, mutate, message):
    path = _write_bad(tmp_path, mutate)
    with pytest.raises(UpdateError, match=message) as info:
        load_update(path, EXPECT)
    assert "bad.safetensors" in str(info.value)


def test_foreign_and_broken_files(tmp_path):
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, foreign)
    with pytest.raises(UpdateError, match="not a collabedit client update"):
        load_update(foreign)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00garbage")
    with pytest.raises(UpdateError, match="unreadable"):
        load_update(broken)


def test_keys_and_residuals_must_pair():
    with pytest.raises(ValueError, match="keys but"):
        ClientUpdate.from_keys_residuals({1: torch.zeros(3, 2)}, {1: torch.zeros(2, 2)},
                                         base_fingerprint="a", client_id="c", round=0)
    assert LayerUpdate().P is None

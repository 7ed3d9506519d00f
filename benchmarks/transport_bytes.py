"""Bytes one client sends per round: full (P, S) vs factor (F = K Q, G = R Q) updates.

OMP_NUM_THREADS=1 python benchmarks/transport_bytes.py --json results/transport_bytes.json

Real update files are written through ClientUpdate.save (float64, as the format stores them) from
random keys and residuals of the given sizes, so the byte counts include the safetensors header;
float32 payload sizes are computed, not written. No model is loaded.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import torch

from collabedit.collab.transport import message_bytes, should_factorise
from collabedit.collab.update import ClientUpdate, Expectation, load_update

# GPT-2 XL's MLP down-projection (d_in 4 * 1600) at MEMIT's layers 13-17; the shipped world's
# 1024 -> 128 MLP at its edited layers 1-2
PRESETS = {
    "gpt2-xl": {"d_in": 6400, "d_out": 1600, "layers": (13, 14, 15, 16, 17), "edits": (500,)},
    "world": {"d_in": 1024, "d_out": 128, "layers": (1, 2), "edits": (20, 200)},
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def measure(
    d_in: int, d_out: int, layers: tuple[int, ...], n: int, seed: int, folder: Path
) -> dict:
    gen = torch.Generator().manual_seed(seed)
    keys = {la: torch.randn(n, d_in, generator=gen, dtype=torch.float64) for la in layers}
    residuals = {la: torch.randn(n, d_out, generator=gen, dtype=torch.float64) for la in layers}
    first = layers[0]
    direct_p = residuals[first].T @ keys[first]
    direct_s = keys[first].T @ keys[first]
    expect = Expectation("bench", {la: (d_out, d_in) for la in layers}, round=0)
    out: dict = {
        "d_in": d_in,
        "d_out": d_out,
        "layers": len(layers),
        "edits_per_client": n,
        "should_factorise": should_factorise(d_in, d_out, n),
    }
    for form in ("full", "factor"):
        start = time.perf_counter()
        update = ClientUpdate.from_keys_residuals(
            keys, residuals, base_fingerprint="bench", client_id="c0", round=0, form=form,
            generator=gen,
        )
        build_s = time.perf_counter() - start
        path = folder / f"{form}-{d_in}-{n}.safetensors"
        start = time.perf_counter()
        update.save(path)
        save_s = time.perf_counter() - start
        del update
        gc.collect()
        file_bytes = path.stat().st_size
        payload = len(layers) * message_bytes(d_in, d_out, n, form, dtype_bytes=8)
        start = time.perf_counter()
        loaded = load_update(path, expect)
        load_s = time.perf_counter() - start
        lu = loaded.layers[first]
        out[form] = {
            "file_bytes": file_bytes,
            "payload_bytes_float64": payload,
            "header_bytes": file_bytes - payload,
            "payload_bytes_float32": len(layers) * message_bytes(d_in, d_out, n, form, 4),
            "client_build_s": round(build_s, 2),
            "save_s": round(save_s, 2),
            # for the factor form this includes the server forming P = G F^T and S = F F^T
            "server_load_validate_s": round(load_s, 2),
            "rel_err_P_first_layer": _rel(lu.P, direct_p),
            "rel_err_S_first_layer": _rel(lu.S, direct_s),
        }
        del loaded, lu
        path.unlink()
        gc.collect()
    out["ratio_full_over_factor_file"] = round(
        out["full"]["file_bytes"] / out["factor"]["file_bytes"], 3
    )
    out["ratio_full_over_factor_float32"] = round(
        out["full"]["payload_bytes_float32"] / out["factor"]["payload_bytes_float32"], 3
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(PRESETS), default=list(PRESETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    results: dict = {
        "stored_dtype": "float64",
        "torch_threads": torch.get_num_threads(),
        "seed": args.seed,
        "configs": [],
    }
    with tempfile.TemporaryDirectory(prefix="transport-bytes-") as tmp:
        for name in args.models:
            preset = PRESETS[name]
            for n in preset["edits"]:
                row = measure(
                    preset["d_in"], preset["d_out"], preset["layers"], n, args.seed, Path(tmp)
                )
                results["configs"].append({"model": name, **row})
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Covariance statistics C = E[k k^T] of the edited projections' inputs over a text corpus.

MEMIT protects what a layer already knows by keeping W k unchanged for the keys k the model sees
on ordinary text; C summarises those keys. It is collected once per model and layer, streamed in
batches, accumulated in float64, and cached on disk keyed by the model's fingerprint.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from collabedit.models import arch
from collabedit.models.tracing import capture_mlp_inputs, pad_batch

STATS_FORMAT = 1


def default_cache_dir() -> Path:
    return Path(os.environ.get("COLLABEDIT_CACHE", Path.home() / ".cache" / "collabedit")) / "stats"


@dataclass
class LayerStats:
    """Uncentered second moment of keys: mom2 = sum k k^T / count (float64)."""

    layer: int
    mom2: torch.Tensor
    count: int
    meta: dict


def iter_corpus(
    corpus: str, limit: int | None = None, world_dir: str | os.PathLike[str] | None = None
) -> Iterator[str]:
    """Texts of a corpus: `world` (the sentences of the world in `world_dir`, by default the
    shipped one), a local text file (one text per line), or a Hugging Face dataset id such as
    `wikitext:wikitext-103-raw-v1` (needs the `datasets` package and a reachable hub)."""
    count = 0

    def limited(texts: Iterable[str]) -> Iterator[str]:
        nonlocal count
        for t in texts:
            t = t.strip()
            if not t:
                continue
            if limit is not None and count >= limit:
                return
            count += 1
            yield t

    if corpus == "world":
        from collabedit.world.generator import World
        from collabedit.world.store import DEFAULT_WORLD_DIR, WORLD_FILE

        folder = Path(world_dir) if world_dir is not None else DEFAULT_WORLD_DIR
        yield from limited(World.load(folder / WORLD_FILE).sentences())
    elif Path(corpus).is_file():
        with open(corpus, encoding="utf-8") as f:
            yield from limited(f)
    else:
        try:
            import datasets
        except ImportError as exc:
            raise ValueError(
                f"corpus {corpus!r} is neither 'world' nor a local file; loading it as a Hugging "
                "Face dataset needs `pip install datasets`"
            ) from exc
        name, _, config = corpus.partition(":")
        ds = datasets.load_dataset(name, config or None, split="train", streaming=True)
        yield from limited(row["text"] for row in ds)


@torch.no_grad()
def collect_stats(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Iterable[str],
    layers: Sequence[int],
    batch_size: int = 64,
    max_length: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[int, LayerStats]:
    """Stream `texts` through the model; accumulate sum k k^T over every non-pad token.

    progress(texts_done, tokens_done) is called after each batch.
    """
    layers = arch.check_layers(model, layers)
    max_length = max_length or min(getattr(tokenizer, "model_max_length", 1024), 1024)
    n_pos = getattr(model.config, "n_positions", None) or getattr(
        model.config, "max_position_embeddings", max_length
    )
    max_length = min(max_length, n_pos)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sums: dict[int, torch.Tensor] = {}
    tokens = 0
    done = 0
    batch: list[list[int]] = []

    def flush() -> None:
        nonlocal tokens
        ids, mask = pad_batch(batch, pad)
        device = next(model.parameters()).device
        with capture_mlp_inputs(model, layers) as keys:
            model(input_ids=ids.to(device), attention_mask=mask.to(device))
        keep = mask.bool().to(device)
        for layer in layers:
            k = keys[layer][keep].double()
            sums[layer] = sums.get(layer, 0) + k.T @ k
        tokens += int(keep.sum())
        batch.clear()

    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_length]
        if not ids:
            continue
        batch.append(ids)
        done += 1
        if len(batch) == batch_size:
            flush()
            if progress:
                progress(done, tokens)
    if batch:
        flush()
        if progress:
            progress(done, tokens)
    if tokens == 0:
        raise ValueError("the corpus gave no tokens")
    return {
        layer: LayerStats(layer, sums[layer] / tokens, tokens, {"texts": done}) for layer in layers
    }


def _cache_file(cache_dir: Path, model_fp: str, layer: int, corpus: str, samples: int) -> Path:
    safe_corpus = "".join(c if c.isalnum() or c in "-_." else "_" for c in corpus)[-60:]
    return cache_dir / model_fp / f"layer{layer}-{safe_corpus}-{samples}.safetensors"


def save_stats(path: Path, stats: LayerStats) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: json.dumps(v) for k, v in stats.meta.items()} | {
        "format": str(STATS_FORMAT),
        "layer": str(stats.layer),
        "count": str(stats.count),
    }
    fd, tmp = tempfile.mkstemp(prefix=".stats-", dir=path.parent)
    os.close(fd)
    save_file({"mom2": stats.mom2.contiguous()}, tmp, metadata=meta)
    os.replace(tmp, path)


def load_stats(path: Path, expect_fingerprint: str | None = None) -> LayerStats:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        mom2 = f.get_tensor("mom2")
    if meta.get("format") != str(STATS_FORMAT):
        raise ValueError(f"{path}: not a collabedit statistics file (format {meta.get('format')})")
    info = {k: json.loads(v) for k, v in meta.items() if k not in ("format", "layer", "count")}
    if expect_fingerprint is not None and info.get("model_fingerprint") != expect_fingerprint:
        raise ValueError(
            f"{path}: statistics belong to model {info.get('model_fingerprint')}, "
            f"not to this model ({expect_fingerprint})"
        )
    return LayerStats(int(meta["layer"]), mom2, int(meta["count"]), info)


def layer_stats(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    layers: Sequence[int],
    corpus: str = "world",
    samples: int = 100_000,
    cache_dir: Path | None = None,
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> dict[int, LayerStats]:
    """Cached statistics for `layers`; collects (one pass for all missing layers) when absent."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    fp = arch.fingerprint(model)
    result: dict[int, LayerStats] = {}
    missing = []
    for layer in layers:
        path = _cache_file(cache_dir, fp, layer, corpus, samples)
        if path.is_file():
            result[layer] = load_stats(path, expect_fingerprint=fp)
        else:
            missing.append(layer)
    if missing:
        start = time.perf_counter()
        source = Path(str(getattr(model.config, "_name_or_path", "")))
        world_dir = source if (source / "world.json").is_file() else None
        fresh = collect_stats(
            model,
            tokenizer,
            iter_corpus(corpus, samples, world_dir),
            missing,
            batch_size=batch_size,
            progress=progress,
        )
        seconds = time.perf_counter() - start
        for layer, st in fresh.items():
            st.meta |= {
                "model_fingerprint": fp,
                "corpus": corpus,
                "samples": samples,
                "seconds": seconds,
                "module": arch.mlp_out_name(model, layer),
            }
            save_stats(_cache_file(cache_dir, fp, layer, corpus, samples), st)
            result[layer] = st
    return result

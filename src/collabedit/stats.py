"""Covariance statistics C = E[k k^T] of the edited projections' inputs over a text corpus.

MEMIT protects what a layer already knows by keeping W k unchanged for the keys k the model sees
on ordinary text; C summarises those keys. It is collected once per model and layer, streamed in
batches, accumulated in float64, and cached on disk keyed by the model's fingerprint.
"""

from __future__ import annotations

import importlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from collabedit import io
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


# Corpora other packages provide, by name: "module:function", imported on first use, called with
# the model's folder (or None) and returning its texts. The world's corpus is its own sentences,
# so it comes from the world package; this module does not import it.
CORPORA: dict[str, str] = {"world": "collabedit.world.corpus:world_sentences"}


def register_corpus(name: str, provider: str | Callable[[Path | None], Iterable[str]]) -> None:
    CORPORA[name] = provider  # type: ignore[assignment]


def _provider(name: str) -> Callable[[Path | None], Iterable[str]] | None:
    ref = CORPORA.get(name)
    if ref is None or callable(ref):
        return ref
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def iter_corpus(
    corpus: str, limit: int | None = None, model_dir: str | os.PathLike[str] | None = None
) -> Iterator[str]:
    """Texts of a corpus: a registered name (`world`: the sentences of the world the model in
    `model_dir` was trained on, by default the shipped one), a local text file (one text per
    line), or a Hugging Face dataset id such as `wikitext:wikitext-103-raw-v1` (needs the
    `datasets` package and a reachable hub)."""
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

    provider = _provider(corpus)
    if provider is not None:
        yield from limited(provider(Path(model_dir) if model_dir is not None else None))
    elif Path(corpus).is_file():
        with open(corpus, encoding="utf-8") as f:
            yield from limited(f)
    else:
        try:
            import datasets
        except ImportError as exc:
            raise ValueError(
                f"corpus {corpus!r} is neither {' nor '.join(map(repr, CORPORA))} nor a local "
                "file; loading it as a Hugging Face dataset needs `pip install datasets`"
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


# A model folder's own statistics, laid out as the cache (read-only): the shipped worlds carry
# their editors' C so that a first demo does not spend minutes collecting it.
CARRIED_DIR = "stats"


def _carried_file(
    model: PreTrainedModel, model_fp: str, layer: int, corpus: str, samples: int
) -> Path | None:
    folder = arch.model_folder(model)
    if folder is None:
        return None
    return _cache_file(folder / CARRIED_DIR, model_fp, layer, corpus, samples)


def carry_stats(
    folder: Path, stats: dict[int, LayerStats], corpus: str, samples: int
) -> list[Path]:
    """Write `stats` into a model folder (float32, half the size of the cache's float64; C then
    differs from a fresh collection by float32 rounding, ~6e-8 relative)."""
    paths = []
    for layer, st in stats.items():
        fp = st.meta["model_fingerprint"]
        path = _cache_file(Path(folder) / CARRIED_DIR, fp, layer, corpus, samples)
        stored = LayerStats(layer, st.mom2.float(), st.count, st.meta | {"dtype": "float32"})
        save_stats(path, stored)
        paths.append(path)
    return paths


def save_stats(path: Path, stats: LayerStats) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: json.dumps(v) for k, v in stats.meta.items()} | {
        "format": str(STATS_FORMAT),
        "layer": str(stats.layer),
        "count": str(stats.count),
    }
    io.write_safetensors(path, {"mom2": stats.mom2}, meta)


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
    return LayerStats(int(meta["layer"]), mom2.double(), int(meta["count"]), info)


# Statistics already read in this process, by cache file: a federation or an experiment asks for
# the same C_0 every round.
_MEMO: dict[Path, LayerStats] = {}


class MissingStatsError(FileNotFoundError):
    """The statistics of a base model other than the one at hand are not in the cache."""


def layer_stats(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    layers: Sequence[int],
    corpus: str = "world",
    samples: int = 100_000,
    cache_dir: Path | None = None,
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
    fingerprint: str | None = None,
) -> dict[int, LayerStats]:
    """Cached statistics for `layers` (the cache, else those the model's folder carries);
    collects (one pass for all missing layers) when absent.

    `fingerprint`: the whole-model fingerprint of the base model whose statistics are wanted
    (a federation's round-0 model), when `model` is a later, edited version of it. They are
    then read from the cache only: they cannot be collected on an edited model."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    own = arch.fingerprint(model)
    fp = fingerprint or own
    result: dict[int, LayerStats] = {}
    missing = []
    for layer in layers:
        path = _cache_file(cache_dir, fp, layer, corpus, samples)
        carried = _carried_file(model, fp, layer, corpus, samples)
        found = next((p for p in (path, carried) if p is not None and p.is_file()), None)
        if path in _MEMO:
            result[layer] = _MEMO[path]
        elif found is not None:
            result[layer] = _MEMO[path] = load_stats(found, expect_fingerprint=fp)
        else:
            missing.append(layer)
    if missing and fp != own:
        raise MissingStatsError(
            f"the statistics of the base model {fp} (layers {missing}, corpus {corpus!r}, "
            f"{samples} texts) are not in {cache_dir}; collect them once on the base model "
            "with `collabedit stats --model BASE`"
        )
    if missing:
        start = time.perf_counter()
        source = arch.model_folder(model)
        fresh = collect_stats(
            model,
            tokenizer,
            iter_corpus(corpus, samples, source),
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
            path = _cache_file(cache_dir, fp, layer, corpus, samples)
            save_stats(path, st)
            result[layer] = _MEMO[path] = st
    return result

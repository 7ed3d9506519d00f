"""A word-level tokenizer for the world, saved as an ordinary Hugging Face tokenizer.

Word-level keeps the model tiny (a few hundred tokens) and makes every name exactly one token per
word, so multi-word subjects and objects stay multi-token as in real data.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"
PAD = "<pad>"
UNK = "<unk>"


def build_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """Vocabulary = special tokens + every word of `texts` in first-seen order (deterministic)."""
    pre = pre_tokenizers.Whitespace()
    vocab: dict[str, int] = {EOS: 0, PAD: 1, UNK: 2}
    for text in texts:
        for word, _ in pre.pre_tokenize_str(text):
            if word not in vocab:
                vocab[word] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre
    # Decoding joins words with spaces; the WordPiece decoder does that and nothing else here.
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.post_processor = processors.TemplateProcessing(single="$A", special_tokens=[])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        bos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=128,
        clean_up_tokenization_spaces=True,
    )

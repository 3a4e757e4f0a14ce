"""Build a tiny, deterministic Qwen2-compatible byte-level BPE tokenizer for tests and tiny checkpoints.

    python scripts/tiny_tokenizer.py OUT_DIR [--vocab-size 320] [--specials-at-end]

The tokenizer has ``vocab_size`` ids at most (every id is < vocab_size): five special tokens and the 256 byte-level
symbols plus the merges learned from a small built-in English text (fewer merges if the text runs out of pairs).

Special tokens: ``<|endoftext|>`` (unk / pad / eos, the ``Qwen2Tokenizer`` defaults) and the four BAGEL tokens
``<|im_start|>``, ``<|im_end|>``, ``<|vision_start|>``, ``<|vision_end|>`` (extra special tokens). By default they sit
at the ids of the tiny parity checkpoint (``../shared/parity/tiny-a``: pad 0, bos 10, eos 11, start of image 12,
end of image 13), the regular tokens filling the other ids in order; ``special_token_ids=None`` puts them after the
BPE vocabulary instead, as Qwen2 does. The saved directory loads with ``AutoTokenizer.from_pretrained`` as a
``Qwen2Tokenizer``.
"""

from __future__ import annotations

import argparse
import json
import os

ENDOFTEXT = "<|endoftext|>"
BAGEL_TOKENS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"]
NUM_BYTE_SYMBOLS = 256
MIN_VOCAB_SIZE = NUM_BYTE_SYMBOLS + 1 + len(BAGEL_TOKENS)
#: Ids of the special tokens in the tiny parity checkpoint (its llm_config: pad 0, bos 10, eos 11; fixture.json).
TINY_A_SPECIAL_TOKEN_IDS = {
    ENDOFTEXT: 0,
    "<|im_start|>": 10,
    "<|im_end|>": 11,
    "<|vision_start|>": 12,
    "<|vision_end|>": 13,
}

_TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog. A small cat sits on a red mat near the window.
Describe the image in detail. The picture shows a house with a blue door and a green garden.
What is in this image? There is a person riding a bicycle along the river on a sunny day.
Generate an image of a mountain lake at sunset, with pine trees and a wooden boat.
Please edit the photo: make the sky darker and add a few stars above the hills.
The model reads text and images, thinks step by step, and then writes an answer.
She said that the weather would be better tomorrow, so they planned a trip to the sea.
Numbers like 1, 2, 3 and 2025 appear in text; so do punctuation marks: commas, periods, and questions?
A dog and a cat are playing in the yard while the children watch from the porch.
The train leaves the station at eight o'clock and arrives in the city before noon.
Colors: red, orange, yellow, green, blue, indigo and violet form the rainbow.
An old library holds thousands of books about history, science, art and music.
"""


def _training_lines() -> list[str]:
    lines = [line for line in _TRAINING_TEXT.splitlines() if line]
    return lines * 4


def _place_tokens(regular: list[str], vocab_size: int, special_token_ids: dict[str, int] | None) -> dict[str, int]:
    """Final token -> id map: specials at their ids (or after the regular tokens), regular tokens in order."""
    specials = [ENDOFTEXT, *BAGEL_TOKENS]
    if special_token_ids is None:
        vocab = {token: i for i, token in enumerate(regular)}
        vocab.update({token: len(regular) + k for k, token in enumerate(specials)})
        return vocab
    if set(special_token_ids) != set(specials):
        raise ValueError(f"special_token_ids must give the ids of exactly {specials}, got {sorted(special_token_ids)}")
    by_id = {int(i): token for token, i in special_token_ids.items()}
    if len(by_id) != len(specials) or not all(0 <= i < vocab_size for i in by_id):
        raise ValueError(f"special_token_ids must be distinct ids in [0, {vocab_size}), got {special_token_ids}")
    total = len(regular) + len(specials)
    if max(by_id) >= total:
        raise ValueError(
            f"special id {max(by_id)} would leave a gap: the built-in text only gives {len(regular)} regular tokens "
            f"({total} ids in all); use smaller ids or special_token_ids=None"
        )
    vocab, remaining = {}, iter(regular)
    for i in range(total):
        vocab[by_id[i] if i in by_id else next(remaining)] = i
    return vocab


def build_tiny_tokenizer(
    save_dir: str | os.PathLike | None = None,
    vocab_size: int = 320,
    special_token_ids: dict[str, int] | None = TINY_A_SPECIAL_TOKEN_IDS,
):
    """Train a tiny byte-level BPE (Qwen2 pre-tokenization) offline and wrap it as a ``Qwen2Tokenizer``.

    Args:
        save_dir: where to ``save_pretrained`` it (tokenizer.json, tokenizer_config.json); None to skip saving.
        vocab_size: every token id is < vocab_size (the tokenizer has exactly vocab_size tokens unless the built-in
            text runs out of merges, around 636); at least 261.
        special_token_ids: ids of ``<|endoftext|>`` and the four BAGEL tokens (default: the tiny parity checkpoint's,
            ``TINY_A_SPECIAL_TOKEN_IDS``); None puts them right after the BPE vocabulary, as Qwen2 does.

    Returns:
        The ``Qwen2Tokenizer``. Deterministic: the same arguments give the same files, in well under a second.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    vocab_size = int(vocab_size)
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: need at least {MIN_VOCAB_SIZE} "
            f"({NUM_BYTE_SYMBOLS} byte symbols + {1 + len(BAGEL_TOKENS)} special tokens)."
        )

    # Same normalizer / pre-tokenizer as Qwen2Tokenizer builds, so the learned merges fit it.
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1 - len(BAGEL_TOKENS),
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    bpe.train_from_iterator(_training_lines(), trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    regular = [token for token, _ in sorted(model["vocab"].items(), key=lambda item: item[1])]
    merges = [tuple(m) if isinstance(m, (list, tuple)) else tuple(m.split(" ")) for m in model["merges"]]
    vocab = _place_tokens(regular, vocab_size, special_token_ids)

    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=ENDOFTEXT,
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        extra_special_tokens=list(BAGEL_TOKENS),
    )
    # The specials are in the BPE vocabulary, so registering them as added (special) tokens keeps their ids.
    tokenizer.add_tokens([AddedToken(t, special=True) for t in BAGEL_TOKENS], special_tokens=True)

    got = dict(zip([ENDOFTEXT, *BAGEL_TOKENS], tokenizer.convert_tokens_to_ids([ENDOFTEXT, *BAGEL_TOKENS])))
    want = {token: vocab[token] for token in got}
    top = max(tokenizer.get_vocab().values())
    if got != want or top >= vocab_size or len(tokenizer) != len(vocab):
        raise RuntimeError(f"tiny tokenizer layout broken: special ids {got} (wanted {want}), largest id {top}")

    if save_dir is not None:
        os.makedirs(save_dir, exist_ok=True)
        tokenizer.save_pretrained(str(save_dir))
    return tokenizer


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("save_dir")
    parser.add_argument("--vocab-size", type=int, default=320)
    parser.add_argument("--specials-at-end", action="store_true", help="Qwen2 layout instead of the tiny-a ids")
    args = parser.parse_args(argv)
    specials = None if args.specials_at_end else TINY_A_SPECIAL_TOKEN_IDS
    tokenizer = build_tiny_tokenizer(args.save_dir, args.vocab_size, specials)
    print(f"saved {type(tokenizer).__name__} with {len(tokenizer)} tokens to {args.save_dir}")


if __name__ == "__main__":
    main()

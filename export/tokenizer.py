"""The CLIP BPE tokenizer of Stable Diffusion, regenerated from a vocabulary a package ships.

Stable Diffusion's tokenizer (`openai/clip-vit-large-patch14`) is CLIP's byte-level BPE
with 49408 entries. Its source, `bpe_simple_vocab_16e6.txt.gz`, ships inside the
`open-clip-torch` wheel; the Hugging Face `vocab.json` / `merges.txt` are derived from it
deterministically, so presets get the real vocabulary without a model hub. A smaller
vocabulary keeps the first merges only: every merge's result is still in it, so the
tokenizer stays consistent and emits only ids below its size.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
# CLIP keeps the first 49152 - 256 - 2 merges of the file (after its version line).
NUM_MERGES = 49152 - 256 - 2
VOCAB_SIZE = 49408
# Byte symbols alone and with `</w>`, then the two special tokens: a vocabulary's floor.
MIN_VOCAB_SIZE = 2 * 256 + 2
START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"


def bundled_bpe_path() -> Path:
    """Locates the BPE file inside the installed open_clip package without importing it."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the CLIP vocabulary ships in the open-clip-torch package: "
            "pip install --no-deps open-clip-torch"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / BPE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{BPE_FILE} not found in {path.parent}")
    return path


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for raw bytes, in CLIP's order."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


def write_clip_tokenizer_files(
    directory: Path, bpe_path: Path | None = None, vocab_size: int = VOCAB_SIZE
) -> None:
    """Writes vocab.json and merges.txt of CLIP's tokenizer, or of its first merges only."""
    if not MIN_VOCAB_SIZE <= vocab_size <= VOCAB_SIZE:
        raise ValueError(
            f"vocab_size {vocab_size}: a CLIP vocabulary has "
            f"{MIN_VOCAB_SIZE} to {VOCAB_SIZE} entries"
        )
    bpe_path = bpe_path or bundled_bpe_path()
    with gzip.open(bpe_path, "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    if len(merges) != NUM_MERGES:
        raise ValueError(f"{bpe_path} has {len(merges)} merges, not {NUM_MERGES}")
    merges = merges[: vocab_size - MIN_VOCAB_SIZE]
    symbols = _byte_symbols()
    vocab = symbols + [symbol + "</w>" for symbol in symbols]
    vocab += ["".join(merge) for merge in merges]
    vocab += [START_OF_TEXT, END_OF_TEXT]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(
        json.dumps({token: index for index, token in enumerate(vocab)}, ensure_ascii=False)
    )
    merges_text = "#version: 0.2\n" + "\n".join(" ".join(merge) for merge in merges) + "\n"
    (directory / "merges.txt").write_text(merges_text, encoding="utf-8")


def save_clip_tokenizer(
    directory: Path,
    vocab_size: int = VOCAB_SIZE,
    model_max_length: int = 77,
    pad_token: str = END_OF_TEXT,
) -> None:
    """Saves a transformers CLIPTokenizer; the defaults are Stable Diffusion 1.5's.

    SD 2.x pads with "!" (id 0) instead of the end-of-text token.
    """
    from transformers import CLIPTokenizer

    write_clip_tokenizer_files(directory, vocab_size=vocab_size)
    tokenizer = CLIPTokenizer(
        vocab=str(directory / "vocab.json"),
        merges=str(directory / "merges.txt"),
        model_max_length=model_max_length,
        bos_token=START_OF_TEXT,
        eos_token=END_OF_TEXT,
        unk_token=END_OF_TEXT,
        pad_token=pad_token,
    )
    tokenizer.save_pretrained(directory)

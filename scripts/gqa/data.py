"""The bundled tokenizer and corpora in data/, written from nothing downloaded:
the same bytes on every run."""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

from gqa import ForkError, last_line
from gqa.bases import Base, ROOT
from gqa.install import installed_versions

WORDS = {
    "det": ["the", "a", "every", "one", "no", "this", "that"],
    "adj": ["small", "red", "quiet", "old", "bright", "heavy", "green", "quick", "cold", "tall"],
    "noun": ["cat", "river", "engine", "garden", "teacher", "window", "storm", "bridge", "letter", "forest"],
    "verb": ["sees", "moves", "builds", "follows", "paints", "opens", "carries", "finds", "hears", "leaves"],
    "adv": ["slowly", "often", "again", "today", "quietly", "never", "early", "together"],
}
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TOKENIZER_CONFIG = {
    "bos_token": "<|begin_of_text|>",
    "eos_token": "<|end_of_text|>",
    "add_bos_token": False,
    "add_eos_token": False,
}


def sentence(rng) -> str:
    """A sentence from a small grammar, or a counting run: text a tiny model can learn."""
    if rng.random() < 0.2:
        start = rng.randrange(10)
        return " ".join(NUMBERS[(start + i) % 10] for i in range(rng.randint(3, 8))) + "."
    w = {k: rng.choice(v) for k, v in WORDS.items()}
    obj = f"{rng.choice(WORDS['det'])} {rng.choice(WORDS['adj'])} {rng.choice(WORDS['noun'])}"
    return f"{w['det'].capitalize()} {w['adj']} {w['noun']} {w['verb']} {obj} {w['adv']}."


def make_data(out: Path) -> str:
    """Write the bundled tokenizer and two corpora; the same bytes on every run."""
    from tokenizers import decoders, models, pre_tokenizers, trainers, Tokenizer

    rng = random.Random(0)
    documents = [" ".join(sentence(rng) for _ in range(rng.randint(4, 60))) for _ in range(1500)]
    quarter = len(documents) // 4
    corpora = {
        # Short documents: several per training sequence (block_causal masks matter).
        "multi_doc": documents,
        # Four long documents, one or more for every data-parallel rank: the
        # sequences of a short run lie inside one, so causal and block_causal
        # masks agree.
        "single_doc": [" ".join(documents[i : i + quarter]) for i in range(0, len(documents), quarter)],
    }
    for name, texts in corpora.items():
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / "train.jsonl").open("w") as f:
            for text in texts:
                f.write(json.dumps({"text": text}) + "\n")

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2000,
        special_tokens=[TOKENIZER_CONFIG["bos_token"], TOKENIZER_CONFIG["eos_token"]],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer)
    folder = out / "tokenizer"
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
    return f"wrote {out}/: tokenizer (vocab {tokenizer.get_vocab_size()}), {len(documents)} documents"


def make_data_in(base: Base, out: Path) -> str:
    """make_data run in the base's environment, where `install` put tokenizers."""
    if not base.python.exists() or installed_versions(base, ["tokenizers"])["tokenizers"] is None:
        raise ForkError(
            f"'data' trains the tokenizer with the tokenizers package, which {base.venv} lacks; "
            f"run 'python3 scripts/gqa_fork.py install' first"
        )
    code = "import sys; from pathlib import Path; from gqa.data import make_data; print(make_data(Path(sys.argv[1])))"
    proc = subprocess.run(
        [str(base.python), "-c", code, str(out)], capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "scripts")},
    )
    if proc.returncode != 0:
        raise ForkError(f"writing {out} failed in {base.venv}: {last_line(proc.stderr)}")
    return proc.stdout.strip()

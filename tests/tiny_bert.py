"""A tiny random BERT saved as a local Hugging Face directory (nothing is downloaded), for the training and serving
tests of the transformer encoder."""

import pytest
import torch


def save_tiny_bert(words, path, layers: int = 2, hidden: int = 32, max_length: int = 32):
    """A small BERT (no dropout, random weights from seed 0) with the word-level vocabulary `words`, saved in `path`."""
    transformers = pytest.importorskip("transformers", reason="the Hugging Face encoder path needs transformers")
    from training.encoders import HFTextEncoder

    path.mkdir(parents=True)
    (path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(words)]) + "\n")
    tokenizer = transformers.BertTokenizer(str(path / "vocab.txt"))
    config = transformers.BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=48,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    HFTextEncoder(transformers.BertModel(config), tokenizer, max_length=max_length).save_pretrained(path)
    return path
